"""`convert mha-to-mla`: MHA/GQA -> DeepSeek MLA that stock transformers loads as DeepseekV3ForCausalLM.

A method of the conversion driver (`driver.py`), one decoder layer in memory at a time: refuse what DeepseekV3
cannot hold -> calibrate, pass 1: the source reads calibration text layer by layer and each layer leaves only a
small summary (its rope basis, its attention over distances) -> plan: the shared rope key's slots are chosen once
from all summaries (their frequencies are one table), then the shape, layout and config of the target (and of the
other target, which the check scores) -> pass 2, per layer: its DeepseekV3 attention (`mla.layer`) for each
target, which the driver fits, writes and checks like every other method.
MLP, norms and embeddings are copied byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from kvshrink.convert import engines
from kvshrink.convert.attention import AttentionBiases, AttentionWeights, read_attention, read_biases
from kvshrink.convert.calibration import AttentionInputs, Calibration
from kvshrink.convert.driver import LayerResult, Plan, TargetPlan, calibration_inputs, convert
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.frame import Conversion
from kvshrink.convert.layers import StockModel
from kvshrink.convert.maths import augmented, augmented_inputs, augmented_moment, to_complex
from kvshrink.convert.mla import deepseek
from kvshrink.convert.mla.distance import attention_distances, rotation_gains
from kvshrink.convert.mla.head_norms import HeadNormFit, fit_head_norms, linearized
from kvshrink.convert.mla.layer import LayerCalibration, OutputFormat, convert_attention, rope_bias
from kvshrink.convert.mla.rope import RopeBasis, RopeSlots, choose_slots, rope_basis
from kvshrink.convert.mla.shapes import MlaShape, resolve_shape
from kvshrink.convert.mla.yarn import YarnFit, fit_yarn
from kvshrink.convert.options import MlaOptions

_LINEARIZATION_SAMPLE = 2048
OTHER_TARGET = {"vllm": "transformers", "sglang": "transformers", "transformers": "vllm"}


def _refuse_unsupported(conversion: Conversion, exact_only: bool) -> None:
    config, spec = conversion.checkpoint.config, conversion.spec
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
    first_attention = conversion.spec.tensor_name(0, "qkv_proj" if spec.fused_qkv else "q_proj")
    if conversion.checkpoint.dtype(first_attention) == torch.float16:
        raise KvshrinkError(
            "the source is float16, which cannot hold the linearized latent (its tiny values are subnormal in "
            "float16): save the source as bfloat16 or float32 first, e.g. "
            "model.to(torch.bfloat16).save_pretrained(dir), and convert that"
        )


def _nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.abs().max() > 0)


def _input_norm_bound(conversion: Conversion, layer: int, sample: torch.Tensor) -> float:
    """Largest possible ‖x̃‖ of the layer input: an RMSNorm output, ‖x‖ ≤ sqrt(n)·max|weight| (plus the 1 of x̃)."""
    name = f"{conversion.spec.layer_prefix.format(layer=layer)}input_layernorm.weight"
    if name in conversion.checkpoint:
        weight = conversion.checkpoint.tensor(name).float()
        largest = float(weight.abs().max()) * math.sqrt(conversion.counts.hidden_size)
    else:  # no visible norm weight: the calibration maximum with a wide margin
        largest = 100 * float(sample[:, :-1].norm(dim=1).max())
    return math.sqrt(largest**2 + 1)


@dataclass
class RopeSummary:
    """What pass 1 keeps of a layer: enough to choose the model's rope slots."""

    basis: RopeBasis
    gains: torch.Tensor  # γ [H, P] complex
    distances: torch.Tensor | None  # the source's attention per distance [H, T]; None when distance is ignored


def _head_norms(conversion: Conversion, attention: AttentionWeights, inputs: AttentionInputs,
                options: MlaOptions) -> HeadNormFit | None:
    """The calibrated linear maps that stand in for per-head q/k norms (Qwen3), fitted on this layer's inputs."""
    if attention.q_norm is None and attention.k_norm is None:
        return None
    eps = conversion.rms_norm_eps
    return fit_head_norms(attention, inputs.flat_inputs, eps, options.head_norm_fit)


