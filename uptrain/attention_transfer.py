"""Stage attention_transfer: each converted attention module, alone, learns to reproduce the source attention.

The source model runs one decoder layer at a time (convert/layers.py's LayerStream, the stock classes) over the
first `attention_transfer.sequences` training blocks; at every layer the conversion changed, the attention
inputs the source layer received and the outputs its o_proj produced become a small training set, and the
converted layer's own stock attention module (DeepseekV3Attention, LlamaAttention with fewer KV heads, ..., or the
Mamba-2 mixer of a GraniteMoeHybrid layer that replaced it) is fitted to it by AdamW on the mean squared error
(attention transfer, LoLCATs arXiv 2410.10254; layer-wise teacher forcing, arXiv 2604.05688) with the same loop
the conversions' block-wise fit runs (convert/fitting.py).
Layers the conversion already fitted (or found exact) are skipped unless `attention_transfer.after_fit`.
Memory is one source layer, one converted attention module and the windows' hidden states.

Layers are independent: under accelerate every process runs the source stream and fits the layers whose index
is its rank modulo the process count. Each layer's error is also measured, before and after fitting, on a few
validation blocks (the held-out split) that the fit never sees: with 16 fitting blocks the fitting error alone
can fall far below what the layer reaches on new text. Each fitted layer is written as
OUTPUT/attention_transfer/layer-NNNN (.safetensors with the module's tensors under their full names, .json with its
losses); a resumed run skips the layers already written, and the end-to-end stage starts from them
(transferred_weights()).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvshrink.convert.checkpoint import open_folder
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.layers import AttentionTables, HeapTrim, LayerStream, StockModel
from kvshrink.convert.fitting import AttentionRunner, FitSettings, HeldOut, WindowPairs, fit_attention
from kvshrink.convert.optimizer import reference_rms
from kvshrink.uptrain.recipe import Recipe, transfer_layers

TRANSFER_DIR = "attention_transfer"
# the student's module that stands in for the source attention, by layer kind (GraniteMoeHybrid: a Mamba-2 mixer)
STUDENT_MODULES = {"full_attention": "self_attn", "linear_attention": "mamba"}
ATTENTION_INPUT = "self_attn.q_proj"  # the source attention's first projection reads its normalized input
ATTENTION_OUTPUT = "self_attn.o_proj"
HELDOUT_BLOCKS = 4  # validation blocks each layer's held-out error is measured on


def transfer_attention(recipe: Recipe, accelerator: Accelerator) -> dict[str, Any]:
    """Fit every converted attention layer this process owns, then return every layer's losses (all processes)."""
    output = Path(recipe.output_dir) / TRANSFER_DIR
    layers = transfer_layers(recipe)
    mine = [
        index for position, index in enumerate(layers)
        if position % accelerator.num_processes == accelerator.process_index
    ]
    todo = [index for index in mine if not _layer_file(output, index, ".safetensors").is_file()]
    start = time.perf_counter()
    if todo:
        heap_trim = HeapTrim()
        source = StockModel.of_checkpoint(open_folder(Path(recipe.teacher)), accelerator.device, heap_trim)
        student = StockModel.of_checkpoint(open_folder(Path(recipe.model)), accelerator.device, heap_trim)
        fitting, heldout = _windows(recipe, accelerator)
        stream = LayerStream(source, fitting + heldout)
        progress = tqdm(
            total=len(todo), unit="layer", desc="attention transfer", disable=not accelerator.is_local_main_process
        )
        # precision bf16: the source layers and the fits multiply in bf16. Without autocast's weight cache: one
        # context spans every optimizer step, and cached bf16 copies would hide each step's update from the next
        with accelerator.autocast(AutocastKwargs(cache_enabled=False)):
            for index in range(max(todo) + 1):
                source_layer = source.layer(index)
                if index in todo:
                    pairs = _attention_pairs(stream, source_layer, index)
                    _fit_layer(recipe, student, index, pairs, len(fitting), output)
                    progress.update(1)
                else:
                    stream.run(source_layer, index)
        progress.close()
    accelerator.wait_for_everyone()
    return _stage_report(output, layers, time.perf_counter() - start, accelerator)


