"""`convert add-linear-attention`: chosen layers become Mamba-2 mixers (a fixed-size state instead of a KV cache),
initialized from their own attention, in the stock class GraniteMoeHybridForCausalLM.

A method of the conversion driver (`driver.py`), one decoder layer in memory at a time: refuse what the class cannot
hold exactly -> calibrate, pass 1: the source reads calibration text layer by layer and each candidate layer's
closed-form mixer (`linear.mamba2`) is calibrated there (forgetting rates, output scales) and its output error measured
-> plan: the layers to linearize (those whose mixer changes the residual stream least, or evenly spaced) and the
hybrid config -> pass 2, per layer: the mixer's tensors (which the driver fits to the source attention's output) or the
attention's, unchanged -> check -> report.

Why GraniteMoeHybrid holds a Llama-family decoder exactly (transformers 5.23,
models/granitemoehybrid/modeling_granitemoehybrid.py): with num_local_experts 0 only shared_mlp runs
(GraniteMoeHybridDecoderLayer.__init__ and forward), an act(gate) * up MLP whose input_linear is [gate_proj; up_proj]
(GraniteMoeHybridMLP); attention scales logits by attention_multiplier (GraniteMoeHybridAttention: scaling), here
head_dim^-0.5, and applies full-width rotate-half RoPE when position_embedding_type is "rope"; embedding, residual and
logits multipliers of 1 are Llama's identities. Tests check the logits with no layer linearized against the source's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from kvshrink.convert.attention import AttentionWeights, attention_tensors, read_attention
from kvshrink.convert.calibration import AttentionInputs, Calibration
from kvshrink.convert.driver import LayerResult, Plan, TargetPlan, calibration_inputs, convert
from kvshrink.convert.engines import class_engines
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.fitting import AttentionRunner
from kvshrink.convert.frame import ALL_ROWS, Conversion, Derived, zero_attention_biases
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_at_context, recurrent_state_bytes
from kvshrink.convert.layers import AttentionTables, StockModel
from kvshrink.convert.linear import mamba2
from kvshrink.convert.linear.mamba2 import LayerSample, MixerInit
from kvshrink.convert.maths import standardized_rope_parameters
from kvshrink.convert.options import LinearAttentionOptions, linear_layer_request

CLOSED_FORM_WINDOWS = 8  # calibration windows the closed form is chosen and measured on
MIXER = "mamba"
_CARRIED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "hidden_act", "initializer_range", "attention_dropout",
)


def _requested(conversion: Conversion, options: LinearAttentionOptions) -> float | list[int]:
    request, layers = linear_layer_request(options.linear_layers), conversion.counts.num_layers
    if isinstance(request, list) and (max(request) >= layers or len(request) == layers):
        raise KvshrinkError(
            f"--linear-layers {options.linear_layers} names " + (
                f"layer {max(request)}, but the source has layers 0-{layers - 1}" if max(request) >= layers
                else "every layer, but generation needs one attention layer") + ": choose among the others"
        )
    return request


def _linear_count(conversion: Conversion, request: float | list[int]) -> int:
    layers = conversion.counts.num_layers
    return len(request) if isinstance(request, list) else min(round(request * layers), layers - 1)


def _refuse(conversion: Conversion, options: LinearAttentionOptions) -> None:
    """Refuse what GraniteMoeHybrid cannot hold exactly, before anything is read or written."""
    config, counts, spec = conversion.checkpoint.config, conversion.counts, conversion.spec
    spec.require("linear")
    request = _requested(conversion, options)
    window = config.get("sliding_window")
    window_used = config.get(spec.sliding_window_switch, False) if spec.sliding_window_switch else True
    context = config.get("max_position_embeddings")
    if window and window_used and (context is None or int(window) < int(context)):
        raise KvshrinkError(
            f"the source attends within a sliding window of {window} tokens, which GraniteMoeHybrid's attention "
            "cannot: convert a model with full attention (add-sliding-window after, on the output, is refused too)"
        )
    if (counts.num_heads * counts.head_dim) % counts.hidden_size:
        raise KvshrinkError(
            f"{counts.num_heads} heads x {counts.head_dim} dims is not a whole multiple of hidden size "
            f"{counts.hidden_size}, which a Mamba-2 mixer's width (mamba_expand x hidden) must be: this source cannot "
            "be linearized"
        )
    if config.get("mlp_bias") or conversion.rope.fraction != 1.0:
        raise KvshrinkError("the source's MLP has biases or its RoPE covers part of each head, which GraniteMoeHybrid "
                            "cannot hold: convert a Llama-layout model")
    if _linear_count(conversion, request):
        conversion.require_tokenizer("the linear layers are calibrated on text", "--linear-layers 0")


def _layer_types(layers: int, linear: list[int]) -> list[str]:
    # the legacy spelling: vLLM (to v0.25.1) and SGLang index layer_types by it; transformers reads both
    return ["mamba" if index in linear else "attention" for index in range(layers)]


def _hybrid_config(conversion: Conversion, linear: list[int]) -> dict[str, Any]:
    """The source's model-wide settings in GraniteMoeHybridConfig, layers in `linear` as Mamba-2 mixers."""
    from transformers import GraniteMoeHybridConfig

    source, counts = conversion.checkpoint.config, conversion.counts
    carried = {key: copy.deepcopy(source[key]) for key in _CARRIED if source.get(key) is not None}
    has_bias = any(name.endswith(".bias") and ".self_attn." in name for name in conversion.checkpoint.names)
    config = GraniteMoeHybridConfig(
        **carried, rope_parameters=standardized_rope_parameters(source), num_local_experts=0,
        shared_intermediate_size=int(source["intermediate_size"]),
        intermediate_size=int(source["intermediate_size"]), position_embedding_type="rope",
        attention_multiplier=counts.head_dim**-0.5, embedding_multiplier=1.0, residual_multiplier=1.0,
        logits_scaling=1.0, attention_bias=has_bias, layer_types=_layer_types(counts.num_layers, linear),
        **mamba2.mamba_config(counts.num_heads, counts.head_dim, counts.hidden_size),
    ).to_dict()
    # the source's special tokens as they are (None included: GraniteMoeHybridConfig would fill in Granite's ids)
    config.update({key: source.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    config.update(head_dim=counts.head_dim, layer_types=_layer_types(counts.num_layers, linear),
                  architectures=["GraniteMoeHybridForCausalLM"],
                  dtype=source.get("dtype") or source.get("torch_dtype") or "float32")
    config.pop("transformers_version", None)
    return config


def _derived(conversion: Conversion, linear: list[int]) -> Derived:
    """GraniteMoeHybrid's tensors made of the source's rows, exactly: the dense MLP's input_linear = [gate_proj;
    up_proj] (Phi-3's gate_up_proj as it is, [gate; up] too), output_linear = down_proj; and in the layers that keep
    attention, the class's separate q/k/v projections from a fused qkv_proj's row blocks (Phi-3)."""
    spec, counts, derived = conversion.spec, conversion.counts, {}
    mlp = {"input_linear": (spec.fused_gate_up,) if spec.fused_gate_up else ("mlp.gate_proj", "mlp.up_proj"),
           "output_linear": ("mlp.down_proj",)}
    query, key = counts.num_heads * counts.head_dim, counts.num_kv_heads * counts.head_dim
    rows = {"q_proj": slice(0, query), "k_proj": slice(query, query + key),
            "v_proj": slice(query + key, query + 2 * key)}
    for layer in range(counts.num_layers):
        prefix = spec.layer_prefix.format(layer=layer)
        for target, parts in mlp.items():
            derived[f"{prefix}shared_mlp.{target}.weight"] = tuple((f"{prefix}{p}.weight", ALL_ROWS) for p in parts)
        if not spec.fused_qkv or layer in linear:
            continue
        for kind in ("weight", "bias"):
            name = spec.tensor_name(layer, "qkv_proj", kind)
            if name in conversion.checkpoint:
                derived |= {f"{prefix}self_attn.{part}.{kind}": ((name, block),) for part, block in rows.items()}
    missing = [name for parts in derived.values() for name, _ in parts if name not in conversion.checkpoint]
    if missing:
        raise KvshrinkError(f"the source lacks {missing[0]}: GraniteMoeHybrid's MLP is made from a Llama-layout "
                            "gate_proj/up_proj (or fused gate_up_proj) and down_proj MLP, which this source does not "
                            "have")
    return derived


def _zero_biases(conversion: Conversion, model: StockModel, derived: Derived) -> dict[str, torch.Tensor]:
    """Attention biases the class needs where the source has none (Qwen2's o_proj): zero, which adds nothing
    (`frame.zero_attention_biases`); the mixers are written by the conversion, and the source's MLP and attention
    tensors become the class's MLP and (in linear layers) the mixers."""
    mixers = {name for name in model.skeleton.state_dict() if f".{MIXER}." in name}
    consumed = {name for parts in derived.values() for name, _ in parts}
    consumed |= {name for layer in range(conversion.counts.num_layers)
                 for name in conversion.spec.attention_tensor_names(layer)}
    return zero_attention_biases(conversion, model, ("linearized", "linearizing"), mixers, consumed)


@dataclass
class LinearCalibration:
    """Pass 1's result: each candidate layer's calibrated closed-form mixer, and the tokens it read."""

    inits: dict[int, MixerInit]
    tokens: int


def _layer_sample(calibration: Calibration, spec_module: str, layer: int) -> LayerSample:
    """The layer's first CLOSED_FORM_WINDOWS calibration windows and its source attention's outputs on them."""
    inputs = [window for window in calibration.attention_inputs(layer).inputs[:CLOSED_FORM_WINDOWS]]
    attention = calibration.model.layer(layer).get_submodule(spec_module)
    runner = AttentionRunner(AttentionTables(calibration.model), layer)
    captured = mamba2.Captured(attention.o_proj)
    outputs, heads = [], []
    try:
        with torch.no_grad():
            for window in inputs:
                outputs.append(runner(attention, window.to(calibration.model.device)).float())
                heads.append(captured.value[0])
    finally:
        captured.handle.remove()
    device = calibration.model.device
    residuals = [window.hidden[0] + output for window, output in zip(calibration.stream.windows, outputs)]
    return LayerSample([window.to(device) for window in inputs], outputs, heads, residuals)


def _mixer(conversion: Conversion, probe: StockModel, layer: int, attention: AttentionWeights) -> torch.nn.Module:
    """A stock mixer of layer `layer`'s shape (its values are the calibration's to set)."""
    start = mamba2.mixer_tensors(attention, 1.0, torch.ones(attention.num_heads),
                                 torch.ones(attention.num_heads * attention.head_dim))
    prefix = f"{conversion.spec.layer_prefix.format(layer=layer)}{MIXER}."
    return probe.materialize(probe.decoder.layers[layer].get_submodule(MIXER),
                             {prefix + name: tensor for name, tensor in start.items()})


def _calibrate(conversion: Conversion, options: LinearAttentionOptions, candidates: list[int]) -> LinearCalibration:
    """Pass 1: the source reads the calibration windows one layer at a time; each candidate layer's mixer is
    calibrated on what its attention received there."""
    calibration = Calibration(conversion.source_model(), conversion.spec, calibration_inputs(conversion, options))
    probe = conversion.target_model(_hybrid_config(conversion, candidates), _derived(conversion, candidates))
    tables, inits = AttentionTables(probe), {}
    for layer in tqdm(range(conversion.counts.num_layers), desc="calibrating", unit="layer",
                      disable=not options.progress):
        if layer in candidates:
            attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)
            sample = _layer_sample(calibration, conversion.spec.attention_module, layer)
            mixer = _mixer(conversion, probe, layer, attention)
            inits[layer] = mamba2.calibrate_mixer(attention, mixer, AttentionRunner(tables, layer), sample)
            del attention, sample, mixer
        calibration.advance(layer)
    return LinearCalibration(inits, calibration.tokens)


def _choose(conversion: Conversion, options: LinearAttentionOptions, calibration: LinearCalibration | None,
            request: float | list[int]) -> list[int]:
    if isinstance(request, list):
        return request
    count, layers = _linear_count(conversion, request), conversion.counts.num_layers
    if count == 0:
        return []
    if options.layer_choice == "even":
        return sorted({round((i + 0.5) * layers / count - 0.5) for i in range(count)})
    errors = {layer: init.residual_error for layer, init in calibration.inits.items()}
    return sorted(sorted(errors, key=errors.get)[:count])


def _candidates(conversion: Conversion, options: LinearAttentionOptions, request: float | list[int]) -> list[int]:
    """The layers pass 1 calibrates: every layer for a calibrated choice, else the ones that will be linear."""
    if isinstance(request, float) and options.layer_choice == "calibrated" and _linear_count(conversion, request):
        return list(range(conversion.counts.num_layers))
    return _choose(conversion, options, None, request)


def _choice_name(options: LinearAttentionOptions) -> str:
    """How the linear layers were chosen: --layer-choice, or 'explicit' for an index list."""
    return options.layer_choice if isinstance(linear_layer_request(options.linear_layers), float) else "explicit"


def _summary(conversion: Conversion, options: LinearAttentionOptions, calibration: LinearCalibration | None,
             linear: list[int], config: dict[str, Any]) -> dict[str, Any]:
    source = conversion.checkpoint.config
    valid, excluded, how = class_engines(config["model_type"])
    return {
        "linear_attention": {
            "linear_layers": linear, "layer_choice": _choice_name(options),
            "mixer": "mamba2", "recurrent_state_bytes": recurrent_state_bytes(config),
            "closed_form_residual_error": {str(layer): round(init.residual_error, 6)
                                           for layer, init in (calibration.inits.items() if calibration else [])},
            "calibration": {"tokens": calibration.tokens} if calibration else None,
        },
        "target_config": {key: config[key] for key in ("mamba_n_heads", "mamba_d_head", "mamba_d_state",
                                                       "mamba_n_groups", "mamba_expand")},
        "valid_engines": valid, "excluded_engines": excluded, "notes": how,
        "bytes_held_per_token_at_context": {
            str(context): {"source": kv_bytes_at_context(source, context),
                           "target": kv_bytes_at_context(config, context)}
            for context in LONG_CONTEXTS
        },
    }


@dataclass(frozen=True)
class LinearAttentionMethod:
    """Mamba-2 mixers in place of chosen attention layers, as a method of the conversion driver."""

    options: LinearAttentionOptions
    support: ClassVar[str] = "linear"
    fits_every_tensor: ClassVar[bool] = False

    def refuse(self, conversion: Conversion) -> None:
        _refuse(conversion, self.options)

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        """Every layer has one shape, so any choice of as many linear layers has the output's size; a source tensor
        the class would drop is refused here, before any calibration."""
        linear = list(range(_linear_count(conversion, _requested(conversion, self.options))))
        derived = _derived(conversion, linear)
        model = conversion.target_model(_hybrid_config(conversion, linear), derived)
        _zero_biases(conversion, model, derived)
        return [model]

    def calibrate(self, conversion: Conversion) -> LinearCalibration | None:
        request = _requested(conversion, self.options)
        candidates = _candidates(conversion, self.options, request)
        return _calibrate(conversion, self.options, candidates) if candidates else None

    def plan(self, conversion: Conversion, calibration: LinearCalibration | None) -> Plan:
        linear = _choose(conversion, self.options, calibration, _requested(conversion, self.options))
        config = _hybrid_config(conversion, linear)
        derived = _derived(conversion, linear)
        biases = _zero_biases(conversion, conversion.target_model(config, derived), derived)
        windows = calibration_inputs(conversion, self.options) if linear else None
        return Plan(
            method=f"linear/mamba2/{_choice_name(self.options)}", targets=[TargetPlan("converted", config, biases)],
            calibration=Calibration(conversion.source_model(), conversion.spec, windows) if linear else None,
            summary=_summary(conversion, self.options, calibration, linear, config), derived=derived,
            layer_summaries=[calibration.inits.get(layer) if layer in linear else None
                             for layer in range(conversion.counts.num_layers)] if linear else None,
        )

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int,
                      inputs: AttentionInputs | None) -> list[LayerResult]:
        """The layer's mixer tensors from its attention and calibrated values, or its attention tensors unchanged
        (plus the zero biases the class needs); the driver fits the mixer and writes either."""
        attention = read_attention(conversion.checkpoint, conversion.spec, layer, conversion.counts)
        init = plan.layer_summaries[layer] if plan.layer_summaries else None
        if init is None:
            names = conversion.spec.attention_tensor_names(layer)
            # a fused qkv_proj reaches the class as the q/k/v projections the plan derives from its rows
            fused = {name for parts in plan.derived.values() for name, _ in parts}
            tensors = {name: tensor for name, tensor in attention_tensors(attention, conversion.spec, layer).items()
                       if name not in fused}
            tensors |= {name: bias for name, bias in plan.output.layout.items() if name in names}
            return [(tensors, {"layer": layer, "mixer": "attention"})]
        prefix = f"{conversion.spec.layer_prefix.format(layer=layer)}{MIXER}."
        tensors = mamba2.mixer_tensors(attention, init.value_scale, init.decay_rates, init.output_scale)
        return [({prefix + name: tensor for name, tensor in tensors.items()},
                 {"layer": layer, "mixer": "mamba2", **init.report()})]

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        """The check as it is: it scored the source and the output only."""
        return check


def add_linear_attention(source: str | Path, out: str | Path, options: LinearAttentionOptions) -> dict[str, Any]:
    """Write `source` to `out` as GraniteMoeHybridForCausalLM with `options.linear_layers` of its layers made Mamba-2
    mixers (a fixed-size state instead of a KV cache), each initialized from the attention it replaces, calibrated
    in closed form and fitted (`--fit`) to that attention's output; the other layers are carried exactly (with
    `--linear-layers 0` the output computes the source's logits). Returns the report also written to
    OUT/kvshrink_report.json."""
    return convert(source, out, LinearAttentionMethod(options))
