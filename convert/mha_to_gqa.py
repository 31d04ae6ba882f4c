"""`convert mha-to-gqa` / `mha-to-mqa`: fewer KV heads, same architecture class.

One visible sequence, one decoder layer in memory at a time: open the source -> refuse what cannot be converted
-> calibrate (the calibration windows stand at layer 0) -> plan the target config -> per layer: the layer's
calibration statistics, the merge, the layer written, the windows advanced (through the converted layer with
error feedback) -> check (both models streamed) -> report.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvshrink.convert import gqa
from kvshrink.convert.attention import AttentionWeights, attention_tensors, read_attention
from kvshrink.convert.calibration import Calibration, LayerStatistics, calibration_windows
from kvshrink.convert.check import compare_perplexity
from kvshrink.convert.corpora import calibration_text, check_text
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.fitting import LayerFit, fit_converted_attention, fit_summary, require_fit_windows
from kvshrink.convert.gqa.attended import RotaryLayerStatistics
from kvshrink.convert.gqa.projection_norms import per_head_stand_in, restore_projection_norms
from kvshrink.convert.layers import StockModel
from kvshrink.convert.options import GqaOptions
from kvshrink.convert.rewrite import (
    Conversion, LayerWriter, finish, open_conversion, require_free_space, write_metadata,
)  # fmt: skip


def _validate_groups(groups: int, kv_heads: int) -> None:
    if groups <= 0:
        raise KvshrinkError(f"--groups must be a positive number of KV heads, got {groups}")
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


def _rotary_fraction(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)


def _rotary_frequencies(config: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float] | None:
    """(inv_freq, attention scaling) of the source's RoPE at its trained length, or None if transformers cannot
    say (methods then weigh tokens without the source's attention pattern)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in rope.values()):
        return None  # one RoPE per layer type (Gemma-3): not a single table
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        return None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](AutoConfig.for_model(**config), "cpu")
    return inv_freq.double(), float(scaling)


def _refuse(conversion: Conversion, options: GqaOptions) -> bool:
    """Refuse what this conversion cannot do; returns whether the method calibrates (identity never does)."""
    counts = conversion.counts
    conversion.spec.require("gqa")
    _validate_groups(options.groups, counts.num_kv_heads)
    identity = options.groups == counts.num_kv_heads
    rotary_fraction = _rotary_fraction(conversion.checkpoint.config)
    if gqa.folds_key_gains(options.method) and conversion.checkpoint.config.get("clip_qkv") and not identity:
        raise KvshrinkError(
            f"method {options.method!r} folds key gains into the query rows, but this model clamps every query "
            "coordinate (clip_qkv), which does not commute with them: use --method grouped or mean"
        )
    if gqa.folds_key_gains(options.method) and rotary_fraction != 1.0 and not identity:
        raise KvshrinkError(
            f"method {options.method!r} folds key rotations into the queries, which is exact only when RoPE covers "
            f"the whole head, but this model rotates {rotary_fraction:g} of it (partial_rotary_factor): use --method "
            "grouped or mean"
        )
    calibrated = gqa.needs_calibration(options.method) and not identity
    if calibrated and options.calibration_tokens < 2:
        raise KvshrinkError(f"--calibration-tokens must be at least 2, got {options.calibration_tokens}")
    needs = {f"method {options.method!r} calibrates on text": "--method mean"} if calibrated else {}
    if options.check:
        needs["the check scores the output on text"] = "--no-check"
    if needs:
        conversion.require_tokenizer(" and ".join(needs), " ".join(needs.values()))
    return calibrated


def _calibrate(conversion: Conversion, options: GqaOptions) -> Calibration:
    windows = calibration_windows(
        conversion.checkpoint.folder, calibration_text(options.calibration), options.calibration_tokens
    )
    if options.fit != "none":
        require_fit_windows(len(windows), options.fit_heldout_windows)
    return Calibration(conversion.source_model(), conversion.spec, windows)


def _with_rope(conversion: Conversion, statistics: LayerStatistics) -> LayerStatistics:
    """The statistics with the source's RoPE and logit scaling attached, so methods can recompute the source's
    attention."""
    config = conversion.checkpoint.config
    rope = _rotary_frequencies(config, conversion.counts.head_dim)
    scalar, softcap = config.get("query_pre_attn_scalar"), config.get("attn_logit_softcapping")
    logits = {"logit_scale": float(scalar) ** -0.5 if scalar else None, "logit_softcap": softcap}
    return statistics if rope is None else RotaryLayerStatistics(statistics.inputs, *rope, **logits)