def _summarize_layer(attention: AttentionWeights, inputs: AttentionInputs, options: MlaOptions,
                     inv_freq: torch.Tensor) -> RopeSummary:
    """`attention` as DeepseekV3 will hold it (head norms already linearized)."""
    heads, d = attention.num_heads, attention.head_dim
    moment = augmented_moment(augmented_inputs(inputs.flat_inputs))
    distances = None
    if options.distance_aware:
        distances = attention_distances(attention, inputs.inputs, inv_freq)
        gains = rotation_gains(distances, inv_freq)
        position_loss = 1 - gains.abs() ** 2
    else:  # a pair that loses RoPE is read as if at distance 0, and every pair's position signal counts fully
        gains = torch.ones(heads, d // 2, dtype=torch.complex128)
        position_loss = torch.ones(gains.shape, dtype=torch.float64)
    queries = to_complex(augmented(attention.q, attention.q_bias), d)
    keys = to_complex(augmented(attention.k, attention.k_bias), d)
    return RopeSummary(rope_basis(options.rope_method, queries, keys, moment, position_loss), gains, distances)


def _summarize(conversion: Conversion, options: MlaOptions, windows: list[torch.Tensor],
               inv_freq: torch.Tensor) -> list[RopeSummary]:
    """Pass 1: the source reads the calibration windows one layer at a time; each layer leaves its summary."""
    calibration = Calibration(conversion.source_model(), conversion.spec, windows)
    summaries = []
    for layer in tqdm(
        range(conversion.counts.num_layers), desc="calibrating", unit="layer", disable=not options.progress
    ):
        inputs = calibration.attention_inputs(layer)
        attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)  # after it ran
        head_norms = _head_norms(conversion, attention, inputs, options)
        if head_norms is not None:
            attention = linearized(attention, head_norms)
        summaries.append(_summarize_layer(attention, inputs, options, inv_freq))
        del attention, inputs  # before the next materialized layer
        calibration.advance(layer)
    return summaries


def _layer_calibration(
    inputs: AttentionInputs, summary: RopeSummary, head_norms: HeadNormFit | None
) -> LayerCalibration:
    """Pass 2: the layer's input moment and a sample of its inputs, with what pass 1 decided."""
    flat = augmented_inputs(inputs.flat_inputs)
    sample = flat[torch.linspace(0, flat.shape[0] - 1, min(_LINEARIZATION_SAMPLE, flat.shape[0])).long()]
    return LayerCalibration(moment=augmented_moment(flat), sample=sample, gains=summary.gains,
                            distances=summary.distances, basis=summary.basis, head_norms=head_norms)


def _bias_tensor(conversion: Conversion, layer: int, part: str) -> str:
    fused = conversion.spec.fused_qkv and part in ("q_proj", "k_proj", "v_proj")
    return conversion.spec.tensor_name(layer, "qkv_proj" if fused else part, "bias")


def _output_format(
    conversion: Conversion, serving: bool, layers: list[AttentionBiases], rope_biases, exact_biases: bool
) -> OutputFormat:
    """Where the source's biases go: exact folds, a refit into the weights (serving layout), or a refusal naming the
    tensor that cannot be carried."""
    if serving:
        for layer, attention in enumerate(layers):
            for part, bias, why in (
                ("q_proj", attention.q_bias, "a query bias changes each key's logit differently"),
                ("v_proj", attention.v_bias, "a value bias needs an o_proj bias"),
                ("o_proj", attention.o_bias, "an output bias needs an o_proj bias"),
            ):
                if _nonzero(bias) and (exact_biases or part == "o_proj"):
                    raise KvshrinkError(
                        f"{_bias_tensor(conversion, layer, part)} is not zero and serving engines run DeepseekV3 "
                        f"without attention biases ({why}): pass --target transformers"
                        + ("" if part == "o_proj" else ", or drop --exact-biases to refit it into the weights")
                    )
            if exact_biases and bool(rope_biases[layer].abs().max() > 0):
                raise KvshrinkError(
                    f"{_bias_tensor(conversion, layer, 'k_proj')} has a component on rotary pairs that keep RoPE, "
                    "which no bias-free serving layout carries: pass --target transformers, or drop --exact-biases to "
                    "refit it into the weights"
                )
        refit = any(_nonzero(a.q_bias) or _nonzero(a.v_bias) for a in layers) or any(
            bool(b.abs().max() > 0) for b in rope_biases)
        return OutputFormat(interleave=True, latent_eps=deepseek.TRANSFORMERS_LATENT_EPS, attention_bias=False,
                            query_latent=False, drop_key_bias=True, refit_biases=refit)
    has_bias = any(_nonzero(getattr(a, f"{p}_bias")) for a in layers for p in ("q", "k", "v", "o"))
    return OutputFormat(
        interleave=True, latent_eps=deepseek.TRANSFORMERS_LATENT_EPS, attention_bias=has_bias,
        query_latent=any(_nonzero(a.q_bias) for a in layers), drop_key_bias=False,
    )


