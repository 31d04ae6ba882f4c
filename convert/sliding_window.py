"""`convert add-sliding-window`: most layers attend within a window, the layers that look furthest keep it all.

One visible sequence, one decoder layer in memory at a time: refuse an MLA source -> open the source -> refuse what
cannot be windowed -> calibrate (long windows of text stand at layer 0; each source layer runs with eager attention,
and what a window would drop there is measured while the windows pass through it) -> choose the full-attention
layers -> plan the target config (the stock class that runs per-layer windows: the source's own, or Ministral for
Llama/Mistral, the same layer) -> write every layer (weights unchanged) -> check at long context -> report (with
the engines that run the class's per-layer windows, as read from their code: convert/engines.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvshrink.convert.calibration import calibration_windows
from kvshrink.convert.check import compare_perplexity
from kvshrink.convert.checkpoint import open_source
from kvshrink.convert.corpora import calibration_text, check_text
from kvshrink.convert.engines import windowed_engines
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.families import load_family_specs
from kvshrink.convert.kvcache import kv_bytes_at_context
from kvshrink.convert.layers import LayerStream, StockModel
from kvshrink.convert.options import SlidingWindowOptions
from kvshrink.convert.rewrite import Conversion, LayerWriter, finish, open_conversion, require_free_space, write_metadata
from kvshrink.convert.window_reach import LayerReach, evenly_spaced, mean_dropped, measure_and_advance, most_reaching

DEFAULT_CALIBRATION_LENGTH = 4096
REPORTED_CONTEXTS = (2048, 8192, 32768)


def _refuse_mla(source: str | Path, options: SlidingWindowOptions) -> None:
    """DeepseekV3 (what mha-to-mla writes) has no sliding window in transformers or the serving engines."""
    with open_source(source, allow_pickle=options.allow_pickle) as checkpoint:
        if "kv_lora_rank" in checkpoint.config:
            raise KvshrinkError(
                f"{source} is an MLA checkpoint ({(checkpoint.config.get('architectures') or ['DeepseekV3'])[0]}), "
                "whose stock class has no sliding window: window the GQA/MQA or source model instead"
            )


def _context(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings") or 0)


def _source_layer_types(config: dict[str, Any], switch: str | None) -> list[str]:
    """Each source layer's attention as its stock class runs it."""
    layers = int(config["num_hidden_layers"])
    windowed = config.get("sliding_window") is not None and (switch is None or config.get(switch))
    if config.get("layer_types"):
        return list(config["layer_types"]) if windowed else ["full_attention"] * layers
    return ["sliding_attention" if windowed else "full_attention"] * layers


def _refuse(conversion: Conversion, options: SlidingWindowOptions) -> tuple[list[int], int, int]:
    """Refuse what cannot be windowed; returns the layers that may keep full attention, how many will, and the
    calibration length."""
    config, spec = conversion.checkpoint.config, conversion.spec
    spec.require("window")  # a family without sliding_window_class refuses windowing in its spec (a test checks)
    context = _context(config)
    if context and options.window >= context:
        raise KvshrinkError(
            f"--window {options.window} is not shorter than the model's context ({context} tokens, "
            "max_position_embeddings): such a window keeps every token; choose a smaller --window"
        )
    types = _source_layer_types(config, spec.sliding_window_switch)
    candidates = [index for index, kind in enumerate(types) if kind == "full_attention"]
    if not candidates:
        raise KvshrinkError(
            f"{conversion.source} already attends within a window of {config.get('sliding_window')} tokens in every "
            "layer: there is no full-attention layer left to window"
        )
    if len(candidates) < len(types) and options.window > int(config["sliding_window"]):
        raise KvshrinkError(
            f"--window {options.window} is wider than the source's own sliding window ({config['sliding_window']}), "
            "which its sliding layers were trained with: choose --window at most that"
        )
    keep = round(options.full_layers * len(types))
    if keep > len(candidates):
        raise KvshrinkError(
            f"--full-layers {options.full_layers:g} asks for {keep} full-attention layers but the source has only "
            f"{len(candidates)}: choose --full-layers at most {len(candidates) / len(types):.3f}"
        )
    length = options.calibration_length or min(DEFAULT_CALIBRATION_LENGTH, context or DEFAULT_CALIBRATION_LENGTH)
    if length <= options.window:
        raise KvshrinkError(
            f"--calibration-length {length} must exceed --window {options.window}, or the window drops nothing to "
            "measure: pass a longer --calibration-length (the model's context is "
            f"{context or 'unknown'})"
        )
    conversion.require_tokenizer("the per-layer measurement reads calibration text", "")
    return candidates, keep, length


def _measure(conversion: Conversion, options: SlidingWindowOptions, length: int) -> tuple[list[LayerReach], int]:
    """What a window drops in each layer of the source on `length`-token calibration windows; and their tokens."""
    checkpoint = conversion.checkpoint
    windows = calibration_windows(checkpoint.folder, calibration_text(options.calibration), options.calibration_tokens, length)
    model = StockModel({**checkpoint.config, "attn_implementation": "eager"}, checkpoint.tensor, set(checkpoint.names),
                       conversion.device)  # fmt: skip
    stream = LayerStream(model, windows)
    reaches = []
    for index in tqdm(range(model.num_layers), desc="measuring", unit="layer", disable=not options.progress):
        reaches.append(measure_and_advance(stream, model.layer(index), index, options.window, options.sink_tokens))
    return reaches, sum(window.numel() for window in windows)


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
                             for index in range(int(config["num_hidden_layers"]))]  # fmt: skip
    return config