def _merge(conversion: Conversion, attention: AttentionWeights, options: GqaOptions,
           statistics: LayerStatistics | None) -> gqa.KvMerge:  # fmt: skip
    if options.groups == attention.num_kv_heads:  # nothing to merge: every tensor stays as it is
        return gqa.KvMerge(attention, [[head] for head in range(options.groups)])
    merge = gqa.get_method(options.method)
    if not conversion.spec.has_projection_norms:
        return merge(attention, options.groups, statistics)
    # OLMo-2: q/k norms span the whole projection; merge per-head stand-ins, then carry the norms over
    result = merge(per_head_stand_in(attention), options.groups, statistics)
    eps = conversion.rms_norm_eps
    return restore_projection_norms(attention, result, statistics, eps)


def _fit(conversion: Conversion, options: GqaOptions, calibration: Calibration, target: StockModel, layer: int,
         inputs: torch.Tensor, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """The merged tensors fitted to the source attention's output on the layer's calibration inputs."""
    trainable = list(tensors) if options.fit_scope == "attention" else conversion.changed_tensors(tensors)
    return fit_converted_attention(LayerFit(calibration.model, target, layer, inputs, tensors, trainable,
                                            options.fit_settings(), options.fit_heldout_windows))  # fmt: skip


def _convert_layer(conversion: Conversion, options: GqaOptions, calibration: Calibration | None, target: StockModel,
                   layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """One layer's merged (and fitted) attention tensors and report entry; its statistics and source weights die
    here, before the windows advance through the next materialized layer."""
    statistics = calibration.statistics(layer) if calibration is not None else None
    attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)  # after the layer ran
    result = _merge(conversion, attention, options, _with_rope(conversion, statistics) if statistics else None)
    report = {"layer": layer, "groups": result.groups, **gqa.projection_errors(attention, result), **result.details}
    tensors = attention_tensors(result.attention, conversion.spec, layer)
    if statistics is not None and options.fit != "none":
        tensors, report["fit"] = _fit(conversion, options, calibration, target, layer, statistics.inputs, tensors)
    return tensors, report


def _convert_layers(
    conversion: Conversion, options: GqaOptions, calibration: Calibration | None, config: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Convert and write each layer in turn; returns the per-layer reports and the names created or changed."""
    writer = LayerWriter(conversion, conversion.staging)
    target = conversion.target_model(config)
    require_free_space(conversion, target)
    reports = []
    for layer in tqdm(range(conversion.counts.num_layers), desc="converting", unit="layer", disable=not options.progress):
        tensors, report = _convert_layer(conversion, options, calibration, target, layer)
        writer.write_layer(layer, tensors)
        reports.append(report)
        feedback = tensors if options.error_feedback else None
        del tensors  # written: only error feedback needs them while the windows advance
        if calibration is not None and feedback is not None:
            calibration.advance(layer, target.layer(layer, feedback), target)
        elif calibration is not None:
            calibration.advance(layer)
    return reports, writer.finish(conversion.counts.num_layers)


def mha_to_gqa(source: str | Path, out: str | Path, options: GqaOptions) -> dict[str, Any]:
    """Merge the KV heads of `source` into `options.groups` heads and write a checkpoint of the same class to `out`.

    Returns the report also written to OUT/kvshrink_report.json. `groups` must divide the source's KV heads;
    `groups` equal to them copies every tensor bit for bit. Methods that need calibration (every one but
    "mean") run the source on `calibration_tokens` tokens of the `calibration` text, in 512-token windows,
    one decoder layer at a time.
    """
    with open_conversion(source, out, options) as conversion:
        calibrated = _refuse(conversion, options)
        calibration = _calibrate(conversion, options) if calibrated else None
        config = copy.deepcopy(conversion.checkpoint.config)
        config["num_key_value_heads"] = options.groups
        layers, new_parameters = _convert_layers(conversion, options, calibration, config)
        write_metadata(conversion, config)
        check = None
        if options.check:
            check = compare_perplexity(
                conversion.checkpoint.folder, {"source": conversion.checkpoint.folder, "converted": conversion.staging},
                check_text(options.calibration), options.check_tokens, conversion.device, progress=options.progress,
            )  # fmt: skip
        support = conversion.spec.support("gqa")
        summary = {
            "target_heads": {"query": conversion.counts.num_heads, "kv": options.groups},
            "family_support": {"family": conversion.spec.model_type, "level": support.level, "why": support.why},
        }
        if calibrated:
            summary["calibration"] = {"tokens": calibration.tokens, "error_feedback": options.error_feedback}
            summary["fit"] = fit_summary(options.fit_report(), layers) if options.fit != "none" else None
        return finish(conversion, method=f"gqa/{options.method}", config=config, summary=summary, layers=layers,
                      new_parameters=new_parameters, check=check)  # fmt: skip
