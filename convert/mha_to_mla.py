"""`convert mha-to-mla`: MHA/GQA -> DeepSeek MLA that stock transformers loads as DeepseekV3ForCausalLM.

The conversion runs in two passes over the attention weights. First, calibration: the source reads real text,
and every layer yields its input second moment, its attention over distances and its rope basis; the slots of
the shared rope key are then chosen once for the whole model (its frequencies are one table). Second, the
streaming rewrite: each layer becomes DeepseekV3 attention (`mla.layer`); MLP, norms and embeddings are copied.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvshrink.convert.attention import AttentionWeights, HeadCounts, read_attention
from kvshrink.convert.calibration import collect_statistics
from kvshrink.convert.check import compare_perplexity, folder_perplexity, load_tokenizer, token_windows
from kvshrink.convert.corpora import calibration_text
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.mla import deepseek
from kvshrink.convert.mla.complex_heads import augmented, to_complex
from kvshrink.convert.mla.distance import attention_distances, rotation_gains
from kvshrink.convert.mla.head_norms import HEAD_NORM_FITS, fit_head_norms, linearized
from kvshrink.convert.mla.layer import LayerCalibration, MlaShape, OutputFormat, convert_attention, rope_bias
from kvshrink.convert.mla.lowrank import FACTORIZATIONS
from kvshrink.convert.mla.rope import ROPE_METHODS, choose_slots, rope_basis
from kvshrink.convert.rewrite import ConversionContext, LayerOutput, Rewrite, run_conversion

CALIBRATION_WINDOW = 512
_LINEARIZATION_SAMPLE = 2048
_SHAPE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")


@dataclass(frozen=True)
class MlaOptions:
    kv_rank: int | str | None
    rope_dim: int | str | None
    kv_budget: float | None
    mla_shape: str | None
    rope_method: str
    factorization: str
    distance_aware: bool
    target: str
    calibration: str | Path | None
    calibration_tokens: int
    progress: bool
    exact_only: bool = False
    head_norm_fit: str = "least-squares"


def _refuse_unsupported(context: ConversionContext, exact_only: bool) -> None:
    config, spec = context.checkpoint.config, context.spec
    spec.require("mla", exact_only)
    window = config.get("sliding_window")
    window_used = config.get(spec.sliding_window_switch, False) if spec.sliding_window_switch else True
    if window and window_used and int(window) < int(config.get("max_position_embeddings", 0)):
        raise KvshrinkError(
            f"the source attends within a sliding window of {window} tokens, which DeepseekV3 cannot: "
            "convert a model with full attention (or set sliding_window to null if it was never used)"
        )
    if config.get("mlp_bias"):
        raise KvshrinkError("the source's MLP has biases, which DeepseekV3's MLP lacks: convert a model without them")
    first_attention = context.spec.tensor_name(0, "qkv_proj" if spec.fused_qkv else "q_proj")
    if context.checkpoint.dtype(first_attention) == torch.float16:
        raise KvshrinkError(
            "the source is float16, which cannot hold the linearized latent (its tiny values are subnormal in "
            "float16): save the source as bfloat16 or float32 first, e.g. "
            "model.to(torch.bfloat16).save_pretrained(dir), and convert that"
        )


def resolve_shape(counts: HeadCounts, options: MlaOptions, serving: bool, latent_inputs: int) -> MlaShape:
    """kv_lora_rank and qk_rope_head_dim from the user's options, checked against what the source allows."""
    d, kv_heads = counts.head_dim, counts.num_kv_heads
    all_rope = kv_heads * d
    max_rope = d if serving else all_rope
    given = [name for name, value in (("--kv-rank", options.kv_rank), ("--kv-budget", options.kv_budget),
                                      ("--mla-shape", options.mla_shape)) if value is not None]  # fmt: skip
    if len(given) != 1:
        raise KvshrinkError(
            "pass exactly one of --kv-rank, --kv-budget or --mla-shape" + (f" (got {' and '.join(given)})" if given else "")
        )
    rope_dim = options.rope_dim
    if options.mla_shape is not None:
        match = _SHAPE.match(options.mla_shape)
        if not match:
            raise KvshrinkError(f"--mla-shape {options.mla_shape!r} is not RANK+ROPE: use a form like 512+64")
        if rope_dim is not None:
            raise KvshrinkError("--mla-shape already sets the rope dim: drop --rope-dim")
        kv_rank, rope_dim = int(match.group(1)), int(match.group(2))
    else:
        kv_rank = options.kv_rank
    if rope_dim is None:
        rope_dim = max(2, d // 2)
    elif rope_dim == "all":
        if serving and kv_heads > 1:
            raise KvshrinkError(
                f"--rope-dim all needs {all_rope} rope dims ({kv_heads} KV heads x {d}), but serving engines take "
                f"at most one component per frequency ({d} dims): pass --rope-dim {d} or less, or --target "
                "transformers for the exact form"
            )
        rope_dim = all_rope
    rope_dim = int(rope_dim)
    if rope_dim < 2 or rope_dim % 2:
        raise KvshrinkError(f"--rope-dim {rope_dim} must be an even number >= 2 (rotary dims come in pairs)")
    if rope_dim > max_rope:
        where = "serving engines take one component per frequency" if serving else f"the source has {kv_heads} KV heads x {d}"
        raise KvshrinkError(
            f"--rope-dim {rope_dim} is more than the {max_rope} rotary dims available ({where}): pass at most {max_rope}"
            + (", or --target transformers" if serving and kv_heads > 1 else "")
        )
    nope_dim = 0 if rope_dim == all_rope else d
    full_rank = min(kv_heads * (nope_dim + d), latent_inputs)
    source_values = 2 * kv_heads * d
    if options.kv_budget is not None:
        budget = float(options.kv_budget)
        if not 0 < budget < 1:
            raise KvshrinkError(f"--kv-budget {budget} must be a fraction of the source KV cache in (0, 1), e.g. 0.25")
        kv_rank = round(budget * source_values) - rope_dim
        if kv_rank < 1:
            raise KvshrinkError(
                f"--kv-budget {budget} leaves no latent: {round(budget * source_values)} values per token per layer "
                f"are not more than --rope-dim {rope_dim}; raise the budget or lower --rope-dim"
            )
        kv_rank = min(kv_rank, full_rank)
    elif kv_rank == "full":
        kv_rank = full_rank
    kv_rank = int(kv_rank)
    if not 1 <= kv_rank <= full_rank:
        raise KvshrinkError(
            f"kv rank {kv_rank} is impossible here: the joint K/V latent has rank at most {full_rank} "
            f"({kv_heads} KV heads x {nope_dim + d} K_nope+V dims, {latent_inputs} inputs); pass 1..{full_rank} or 'full'"
        )
    return MlaShape(kv_rank=kv_rank, rope_dim=rope_dim, nope_dim=nope_dim, head_dim=d)


def _nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.abs().max() > 0)


