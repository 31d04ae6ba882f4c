"""`convert mha-to-gqa` / `mha-to-mqa`: fewer KV heads, same architecture class.

A method of the conversion driver (`driver.py`): refuse what cannot be merged -> calibrate (the calibration
windows stand at layer 0 of the source) -> plan the target config (the source's, with fewer KV heads) -> per
layer, the merge of its heads (`gqa/`), which the driver fits, writes and checks like every other method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvshrink.convert import gqa
from kvshrink.convert.attention import AttentionWeights, attention_tensors, read_attention
from kvshrink.convert.calibration import AttentionInputs, Calibration
from kvshrink.convert.driver import LayerResult, Plan, TargetPlan, calibration_inputs, convert
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.frame import Conversion
from kvshrink.convert.gqa.attended import RotaryAttentionInputs
from kvshrink.convert.gqa.projection_norms import per_head_stand_in, restore_projection_norms
from kvshrink.convert.layers import StockModel
from kvshrink.convert.options import GqaOptions


def _validate_groups(groups: int, kv_heads: int) -> None:
    if groups > kv_heads:
        raise KvshrinkError(
            f"--groups {groups} is more than the source's {kv_heads} KV heads: merging can only reduce them; "
            f"choose a divisor of {kv_heads}"
        )
    if kv_heads % groups:
        divisors = [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]
        raise KvshrinkError(
            f"--groups {groups} does not divide the source's {kv_heads} KV heads: choose one of "
            f"{', '.join(map(str, divisors))}"
        )


def _calibrated(conversion: Conversion, options: GqaOptions) -> bool:
    """Whether the method reads calibration text (identity, the same number of KV heads, never does)."""
    return gqa.needs_calibration(options.method) and options.groups != conversion.counts.num_kv_heads


def _refuse(conversion: Conversion, options: GqaOptions) -> None:
    """Refuse what this conversion cannot do, before anything is read or written."""
    counts = conversion.counts
    conversion.spec.require("gqa")
    _validate_groups(options.groups, counts.num_kv_heads)
    identity = options.groups == counts.num_kv_heads
    if gqa.folds_key_gains(options.method) and conversion.checkpoint.config.get("clip_qkv") and not identity:
        raise KvshrinkError(
            f"method {options.method!r} folds key gains into the query rows, but this model clamps every query "
            "coordinate (clip_qkv), which does not commute with them: use --method grouped or mean"
        )
    if gqa.folds_key_gains(options.method) and not identity and conversion.rope.fraction != 1.0:
        raise KvshrinkError(
            f"method {options.method!r} folds key rotations into the queries, which is exact only when RoPE covers "
            f"the whole head, but this model rotates {conversion.rope.fraction:g} of it (partial_rotary_factor): use "
            "--method grouped or mean"
        )
    needs = (
        {f"method {options.method!r} calibrates on text": "--method mean"} if _calibrated(conversion, options) else {}
    )
    if options.check:
        needs["the check scores the output on text"] = "--no-check"
    if needs:
        conversion.require_tokenizer(" and ".join(needs), " ".join(needs.values()))


def _with_rope(conversion: Conversion, inputs: AttentionInputs) -> AttentionInputs:
    """The inputs with the source's RoPE and logit scaling attached, so methods can recompute the source's
    attention."""
    config, rope = conversion.checkpoint.config, conversion.rope
    if rope.inv_freq is None:  # no one table (per-layer-type RoPE): the methods weigh tokens without its attention
        return inputs
    scalar, softcap = config.get("query_pre_attn_scalar"), config.get("attn_logit_softcapping")
    logits = {"logit_scale": float(scalar) ** -0.5 if scalar else None, "logit_softcap": softcap}
    return RotaryAttentionInputs(inputs.inputs, rope.inv_freq, rope.attention_scaling,
                                 norm_eps=conversion.rms_norm_eps, **logits)


def _merge(conversion: Conversion, attention: AttentionWeights, options: GqaOptions,
           inputs: AttentionInputs | None) -> gqa.KvMerge:
    if options.groups == attention.num_kv_heads:  # nothing to merge: every tensor stays as it is
        return gqa.KvMerge(attention, [[head] for head in range(options.groups)])
    merge = gqa.get_method(options.method)
    if not conversion.spec.has_projection_norms:
        return merge(attention, options.groups, inputs)
    # OLMo-2: q/k norms span the whole projection; merge per-head stand-ins, then carry the norms over
    result = merge(per_head_stand_in(attention), options.groups, inputs)
    eps = conversion.rms_norm_eps
    return restore_projection_norms(attention, result, inputs, eps)


def _target_config(conversion: Conversion, options: GqaOptions) -> dict[str, Any]:
    config = copy.deepcopy(conversion.checkpoint.config)
    config["num_key_value_heads"] = options.groups
    return config


@dataclass(frozen=True)
class GqaMethod:
    """Merging KV heads, as a method of the conversion driver."""

    options: GqaOptions
    support: ClassVar[str] = "gqa"
    fits_every_tensor: ClassVar[bool] = False

    def refuse(self, conversion: Conversion) -> None:
        _refuse(conversion, self.options)

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        return [conversion.target_model(_target_config(conversion, self.options))]

    def calibrate(self, conversion: Conversion) -> Calibration | None:
        """The calibration windows standing at layer 0 of the source (None when the method reads no text)."""
        if not _calibrated(conversion, self.options):
            return None
        return Calibration(conversion.source_model(), conversion.spec, calibration_inputs(conversion, self.options))

    def plan(self, conversion: Conversion, calibration: Calibration | None) -> Plan:
        options = self.options
        summary: dict[str, Any] = {"target_heads": {"query": conversion.counts.num_heads, "kv": options.groups}}
        if calibration is not None:
            summary["calibration"] = {"tokens": calibration.tokens, "error_feedback": options.error_feedback}
        target = TargetPlan("converted", _target_config(conversion, options))
        return Plan(method=f"gqa/{options.method}", targets=[target], calibration=calibration, summary=summary)

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int,
                      inputs: AttentionInputs | None) -> list[LayerResult]:
        """The layer's merged attention tensors and report entry (the driver fits and writes them)."""
        attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)  # after it ran
        with_rope = _with_rope(conversion, inputs) if inputs is not None else None
        result = _merge(conversion, attention, self.options, with_rope)
        report = {"layer": layer, "groups": result.groups, **gqa.projection_errors(attention, result), **result.details}
        return [(attention_tensors(result.attention, conversion.spec, layer), report)]

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        """The check as it is: it scored the source and the output only."""
        return check


def mha_to_gqa(source: str | Path, out: str | Path, options: GqaOptions) -> dict[str, Any]:
    """Merge the KV heads of `source` into `options.groups` heads and write a checkpoint of the same class to `out`.

    Returns the report also written to OUT/kvshrink_report.json. `groups` must divide the source's KV heads;
    `groups` equal to them copies every tensor bit for bit. Methods that need calibration (every one but
    "mean") run the source on `calibration_tokens` tokens of the `calibration` text, in 512-token windows,
    one decoder layer at a time.
    """
    return convert(source, out, GqaMethod(options))
