"""`convert add-sliding-window`: most layers attend within a window, the layers that look furthest keep it all.

A method of the conversion driver (`driver.py`), one decoder layer in memory at a time: refuse what cannot be
windowed -> calibrate (long windows of text stand at layer 0; each source layer runs with eager attention, and what
a window would drop there is measured while the windows pass through it) -> plan: choose the full-attention layers
and the target config (the stock class that runs per-layer windows: the source's own, or Ministral for
Llama/Mistral, the same layer) -> every layer written with its weights unchanged -> check at long context ->
report (with the engines that run the class's per-layer windows, as read from their code: convert/engines.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tqdm import tqdm

from kvshrink.convert.calibration import Calibration, calibration_windows
from kvshrink.convert.corpora import calibration_text
from kvshrink.convert.driver import LayerResult, Plan, TargetPlan, convert
from kvshrink.convert.engines import class_engines
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.families import load_family_specs
from kvshrink.convert.frame import Conversion, zero_attention_biases
from kvshrink.convert.kvcache import kv_bytes_at_context
from kvshrink.convert.layers import StockModel
from kvshrink.convert.options import SlidingWindowOptions
from kvshrink.convert.window_reach import LayerReach, evenly_spaced, mean_dropped, measure_and_advance, most_reaching

DEFAULT_CALIBRATION_LENGTH = 4096
REPORTED_CONTEXTS = (2048, 8192, 32768)
WINDOWING = ("windowed", "windowing")  # what a class that cannot hold the source refuses


def _context(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings") or 0)


def _source_layer_types(config: dict[str, Any], switch: str | None) -> list[str]:
    """Each source layer's attention as its stock class runs it."""
    layers = int(config["num_hidden_layers"])
    windowed = config.get("sliding_window") is not None and (switch is None or config.get(switch))
    if config.get("layer_types"):
        return list(config["layer_types"]) if windowed else ["full_attention"] * layers
    return ["sliding_attention" if windowed else "full_attention"] * layers


def _candidates(conversion: Conversion) -> list[int]:
    """The layers that attend to the whole context in the source: the only ones windowing can change."""
    types = _source_layer_types(conversion.checkpoint.config, conversion.spec.sliding_window_switch)
    return [index for index, kind in enumerate(types) if kind == "full_attention"]


def _kept_full(conversion: Conversion, options: SlidingWindowOptions) -> int:
    """How many layers keep full attention."""
    return round(options.full_layers * conversion.counts.num_layers)


def _calibration_length(conversion: Conversion, options: SlidingWindowOptions) -> int:
    """Tokens per calibration window: long enough for the window to drop something."""
    context = _context(conversion.checkpoint.config)
    return options.calibration_length or min(DEFAULT_CALIBRATION_LENGTH, context or DEFAULT_CALIBRATION_LENGTH)


def _refuse(conversion: Conversion, options: SlidingWindowOptions) -> None:
    """Refuse what cannot be windowed, before anything is read or written."""
    config, spec = conversion.checkpoint.config, conversion.spec
    spec.require("window")  # a family without sliding_window_class refuses windowing in its spec (a test checks)
    context = _context(config)
    if context and options.window >= context:
        raise KvshrinkError(
            f"--window {options.window} is not shorter than the model's context ({context} tokens, "
            "max_position_embeddings): such a window keeps every token; choose a smaller --window"
        )
    candidates, layers = _candidates(conversion), conversion.counts.num_layers
    if not candidates:
        raise KvshrinkError(
            f"{conversion.source} already attends within a window of {config.get('sliding_window')} tokens in every "
            "layer: there is no full-attention layer left to window"
        )
    if len(candidates) < layers and options.window > int(config["sliding_window"]):
        raise KvshrinkError(
            f"--window {options.window} is wider than the source's own sliding window ({config['sliding_window']}), "
            "which its sliding layers were trained with: choose --window at most that"
        )
    keep = _kept_full(conversion, options)
    if keep > len(candidates):
        raise KvshrinkError(
            f"--full-layers {options.full_layers:g} asks for {keep} full-attention layers but the source has only "
            f"{len(candidates)}: choose --full-layers at most {len(candidates) / layers:.3f}"
        )
    length = _calibration_length(conversion, options)
    if length <= options.window:
        raise KvshrinkError(
            f"--calibration-length {length} must exceed --window {options.window}, or the window drops nothing to "
            "measure: pass a longer --calibration-length (the model's context is "
            f"{context or 'unknown'})"
        )
    conversion.require_tokenizer("the per-layer measurement reads calibration text", "")


@dataclass
class WindowCalibration:
    """What a window drops in each source layer, on how many tokens."""

    reaches: list[LayerReach]
    tokens: int


def _measure(conversion: Conversion, options: SlidingWindowOptions) -> WindowCalibration:
    """What a window drops in each layer of the source on long calibration windows (eager attention, whose
    weights the measurement reads)."""
    length = _calibration_length(conversion, options)
    windows = calibration_windows(conversion.checkpoint.folder, calibration_text(options.calibration),
                                  options.calibration_tokens, length)
    calibration = Calibration(conversion.source_model(attn_implementation="eager"), conversion.spec, windows)
    reaches = []
    for index in tqdm(
        range(conversion.counts.num_layers), desc="measuring", unit="layer", disable=not options.progress
    ):
        layer = calibration.model.layer(index)
        reaches.append(measure_and_advance(calibration.stream, layer, index, options.window, options.sink_tokens))
    return WindowCalibration(reaches, calibration.tokens)