def _zero_biases(conversion: Conversion, target: StockModel) -> dict[str, torch.Tensor]:
    """Tensors the target class needs that the source lacks: only attention biases, which are zero (adding
    nothing, so the layer computes what the source's does). Anything else, or a source tensor the target class
    would drop, is refused."""
    needed = set(target.skeleton.state_dict())
    missing = set(target.missing_tensors())
    attention = {name for layer in range(conversion.counts.num_layers) for name in conversion.spec.attention_tensor_names(layer)}
    if missing - attention or any(not name.endswith(".bias") for name in missing):
        raise KvshrinkError(
            f"the stock class {target.config.architectures[0]} needs {sorted(missing)[0]}, which the source cannot "
            "supply exactly: this family cannot be windowed in that class"
        )
    dropped = sorted(name for name in conversion.checkpoint.names if name not in needed and "rotary_emb" not in name)
    if dropped:
        raise KvshrinkError(
            f"the stock class {target.config.architectures[0]} has no place for the source's {dropped[0]} (and "
            f"{len(dropped) - 1} more): windowing it there would silently drop them"
        )
    shapes = target.skeleton.state_dict()
    return {name: torch.zeros(shapes[name].shape) for name in sorted(missing)}


def _write_layers(conversion: Conversion, config: dict[str, Any], progress: bool) -> list[str]:
    """Every layer's tensors, unchanged (attention tensors copied byte for byte), plus the zero biases the target
    class needs; returns the names created."""
    target = conversion.target_model(config)
    require_free_space(conversion, target)
    biases = _zero_biases(conversion, target)
    writer = LayerWriter(conversion, conversion.staging)
    checkpoint = conversion.checkpoint
    for layer in tqdm(range(conversion.counts.num_layers), desc="writing", unit="layer", disable=not progress):
        names = conversion.spec.attention_tensor_names(layer)
        tensors = {name: checkpoint.tensor(name).float() for name in sorted(names) if name in checkpoint}
        tensors |= {name: bias for name, bias in biases.items() if name in names}
        writer.write_layer(layer, tensors)
    return writer.finish(conversion.counts.num_layers)


def add_sliding_window(source: str | Path, out: str | Path, options: SlidingWindowOptions) -> dict[str, Any]:
    """Write `source` to `out` with all but `options.full_layers` of its layers attending within `options.window`
    tokens, in a stock class that runs per-layer windows (`layer_types`).

    The full-attention layers are the ones that put the most attention beyond the window on long calibration text
    (`layer_choice="calibrated"`) or evenly spaced ones ("even"). Weights are unchanged; the report gives, per
    layer, the attention mass the window drops (and its part on the first `sink_tokens` tokens). Returns the report
    also written to OUT/kvshrink_report.json.
    """
    _refuse_mla(source, options)
    with open_conversion(source, out, options) as conversion:
        candidates, keep, length = _refuse(conversion, options)
        reaches, tokens = _measure(conversion, options, length)
        choices = {"calibrated": most_reaching(reaches, keep, candidates),
                   "even": evenly_spaced(conversion.counts.num_layers, keep, candidates)}  # fmt: skip
        full = choices[options.layer_choice]
        config = _target_config(conversion, options, full)
        new_parameters = _write_layers(conversion, config, options.progress)
        write_metadata(conversion, config)
        check = None
        if options.check:
            check = compare_perplexity(
                conversion.checkpoint.folder, {"source": conversion.checkpoint.folder, "converted": conversion.staging},
                check_text(options.calibration), options.check_tokens, conversion.device,
                window=min(length, options.check_tokens), progress=options.progress,
            )  # fmt: skip
        support = conversion.spec.support("window")
        valid, excluded, how = windowed_engines(config["model_type"])
        summary = {
            "sliding_window": {
                "window": options.window, "full_layers": full, "layer_choice": options.layer_choice,
                "sink_tokens": options.sink_tokens,
                "mean_mass_beyond_window": {name: round(mean_dropped(reaches, layers), 5) for name, layers in choices.items()},
                "calibration": {"tokens": tokens, "window_length": length},
            },  # fmt: skip
            "kv_bytes_per_token_at_context": {
                str(context): {"source": kv_bytes_at_context(conversion.checkpoint.config, context),
                               "target": kv_bytes_at_context(config, context)}  # fmt: skip
                for context in REPORTED_CONTEXTS
            },
            "family_support": {"family": conversion.spec.model_type, "level": support.level, "why": support.why},
            "valid_engines": valid,
            "excluded_engines": excluded,
            "notes": how,
        }
        return finish(conversion, method=f"window/{options.layer_choice}", config=config, summary=summary,
                      layers=[reach.report() for reach in reaches], new_parameters=new_parameters, check=check)  # fmt: skip