def _notes(conversion: Conversion, options: MlaOptions, rules: engines.EngineRules | None, shape: MlaShape,
           output: OutputFormat, yarn: YarnFit | None) -> list[str]:
    """What the report and summary say is approximate or adjusted about this target."""
    notes = []
    if conversion.spec.has_head_norms:
        notes.append(
            f"approximate: {conversion.spec.model_type}'s per-head q/k RMSNorm is replaced by a linear map from each "
            f"layer's input to its normalized queries and keys, fitted on the calibration text ({options.head_norm_fit}"
            "; each layer's q_norm_rel_error / k_norm_rel_error is measured on held-out calibration tokens, next to "
            "every fit's, TransMLA's mean gain as *_mean_gain): uptrain the output, or pass --exact-only to refuse"
        )
    if yarn is not None:
        notes.append(f"approximate: llama3 RoPE written as deepseek_yarn; the largest per-slot frequency error is "
                     f"{float(yarn.relative_error.max()):.1%} (mla.rope_frequency_error)")
    if output.refit_biases:
        notes.append("approximate: serving engines run no attention biases, so the source's query, value and rope-key "
                     "biases were refit into the weights on the calibration text (each layer's bias_refit_error); "
                     "--exact-biases refuses instead")
    if options.kv_budget is not None and rules is not None and rules.shapes is not None:
        notes.append(f"--kv-budget {options.kv_budget} snapped to {shape.kv_rank}+{shape.rope_dim}, the largest "
                     f"shape {rules.name} runs within it")
    return notes


@dataclass
class MlaPlan:
    """One target's layout: everything model-wide, decided before any layer is written."""

    target: str
    shape: MlaShape
    output: OutputFormat
    slots: RopeSlots
    free_slots: RopeSlots  # the slots without the serving constraint, to report what it costs
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def serving(self) -> bool:
        return engines.target_rules(self.target) is not None


def _biases(conversion: Conversion) -> list[AttentionBiases]:
    counts = conversion.counts
    return [read_biases(conversion.checkpoint, conversion.spec, layer, counts) for layer in range(counts.num_layers)]


def _shape(conversion: Conversion, options: MlaOptions, target: str, biases: list[AttentionBiases]) -> MlaShape:
    """The target's shape, or the refusal of a rope type or size it cannot hold (decided before any calibration)."""
    rules = engines.target_rules(target)  # None for transformers
    counts = conversion.counts
    rope_type = conversion.rope.rope_type
    if rules is not None and rope_type not in ("default", "llama3"):
        raise KvshrinkError(
            f"the source's {rope_type} RoPE frequencies are neither a geometric set nor llama3's, which is what "
            "serving engines' default and deepseek_yarn RoPE can hold: pass --target transformers"
        )
    has_bias = any(_nonzero(getattr(a, f"{p}_bias")) for a in biases for p in ("k", "v"))
    return resolve_shape(counts, options, rules, counts.hidden_size + (has_bias and rules is None))