def transferred_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The attention tensors the stage wrote, under their full names (float32)."""
    weights: dict[str, torch.Tensor] = {}
    for path in sorted((output_dir / TRANSFER_DIR).glob("layer-*.safetensors")):
        weights.update(load_file(path))
    return weights


def _windows(recipe: Recipe, accelerator: Accelerator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first `sequences` training blocks and the first HELDOUT_BLOCKS validation blocks, as token windows
    without their padding."""
    from transformers import AutoTokenizer

    from kvshrink.uptrain.data import build_data

    with accelerator.main_process_first():
        stream, validation = build_data(recipe, AutoTokenizer.from_pretrained(recipe.model))
    blocks = stream.blocks_from(0)
    fitting = [
        ids[: int(mask.sum())] for ids, mask in (next(blocks) for _ in range(recipe.attention_transfer.sequences))
    ]
    count = min(HELDOUT_BLOCKS, len(validation))
    heldout = [validation.tokens[i, : int(validation.lengths[i])].long() for i in range(count)]
    return fitting, heldout


def _attention_pairs(
    stream: LayerStream, source_layer: torch.nn.Module, index: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Advance the windows through source layer `index`; what its attention received and what its o_proj gave."""
    inputs = stream.inputs_of(source_layer, index, _checked(source_layer, ATTENTION_INPUT, index))
    targets: list[torch.Tensor] = []
    handle = _submodule(source_layer, ATTENTION_OUTPUT, index).register_forward_hook(
        lambda module, args, out: targets.append(out[0].detach().float())
    )
    try:
        stream.run(source_layer, index)
    finally:
        handle.remove()
    return inputs, targets


def _fit_layer(recipe: Recipe, student: StockModel, index: int, pairs: tuple[list[torch.Tensor], list[torch.Tensor]],
               fitting: int, output: Path) -> None:
    """Fit the converted attention of layer `index` to the source's (inputs -> targets) on the first `fitting`
    pairs, measure it on the rest before and after; write it and its losses."""
    module = STUDENT_MODULES.get(student.attention_kind(index))
    if module is None:
        raise KvshrinkError(
            f"layer {index} of {recipe.model} uses sliding-window attention: remove attention_transfer from stages"
        )
    layer = student.layer(index)
    attention = layer.get_submodule(module)
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + index)
    inputs, targets = pairs
    spec = recipe.attention_transfer
    settings = FitSettings(steps=spec.steps, lr=spec.lr, micro_batch_size=spec.micro_batch_size)
    runner = AttentionRunner(AttentionTables(student), index)
    heldout = HeldOut.measured(attention, runner, WindowPairs(inputs[fitting:], targets[fitting:]))
    losses = fit_attention(attention, dict(attention.named_parameters()), runner,
                           WindowPairs(inputs[:fitting], targets[:fitting]), settings, generator,
                           reference_rms(layer.parameters()), heldout=heldout)
    prefix = student.path(student.decoder.layers[index].get_submodule(module))
    tensors = {f"{prefix}.{name}": t.detach().contiguous() for name, t in attention.state_dict().items()}
    output.mkdir(parents=True, exist_ok=True)
    _layer_file(output, index, ".json").write_text(json.dumps({"layer": index, **losses}), encoding="utf-8")
    partial = _layer_file(output, index, ".partial")
    save_file(tensors, partial)
    partial.replace(_layer_file(output, index, ".safetensors"))  # present only when complete


def _submodule(layer: torch.nn.Module, name: str, index: int) -> torch.nn.Module:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        raise KvshrinkError(
            f"layer {index} of the teacher has no {name} to read the attention's input and output from: "
            "attention_transfer needs a source with separate q/k/v/o projections; remove it from stages"
        ) from None


def _checked(layer: torch.nn.Module, name: str, index: int) -> str:
    _submodule(layer, name, index)
    return name


def _layer_file(output: Path, index: int, suffix: str) -> Path:
    return output / f"layer-{index:04d}{suffix}"


def _stage_report(output: Path, layers: list[int], seconds: float, accelerator: Accelerator) -> dict[str, Any]:
    """Every layer's losses (read back from the files, so resumed and multi-process runs report all of them),
    logged per layer under attention_transfer/*, with tracker step = layer index."""
    rows = [json.loads(_layer_file(output, index, ".json").read_text(encoding="utf-8")) for index in layers]
    for row in rows:
        accelerator.log({f"attention_transfer/{key}": value for key, value in row.items()
                         if key != "layer" and isinstance(value, (int, float))}, step=row["layer"])
    means = {f"{name}_error_mean_{end}": _mean(rows, f"{name}_{end}")
             for name in ("relative", "heldout_relative") for end in ("start", "end")}
    return {"layers": rows, "seconds_this_session": round(seconds, 3), **means}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the layers, None when a layer lacks it (written by a version that did not measure it)."""
    values = [row.get(key) for row in rows]
    return None if None in values else sum(values) / len(values)