def _input_norm_bound(context: ConversionContext, layer: int, sample: torch.Tensor) -> float:
    """Largest possible ‖x̃‖ of the layer input: an RMSNorm output, ‖x‖ ≤ sqrt(n)·max|weight| (plus the 1 of x̃)."""
    name = f"{context.spec.layer_prefix.format(layer=layer)}input_layernorm.weight"
    if name in context.checkpoint:
        largest = float(context.checkpoint.tensor(name).float().abs().max()) * math.sqrt(context.counts.hidden_size)
    else:  # no visible norm weight: the calibration maximum with a wide margin
        largest = 100 * float(sample[:, :-1].norm(dim=1).max())
    return math.sqrt(largest**2 + 1)


def _calibrate(context: ConversionContext, options: MlaOptions, inv_freq: torch.Tensor) -> list[LayerCalibration]:
    counts = context.counts
    try:
        load_tokenizer(context.checkpoint.folder)
    except KvshrinkError:
        raise KvshrinkError(
            f"{context.source} has no usable tokenizer, and mha-to-mla calibrates on text: add the tokenizer files"
        ) from None
    statistics = collect_statistics(
        context.checkpoint.folder, context.spec, counts.num_layers, calibration_text(options.calibration),
        options.calibration_tokens, CALIBRATION_WINDOW, options.progress,
    )  # fmt: skip
    calibrations = []
    for layer in tqdm(range(counts.num_layers), desc="rope bases", unit="layer", disable=not options.progress):
        attention = read_attention(context.checkpoint, context.spec, layer, counts)
        inputs = statistics[layer].inputs
        head_norms = None
        if attention.q_norm is not None or attention.k_norm is not None:
            eps = float(context.checkpoint.config.get("rms_norm_eps", 1e-6))
            head_norms = fit_head_norms(attention, statistics[layer].flat_inputs, eps, options.head_norm_fit)
            attention = linearized(attention, head_norms)
        flat = statistics[layer].flat_inputs.double()
        flat = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], dim=1)
        moment = flat.T @ flat / flat.shape[0]
        distances = None
        if options.distance_aware:
            distances = attention_distances(attention, inputs, inv_freq)
            gains = rotation_gains(distances, inv_freq)
            position_loss = 1 - gains.abs() ** 2
        else:  # a pair that loses RoPE is read as if at distance 0, and every pair's position signal counts fully
            gains = torch.ones(counts.num_heads, counts.head_dim // 2, dtype=torch.complex128)
            position_loss = torch.ones(gains.shape, dtype=torch.float64)
        queries = to_complex(augmented(attention.q, attention.q_bias), counts.num_heads, counts.head_dim)
        keys = to_complex(augmented(attention.k, attention.k_bias), counts.num_kv_heads, counts.head_dim)
        basis = rope_basis(options.rope_method, queries, keys, moment, position_loss)
        sample = flat[torch.linspace(0, flat.shape[0] - 1, min(_LINEARIZATION_SAMPLE, flat.shape[0])).long()]
        calibrations.append(LayerCalibration(moment=moment, sample=sample, gains=gains, distances=distances,
                                             basis=basis, head_norms=head_norms))  # fmt: skip
        statistics[layer] = None  # free the layer's raw inputs
    return calibrations


def _without_head_norms(attention: AttentionWeights, calibration: LayerCalibration) -> AttentionWeights:
    """The layer as DeepseekV3 will hold it: per-head q/k norms (if any) replaced by their calibrated linear maps."""
    return attention if calibration.head_norms is None else linearized(attention, calibration.head_norms)


def _bias_tensor(context: ConversionContext, layer: int, part: str) -> str:
    fused = context.spec.fused_qkv and part in ("q_proj", "k_proj", "v_proj")
    return context.spec.tensor_name(layer, "qkv_proj" if fused else part, "bias")


def _output_format(context: ConversionContext, serving: bool, layers: list[AttentionWeights], rope_biases) -> OutputFormat:
    """Where the source's biases go: exact folds, or a refusal naming the tensor that cannot be carried."""
    if serving:
        for layer, attention in enumerate(layers):
            for part, bias, why in (
                ("q_proj", attention.q_bias, "a query bias changes each key's logit differently"),
                ("v_proj", attention.v_bias, "a value bias needs an o_proj bias"),
                ("o_proj", attention.o_bias, "an output bias needs an o_proj bias"),
            ):
                if _nonzero(bias):
                    raise KvshrinkError(
                        f"{_bias_tensor(context, layer, part)} is not zero and serving engines run DeepseekV3 "
                        f"without attention biases ({why}): pass --target transformers"
                    )
            if bool(rope_biases[layer].abs().max() > 0):
                raise KvshrinkError(
                    f"{_bias_tensor(context, layer, 'k_proj')} has a component on rotary pairs that keep RoPE, which "
                    "no bias-free serving layout carries: pass --target transformers"
                )
        return OutputFormat(interleave=True, latent_eps=deepseek.TRANSFORMERS_LATENT_EPS, attention_bias=False,
                            query_latent=False, drop_key_bias=True)  # fmt: skip
    has_bias = any(_nonzero(getattr(a, f"{p}_bias")) for a in layers for p in ("q", "k", "v", "o"))
    return OutputFormat(
        interleave=True, latent_eps=deepseek.TRANSFORMERS_LATENT_EPS, attention_bias=has_bias,
        query_latent=any(_nonzero(a.q_bias) for a in layers), drop_key_bias=False,
    )  # fmt: skip


class _CalibrationMemo:
    """One source's calibration, shared by the conversions to both targets (nothing in it depends on the target)."""

    def __init__(self) -> None:
        self.layers: list[LayerCalibration] | None = None

    def get(self, context: ConversionContext, options: MlaOptions, inv_freq: torch.Tensor) -> list[LayerCalibration]:
        if self.layers is None:
            self.layers = _calibrate(context, options, inv_freq)
        return self.layers


def _plan(context: ConversionContext, options: MlaOptions, memo: _CalibrationMemo) -> Rewrite:
    _refuse_unsupported(context, options.exact_only)
    serving = deepseek.serving_target(options.target)
    counts, config = context.counts, context.checkpoint.config
    inv_freq, rope_type, theta = deepseek.source_rope(config, counts.head_dim)
    if serving and rope_type != "default":
        raise KvshrinkError(
            f"the source's {rope_type} RoPE frequencies are not a geometric set, which is all serving engines' "
            "default RoPE can hold: pass --target transformers"
        )
    layers = [read_attention(context.checkpoint, context.spec, layer, counts) for layer in range(counts.num_layers)]
    has_bias = any(_nonzero(getattr(a, f"{p}_bias")) for a in layers for p in ("k", "v"))
    shape = resolve_shape(counts, options, serving, counts.hidden_size + (has_bias and not serving))
    calibrations = memo.get(context, options, inv_freq)
    layers = [_without_head_norms(attention, calibration) for attention, calibration in zip(layers, calibrations)]
    slots = choose_slots([c.basis for c in calibrations], shape.rope_dim // 2, geometric=serving)
    rope_biases = [rope_bias(a, c.basis, slots) for a, c in zip(layers, calibrations)]
    output = _output_format(context, serving, layers, rope_biases)
    del layers
    slot_frequencies = inv_freq[list(slots.frequency)]
    max_positions = int(config.get("max_position_embeddings") or 4096)
    if serving:
        rope_theta = deepseek.geometric_theta(theta, slots.step, shape.rope_dim, counts.head_dim)
        rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    else:
        rope_parameters = deepseek.longrope_parameters(theta, slot_frequencies, max_positions)
    source_eps = float(config.get("rms_norm_eps", 1e-6))
    target_config = deepseek.deepseek_config(
        config, kv_rank=shape.kv_rank, rope_dim=shape.rope_dim, nope_dim=shape.nope_dim, head_dim=counts.head_dim,
        rope_parameters=rope_parameters, interleave=output.interleave, attention_bias=output.attention_bias,
        q_lora_rank=counts.hidden_size + 1 if output.query_latent else None,
        rms_norm_eps=output.latent_eps if serving else source_eps,
    )  # fmt: skip
    bounds = [_input_norm_bound(context, layer, c.sample) for layer, c in enumerate(calibrations)]

    free_slots = choose_slots([c.basis for c in calibrations], shape.rope_dim // 2, geometric=False)

    def convert_layer(layer: int, attention: AttentionWeights) -> LayerOutput:
        attention = _without_head_norms(attention, calibrations[layer])
        tensors, report = convert_attention(
            attention, calibrations[layer], slots, shape, output, options.factorization, bounds[layer], inv_freq
        )
        if serving:  # the share of the rope-selection score default RoPE's geometric frequencies give up
            scores = calibrations[layer].basis.scores
            kept = {name: float(scores[list(chosen.frequency), list(chosen.rank)].sum() / scores.sum())
                    for name, chosen in (("free", free_slots), ("serving", slots))}  # fmt: skip
            report["serving_rope_score_cost"] = kept["free"] - kept["serving"]
        if calibrations[layer].head_norms is not None:
            report.update(calibrations[layer].head_norms.errors)
        prefix = f"{context.spec.layer_prefix.format(layer=layer)}self_attn."
        return LayerOutput({prefix + name: tensor for name, tensor in tensors.items()}, report)

    notes = []
    if calibrations[0].head_norms is not None:
        notes.append(
            f"approximate: {context.spec.model_type}'s per-head q/k RMSNorm is replaced by a linear map from each "
            f"layer's input to its normalized queries and keys, fitted on the calibration text ({options.head_norm_fit}"
            "; each layer's q_norm_rel_error / k_norm_rel_error is measured on held-out calibration tokens, next to "
            "every fit's, TransMLA's mean gain as *_mean_gain): uptrain the output, or pass --exact-only to refuse"
        )
    if serving and source_eps != output.latent_eps:
        notes.append(
            f"rms_norm_eps set from {source_eps:g} to {output.latent_eps:g}: transformers runs the latent norm at "
            "1e-6 and vLLM/SGLang at rms_norm_eps, so they must agree (the decoder norms barely notice)"
        )
    if not serving:
        notes.append("longrope with exact per-pair frequencies: vLLM and SGLang rewrite it to deepseek_yarn, "
                     "so this checkpoint is wrong there; use --target vllm to serve it")  # fmt: skip
    summary = {
        "target": options.target,
        "family_support": {"family": context.spec.model_type, **vars(context.spec.support("mla"))},
        "valid_engines": deepseek.valid_engines(options.target),
        "mla": {
            "kv_lora_rank": shape.kv_rank, "qk_rope_head_dim": shape.rope_dim, "qk_nope_head_dim": shape.nope_dim,
            "v_head_dim": counts.head_dim, "rope_method": options.rope_method,
            "factorization": options.factorization, "distance_aware": options.distance_aware,
            "kv_budget": options.kv_budget, "calibration_tokens": options.calibration_tokens,
            "head_norm_fit": options.head_norm_fit if calibrations[0].head_norms is not None else None,
            "rope_slots": [{"source_frequency": j, "component": n, "inv_freq": float(f)}
                           for j, n, f in zip(slots.frequency, slots.rank, slot_frequencies)],
        },
        "notes": notes,
    }  # fmt: skip
    method = f"mla/{options.rope_method}+{options.factorization}" + ("+distance" if options.distance_aware else "")
    return Rewrite(method=method, config=target_config, convert_layer=convert_layer, summary=summary,
                   split_rows=deepseek.split_gate_up(context.spec, config))


OTHER_TARGET = {"vllm": "transformers", "sglang": "transformers", "transformers": "vllm"}


def _check_both_targets(
    source: Path, converted: Path, *, options: MlaOptions, memo: _CalibrationMemo, text: str, check_tokens: int,
    allow_pickle: bool,
) -> dict[str, Any]:
    """Source vs converted perplexity, plus the other target's: what the serving constraint costs (or saves).

    The other target is converted from the same calibration into a scratch folder inside the staging output, so
    it is gone on success, on error and on Ctrl-C alike; when that target refuses this source, the reason is
    recorded instead.
    """
    result = compare_perplexity(source, converted, text=text, max_tokens=check_tokens, progress=options.progress)
    other = OTHER_TARGET[options.target]
    entry: dict[str, Any] = {"target": other, "valid_engines": deepseek.valid_engines(other)}
    with tempfile.TemporaryDirectory(prefix=".other-target-", dir=converted) as scratch:
        other_out = Path(scratch) / "model"
        try:
            run_conversion(
                source, other_out, partial(_plan, options=replace(options, target=other), memo=memo),
                allow_pickle=allow_pickle, progress=options.progress,
            )  # fmt: skip
        except KvshrinkError as refusal:
            entry["refused"] = str(refusal)
        else:
            windows = token_windows(load_tokenizer(source), text, check_tokens, result["window"])
            entry["perplexity"] = folder_perplexity(other_out, windows, f"check {other}", options.progress)
            if other == "transformers":
                serving, exact = result["converted_perplexity"], entry["perplexity"]
            else:
                serving, exact = entry["perplexity"], result["converted_perplexity"]
            result["serving_perplexity_cost"] = round(serving - exact, 4)
    result["other_target"] = entry
    return result


def mha_to_mla(
    source: str | Path,
    out: str | Path,
    *,
    kv_rank: int | str | None = None,
    rope_dim: int | str | None = None,
    kv_budget: float | None = None,
    mla_shape: str | None = None,
    rope_method: str = "rotate",
    factorization: str = "balanced",
    distance_aware: bool = True,
    target: str = "vllm",
    calibration: str | Path | None = None,
    calibration_tokens: int = 8192,
    check: bool = True,
    check_tokens: int = 2048,
    overwrite: bool = False,
    out_shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    progress: bool = True,
    exact_only: bool = False,
    head_norm_fit: str = "least-squares",
) -> dict[str, Any]:
    """Convert the attention of `source` to DeepSeek MLA and write a DeepseekV3ForCausalLM checkpoint to `out`.

    Size: exactly one of `kv_rank` (int or 'full'), `kv_budget` (fraction of the source KV bytes; picks the rank
    for the rope dim) or `mla_shape` ('512+64': rank + rope dim). `rope_dim` is an even int or 'all' (every
    rotary pair of every KV head: with kv_rank='full' and target='transformers' the output reproduces the source).
    `rope_method` 'rotate' or 'partial', `factorization` 'balanced', 'activation', 'output' or 'weight',
    `distance_aware`: see `kvshrink.convert.mla`. `target` 'vllm' (alias 'sglang') writes a checkpoint valid in
    vLLM, SGLang and transformers; 'transformers' keeps exact per-pair frequencies, valid in transformers only.
    `check` scores the source, the output and the other target (built from the same calibration in a scratch
    folder, then deleted) on `check_tokens` calibration tokens. `exact_only` refuses families the support matrix
    marks approximate (Qwen3's per-head q/k norms, otherwise linearized by calibration); `head_norm_fit` is how
    they are linearized: 'least-squares' or TransMLA's 'mean-gain' (see `kvshrink.convert.mla.head_norms`). Returns the report also written to OUT/kvshrink_report.json.
    """
    if rope_method not in ROPE_METHODS:
        raise KvshrinkError(f"unknown rope method {rope_method!r}: choose one of {', '.join(ROPE_METHODS)}")
    if factorization not in FACTORIZATIONS:
        raise KvshrinkError(f"unknown factorization {factorization!r}: choose one of {', '.join(FACTORIZATIONS)}")
    deepseek.serving_target(target)
    if head_norm_fit not in HEAD_NORM_FITS:
        raise KvshrinkError(f"unknown head norm fit {head_norm_fit!r}: choose one of {', '.join(HEAD_NORM_FITS)}")
    if calibration_tokens < CALIBRATION_WINDOW:
        raise KvshrinkError(
            f"--calibration-tokens {calibration_tokens} is less than one {CALIBRATION_WINDOW}-token window: pass at "
            f"least {CALIBRATION_WINDOW}"
        )
    options = MlaOptions(
        kv_rank=kv_rank, rope_dim=rope_dim, kv_budget=kv_budget, mla_shape=mla_shape, rope_method=rope_method,
        factorization=factorization, distance_aware=distance_aware, target=target, calibration=calibration,
        calibration_tokens=calibration_tokens, progress=progress, exact_only=exact_only,
        head_norm_fit=head_norm_fit,
    )  # fmt: skip
    memo = _CalibrationMemo()
    checker = None
    if check:
        checker = partial(
            _check_both_targets, options=options, memo=memo, text=calibration_text(calibration),
            check_tokens=check_tokens, allow_pickle=allow_pickle,
        )  # fmt: skip
    return run_conversion(
        source, out, partial(_plan, options=options, memo=memo), overwrite=overwrite, out_shard_size=out_shard_size,
        allow_pickle=allow_pickle, check=checker, progress=progress,
    )  # fmt: skip