def _rope_parameters(conversion: Conversion, serving: bool, shape: MlaShape, slots: RopeSlots,
                     slot_frequencies: torch.Tensor) -> tuple[dict[str, Any], YarnFit | None]:
    """The target's rope_parameters: default RoPE at a geometric theta (llama3 sources: the deepseek_yarn table
    closest to the slots' frequencies, see `mla.yarn`) for the serving layout, exact longrope otherwise."""
    config, head_dim = conversion.checkpoint.config, conversion.counts.head_dim
    rope_type, theta = conversion.rope.rope_type, conversion.rope.theta
    if not serving:
        max_positions = int(config.get("max_position_embeddings") or 4096)
        return deepseek.longrope_parameters(theta, slot_frequencies, max_positions), None
    rope_theta = deepseek.geometric_theta(theta, slots.step, shape.rope_dim, head_dim)
    if rope_type != "llama3":
        return {"rope_type": "default", "rope_theta": rope_theta}, None
    llama3 = config.get("rope_parameters") or config.get("rope_scaling") or {}
    yarn = fit_yarn(slot_frequencies, rope_theta, shape.rope_dim, float(llama3["factor"]),
                    int(llama3["original_max_position_embeddings"]))
    return yarn.parameters, yarn


def _target_config(conversion: Conversion, shape: MlaShape, output: OutputFormat, rope_parameters: dict[str, Any],
                   serving: bool) -> dict[str, Any]:
    config = conversion.checkpoint.config
    return deepseek.deepseek_config(
        config, kv_rank=shape.kv_rank, rope_dim=shape.rope_dim, nope_dim=shape.nope_dim,
        head_dim=conversion.counts.head_dim, rope_parameters=rope_parameters, interleave=output.interleave,
        attention_bias=output.attention_bias,
        q_lora_rank=conversion.counts.hidden_size + 1 if output.query_latent else None,
        rms_norm_eps=output.latent_eps if serving else conversion.rms_norm_eps,
    )


def _sized_targets(conversion: Conversion, options: MlaOptions, biases: list[AttentionBiases]) -> list[StockModel]:
    """What will be written, sized before calibrating: the output and, with --check, the other target's scratch
    copy (a shape the output's target cannot hold is refused here). Tensor sizes follow from the shape and the
    source's biases alone; calibration only chooses which RoPE frequencies the slots carry, so any rope_parameters
    size the skeleton."""
    targets = [options.target] + ([OTHER_TARGET[options.target]] if options.check else [])
    derived = deepseek.split_gate_up(conversion.spec, conversion.checkpoint.config)
    models, main_shape = [], None
    for target in targets:
        serving = engines.target_rules(target) is not None
        try:
            shape = _shape(conversion, _target_options(options, target, main_shape), target, biases)
            output = _output_format(conversion, serving, biases, rope_biases=[], exact_biases=False)
        except KvshrinkError:
            if main_shape is None:
                raise
            continue  # the other target refuses this source: the check reports why, and nothing is written for it
        main_shape = main_shape or shape
        sizing_rope = {"rope_type": "default", "rope_theta": 10000.0}
        models.append(
            conversion.target_model(_target_config(conversion, shape, output, sizing_rope, serving), derived)
        )
    return models


def _target_options(options: MlaOptions, target: str, main_shape: MlaShape | None) -> MlaOptions:
    """The options a target is planned with: the user's, except that the other target checked against the serving
    one keeps the main shape (so the difference is the serving layout alone)."""
    if target == options.target or target != "transformers" or main_shape is None:
        return options
    return options.model_copy(update={"kv_rank": None, "kv_budget": None, "rope_dim": None,
                                      "mla_shape": f"{main_shape.kv_rank}+{main_shape.rope_dim}"})