def _target_config(conversion: Conversion, options: SlidingWindowOptions, full: list[int]) -> dict[str, Any]:
    """The source's config in the stock class that runs per-layer windows, with `full` keeping full attention."""
    config = copy.deepcopy(conversion.checkpoint.config)
    target = load_family_specs()[conversion.spec.sliding_window_class]
    if target.model_type != conversion.spec.model_type:
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(key, None)
        config.update(model_type=target.model_type, architectures=list(target.architectures))
        config.setdefault("head_dim", int(config["hidden_size"]) // int(config["num_attention_heads"]))
    if target.sliding_window_switch:
        config[target.sliding_window_switch] = True
        config["max_window_layers"] = 0  # Qwen2/Qwen3's older rule (window from this layer on) agrees with layer_types
    config["sliding_window"] = options.window
    config["layer_types"] = ["full_attention" if index in full else "sliding_attention"
                             for index in range(int(config["num_hidden_layers"]))]
    return config


def _summary(conversion: Conversion, options: SlidingWindowOptions, calibration: WindowCalibration,
             choices: dict[str, list[int]], config: dict[str, Any]) -> dict[str, Any]:
    valid, excluded, how = class_engines(config["model_type"])
    return {
        "sliding_window": {
            "window": options.window, "full_layers": choices[options.layer_choice],
            "layer_choice": options.layer_choice,
            "sink_tokens": options.sink_tokens,
            "mean_mass_beyond_window": {name: round(mean_dropped(calibration.reaches, layers), 5)
                                        for name, layers in choices.items()},
            "calibration": {"tokens": calibration.tokens, "window_length": _calibration_length(conversion, options)},
        },
        "kv_bytes_per_token_at_context": {
            str(context): {"source": kv_bytes_at_context(conversion.checkpoint.config, context),
                           "target": kv_bytes_at_context(config, context)}
            for context in REPORTED_CONTEXTS
        },
        "valid_engines": valid,
        "excluded_engines": excluded,
        "notes": how,
    }


@dataclass(frozen=True)
class SlidingWindowMethod:
    """Per-layer sliding windows, as a method of the conversion driver: weights unchanged, the config windowed."""

    options: SlidingWindowOptions
    support: ClassVar[str] = "window"
    fits_every_tensor: ClassVar[bool] = False

    def refuse(self, conversion: Conversion) -> None:
        _refuse(conversion, self.options)

    def sized_targets(self, conversion: Conversion) -> list[StockModel]:
        """Which layers keep full attention changes no tensor's size; a target class that cannot hold the source's
        tensors exactly is refused here, before any calibration."""
        target = conversion.target_model(_target_config(conversion, self.options, []))
        zero_attention_biases(conversion, target, WINDOWING)
        return [target]

    def calibrate(self, conversion: Conversion) -> WindowCalibration:
        return _measure(conversion, self.options)

    def plan(self, conversion: Conversion, calibration: WindowCalibration) -> Plan:
        """The full-attention layers: those whose attention reaches furthest beyond the window (calibrated), or
        evenly spaced ones; the other choice's dropped mass is reported beside it."""
        options, layers = self.options, conversion.counts.num_layers
        candidates, keep = _candidates(conversion), _kept_full(conversion, options)
        choices = {"calibrated": most_reaching(calibration.reaches, keep, candidates),
                   "even": evenly_spaced(layers, keep, candidates)}
        config = _target_config(conversion, options, choices[options.layer_choice])
        biases = zero_attention_biases(conversion, conversion.target_model(config), WINDOWING)
        return Plan(
            method=f"window/{options.layer_choice}", targets=[TargetPlan("converted", config, biases)],
            calibration=None, summary=_summary(conversion, options, calibration, choices, config),
            check_window=min(_calibration_length(conversion, options), options.check_tokens),
            layer_summaries=calibration.reaches,
        )

    def convert_layer(self, conversion: Conversion, plan: Plan, layer: int, inputs: None) -> list[LayerResult]:
        """The layer's attention tensors unchanged (copied byte for byte) plus the zero biases the target class
        needs; its report entry is what the window drops there."""
        checkpoint, biases = conversion.checkpoint, plan.output.layout
        names = conversion.spec.attention_tensor_names(layer)
        tensors = {name: checkpoint.tensor(name).float() for name in sorted(names) if name in checkpoint}
        tensors |= {name: bias for name, bias in biases.items() if name in names}
        return [(tensors, plan.layer_summaries[layer].report())]

    def report_check(self, plan: Plan, check: dict[str, Any]) -> dict[str, Any]:
        """The check as it is: it scored the source and the output only, in windows of the calibration length."""
        return check


def add_sliding_window(source: str | Path, out: str | Path, options: SlidingWindowOptions) -> dict[str, Any]:
    """Write `source` to `out` with all but `options.full_layers` of its layers attending within `options.window`
    tokens, in a stock class that runs per-layer windows (`layer_types`).

    The full-attention layers are the ones that put the most attention beyond the window on long calibration text
    (`layer_choice="calibrated"`) or evenly spaced ones ("even"). Weights are unchanged; the report gives, per
    layer, the attention mass the window drops (and its part on the first `sink_tokens` tokens). Returns the report
    also written to OUT/kvshrink_report.json.
    """
    return convert(source, out, SlidingWindowMethod(options))
