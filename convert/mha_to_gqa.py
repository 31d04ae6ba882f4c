"""`convert mha-to-gqa` / `mha-to-mqa`: fewer KV heads, same architecture class."""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kvshrink.convert import gqa
from kvshrink.convert.attention import AttentionWeights, attention_tensors
from kvshrink.convert.calibration import LayerStatistics, collect_statistics
from kvshrink.convert.check import compare_perplexity, load_tokenizer
from kvshrink.convert.corpora import calibration_text
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.gqa.attended import RotaryLayerStatistics
from kvshrink.convert.gqa.projection_norms import per_head_stand_in, restore_projection_norms
from kvshrink.convert.rewrite import ConversionContext, LayerOutput, Rewrite, run_conversion


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


def _plan(
    context: ConversionContext,
    groups: int,
    method: str,
    text: str | None,
    calibration_tokens: int,
    check: bool,
    progress: bool,
) -> Rewrite:
    counts, spec = context.counts, context.spec
    support = spec.require("gqa")
    _validate_groups(groups, counts.num_kv_heads)
    merge = gqa.get_method(method)
    identity = groups == counts.num_kv_heads
    rotary_fraction = _rotary_fraction(context.checkpoint.config)
    if gqa.folds_key_gains(method) and context.checkpoint.config.get("clip_qkv") and not identity:
        raise KvshrinkError(
            f"method {method!r} folds key gains into the query rows, but this model clamps every query coordinate "
            "(clip_qkv), which does not commute with them: use --method grouped or mean"
        )
    if gqa.folds_key_gains(method) and rotary_fraction != 1.0 and not identity:
        raise KvshrinkError(
            f"method {method!r} folds key rotations into the queries, which is exact only when RoPE covers the whole "
            f"head, but this model rotates {rotary_fraction:g} of it (partial_rotary_factor): use --method grouped or mean"
        )
    summary = {
        "target_heads": {"query": counts.num_heads, "kv": groups},
        "family_support": {"family": spec.model_type, "level": support.level, "why": support.why},
    }
    stats: list[LayerStatistics | None] = [None] * counts.num_layers
    calibrate = gqa.needs_calibration(method) and not identity

    def collect() -> None:
        """Run the source on the calibration text; done at the first layer, after every input check has passed."""
        started = time.perf_counter()
        try:
            load_tokenizer(context.checkpoint.folder)
        except KvshrinkError:
            raise KvshrinkError(
                f"method {method!r} calibrates on text, but {context.source} has no usable tokenizer: "
                f"add its tokenizer files, or pass --method mean{'' if not check else ' --no-check'}"
            ) from None
        collected = collect_statistics(
            context.checkpoint.folder, context.spec, counts.num_layers, text, calibration_tokens, progress=progress
        )
        config = context.checkpoint.config
        rope = _rotary_frequencies(config, counts.head_dim)
        scalar, softcap = config.get("query_pre_attn_scalar"), config.get("attn_logit_softcapping")
        logits = {"logit_scale": float(scalar) ** -0.5 if scalar else None, "logit_softcap": softcap}
        stats[:] = collected if rope is None else [RotaryLayerStatistics(s.inputs, *rope, **logits) for s in collected]
        summary["calibration"] = {
            "tokens": stats[0].inputs.shape[0] * stats[0].inputs.shape[1],
            "seconds": round(time.perf_counter() - started, 2),
        }

    def convert_layer(layer: int, attention: AttentionWeights) -> LayerOutput:
        if identity:
            groups_of_heads = [[h] for h in range(groups)]
            result = gqa.KvMerge(attention, groups_of_heads)
        else:
            if calibrate and "calibration" not in summary:
                collect()
            if spec.has_projection_norms:
                result = merge(per_head_stand_in(attention), groups, stats[layer])
                eps = float(context.checkpoint.config.get("rms_norm_eps", 1e-6))
                result = restore_projection_norms(attention, result, stats[layer], eps)
            else:
                result = merge(attention, groups, stats[layer])
            stats[layer] = None  # each layer's inputs are needed once; free them as the pass goes
        report = {"groups": result.groups, **gqa.projection_errors(attention, result), **result.details}
        return LayerOutput(attention_tensors(result.attention, context.spec, layer), report)

    config = copy.deepcopy(context.checkpoint.config)
    config["num_key_value_heads"] = groups
    return Rewrite(
        method=f"gqa/{method}",
        config=config,
        convert_layer=convert_layer,
        summary=summary,
    )


def mha_to_gqa(
    source: str | Path,
    out: str | Path,
    groups: int,
    *,
    method: str = gqa.DEFAULT_METHOD,
    check: bool = True,
    calibration: str | Path | None = None,
    calibration_tokens: int = 8192,
    check_tokens: int = 2048,
    overwrite: bool = False,
    out_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge the KV heads of `source` into `groups` heads and write a checkpoint of the same class to `out`.

    Returns the report also written to OUT/kvshrink_report.json. `groups` must divide the source's KV heads;
    `groups` equal to them copies every tensor bit for bit. Methods that need calibration (every one but
    "mean") first run the source on `calibration_tokens` tokens of the `calibration` text, in 512-token windows.
    """
    calibrated = gqa.needs_calibration(method)
    if calibrated and calibration_tokens < 2:
        raise KvshrinkError(f"--calibration-tokens must be at least 2, got {calibration_tokens}")
    text = calibration_text(calibration) if check or calibrated else None
    checker = None
    if check:
        checker = partial(compare_perplexity, text=text, max_tokens=check_tokens, progress=progress)
    return run_conversion(
        source,
        out,
        partial(
            _plan,
            groups=groups,
            method=method,
            text=text,
            calibration_tokens=calibration_tokens,
            check=check,
            progress=progress,
        ),
        overwrite=overwrite,
        out_shard_size=out_shard_size,
        allow_pickle=allow_pickle,
        check=checker,
        progress=progress,
    )