def _plan(conversion: Conversion, options: MlaOptions, target: str, summaries: list[RopeSummary]) -> MlaPlan:
    rules = engines.target_rules(target)
    serving = rules is not None
    counts = conversion.counts
    inv_freq = conversion.rope.inv_freq
    layers = _biases(conversion)
    shape = _shape(conversion, options, target, layers)
    bases = [summary.basis for summary in summaries]
    slots = choose_slots(bases, shape.rope_dim // 2, geometric=serving)
    rope_biases = [rope_bias(a.k_bias, basis, slots, counts.head_dim)
                   for a, basis in zip(layers, bases)]
    output = _output_format(conversion, serving, layers, rope_biases, options.exact_biases)
    slot_frequencies = inv_freq[list(slots.frequency)]
    rope_parameters, yarn = _rope_parameters(conversion, serving, shape, slots, slot_frequencies)
    source_eps = conversion.rms_norm_eps
    target_config = _target_config(conversion, shape, output, rope_parameters, serving)
    free_slots = choose_slots(bases, shape.rope_dim // 2, geometric=False)

    notes = _notes(conversion, options, rules, shape, output, yarn)
    if serving and source_eps != output.latent_eps:
        notes.append(
            f"rms_norm_eps set from {source_eps:g} to {output.latent_eps:g}: transformers runs the latent norm at "
            "1e-6 and vLLM/SGLang at rms_norm_eps, so they must agree (the decoder norms barely notice)"
        )
    if not serving:
        notes.append("longrope with exact per-pair frequencies: vLLM and SGLang rewrite it to deepseek_yarn, "
                     "so this checkpoint is wrong there; use --target vllm to serve it")
    valid, excluded = engines.valid_engines(target_config)
    if rules is not None and rules.name in excluded:  # the shape and layout rules above should make this impossible
        raise KvshrinkError(f"--target {rules.name} would write a checkpoint it cannot run ({excluded[rules.name]}): "
                            "pass --target transformers")
    summary = {
        "target": target,
        "valid_engines": valid,
        "excluded_engines": excluded,
        "mla": {
            "kv_lora_rank": shape.kv_rank, "qk_rope_head_dim": shape.rope_dim, "qk_nope_head_dim": shape.nope_dim,
            "v_head_dim": counts.head_dim, "rope_method": options.rope_method,
            "factorization": options.factorization, "distance_aware": options.distance_aware,
            "kv_budget": options.kv_budget, "calibration_tokens": options.calibration_tokens,
            "head_norm_fit": options.head_norm_fit if conversion.spec.has_head_norms else None,
            "rope_slots": [{"source_frequency": j, "component": n, "inv_freq": float(f)}
                           for j, n, f in zip(slots.frequency, slots.rank, slot_frequencies)],
            **({"rope_frequency_error": yarn.relative_error.tolist()} if yarn is not None else {}),
        },
        "notes": notes,
    }
    return MlaPlan(target, shape, output, slots, free_slots, target_config, summary)


def _convert_layer(conversion: Conversion, plan: MlaPlan, options: MlaOptions, layer: int, attention: AttentionWeights,
                   calibration: LayerCalibration) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One layer's DeepseekV3 attention tensors (full output names) and report entry under `plan`."""
    inv_freq = conversion.rope.inv_freq
    bound = _input_norm_bound(conversion, layer, calibration.sample)
    tensors, report = convert_attention(
        attention, calibration, plan.slots, plan.shape, plan.output, options.factorization, bound, inv_freq
    )
    if plan.serving:  # the share of the rope-selection score default RoPE's geometric frequencies give up
        scores = calibration.basis.scores
        kept = {name: float(scores[list(chosen.frequency), list(chosen.rank)].sum() / scores.sum())
                for name, chosen in (("free", plan.free_slots), ("serving", plan.slots))}
        report["serving_rope_score_cost"] = kept["free"] - kept["serving"]
    if calibration.head_norms is not None:
        report.update(calibration.head_norms.errors)
    prefix = f"{conversion.spec.layer_prefix.format(layer=layer)}self_attn."
    return {prefix + name: tensor for name, tensor in tensors.items()}, {"layer": layer, **report}


def _method(options: MlaOptions) -> str:
    return f"mla/{options.rope_method}+{options.factorization}" + ("+distance" if options.distance_aware else "")


def _other_target(
    conversion: Conversion, options: MlaOptions, main: MlaPlan, summaries: list[RopeSummary]
) -> MlaPlan | str:
    """The other target's plan, which the check scores too (what the serving constraint costs), or the reason
    that target refuses this source."""
    other = OTHER_TARGET[options.target]
    try:
        return _plan(conversion, _target_options(options, other, main.shape), other, summaries)
    except KvshrinkError as refusal:
        return str(refusal)


@dataclass
class MlaCalibration:
    """Pass 1's value: the calibration windows and what each layer left to plan from."""

    windows: list[torch.Tensor]
    summaries: list[RopeSummary]


@dataclass(frozen=True)
class MlaMethod:
    """MHA/GQA -> DeepSeek MLA, as a method of the conversion driver; with the check on, the other target (see
    `OTHER_TARGET`) is built from the same calibration and scored beside the output."""

    options: MlaOptions
    support: ClassVar[str] = "mla"
    # DeepseekV3 attention is a new module: its o_proj, even where copied from the source, is fitted with the rest
    fits_every_tensor: ClassVar[bool] = True

    def refuse(self, conversion: Conversion) -> None:
        _refuse_unsupported(conversion, self.options.exact_only)
        deepseek.refuse_uncopyable_rope(conversion.rope)
        conversion.require_tokenizer("mha-to-mla calibrates on text", "")

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        return _sized_targets(conversion, self.options, _biases(conversion))  # refuses a shape the target cannot hold

    def calibrate(self, conversion: Conversion) -> MlaCalibration:
        windows = calibration_inputs(conversion, self.options)
        return MlaCalibration(windows, _summarize(conversion, self.options, windows, conversion.rope.inv_freq))

    def plan(self, conversion: Conversion, calibration: MlaCalibration) -> Plan:
        """The output's plan, and the other target's when the check scores it. Pass 2 reads the windows again from
        layer 0 of the source."""
        options, summaries = self.options, calibration.summaries
        main = _plan(conversion, options, options.target, summaries)
        targets = [TargetPlan("converted", main.config, main)]
        refusals = {}
        other = _other_target(conversion, options, main, summaries) if options.check else None
        if isinstance(other, MlaPlan):
            targets.append(TargetPlan("other", other.config, other))
        elif other is not None:
            refusals["other"] = other
        return Plan(
            method=_method(options), targets=targets, summary=main.summary,
            calibration=Calibration(conversion.source_model(), conversion.spec, calibration.windows),
            derived=deepseek.split_gate_up(conversion.spec, conversion.checkpoint.config),
            layer_summaries=summaries, scored_refusals=refusals,
        )

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int,
                      inputs: AttentionInputs) -> list[LayerResult]:
        """The layer's DeepseekV3 attention under each target's plan (the driver fits and writes them)."""
        attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)  # after it ran
        head_norms = _head_norms(conversion, attention, inputs, self.options)
        layer_calibration = _layer_calibration(inputs, plan.layer_summaries[layer], head_norms)
        if head_norms is not None:
            attention = linearized(attention, head_norms)
        return [_convert_layer(conversion, target.layout, self.options, layer, attention, layer_calibration)
                for target in plan.targets]

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        """The other target's perplexity (or why it refused) in its own entry, and what serving costs."""
        entry: dict[str, Any] = {"target": OTHER_TARGET[self.options.target]}
        if "other" in plan.scored_refusals:
            entry["refused"] = plan.scored_refusals["other"]
        else:
            other = plan.targets[1].layout
            entry["valid_engines"] = other.summary["valid_engines"]
            entry["perplexity"] = check.pop("other_perplexity")
            serving, exact = check["converted_perplexity"], entry["perplexity"]
            if other.serving:
                serving, exact = exact, serving
            check["serving_perplexity_cost"] = round(serving - exact, 4)
        check["other_target"] = entry
        return check


def mha_to_mla(source: str | Path, out: str | Path, options: MlaOptions) -> dict[str, Any]:
    """Convert the attention of `source` to DeepSeek MLA and write a DeepseekV3ForCausalLM checkpoint to `out`.

    Size: exactly one of `kv_rank` (int or 'full'), `kv_budget` (fraction of the source KV bytes; picks the rank
    for the rope dim) or `mla_shape` ('512+64': rank + rope dim). `rope_dim` is an even int or 'all' (every
    rotary pair of every KV head: with kv_rank='full' and target='transformers' the output reproduces the source).
    `target` 'vllm' writes only what vLLM runs (512+64 or 256+64; a budget snaps down to one), valid in vLLM, SGLang
    and transformers; 'sglang' the same layout at any shape; 'transformers' any shape with exact per-pair
    frequencies, valid in transformers only (`kvshrink.convert.engines`). `exact_biases` refuses query, value or
    rope-key biases the serving layout could only approximate (by default they are refit into the weights).
    `check` scores the source, the output and the other target (built from the same calibration in a scratch
    folder, then deleted). See `MlaOptions` for the rest. Returns the report also written to
    OUT/kvshrink_report.json.
    """
    return convert(source, out, MlaMethod(options))
