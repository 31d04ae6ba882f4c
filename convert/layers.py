"""A checkpoint run one decoder layer at a time, every piece in its stock transformers class.

The stock causal-LM class of a config is built on the meta device: module classes and names, no weights. Each
piece (embeddings, one decoder layer, the final norm, the LM head) is materialized from the checkpoint's tensors
only when it runs, then dropped, so memory is one layer plus the hidden states of the windows, whatever the depth.
The hidden states pass from layer to layer in float32, one [1, tokens, hidden] tensor per window. Nothing here
computes attention: the stock decoder layer, rotary embedding and causal mask do, exactly as the whole model's
forward would.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvshrink.convert.checkpoint import stock_config
from kvshrink.convert.errors import KvshrinkError

# LM-head rows turned into logits at once: bounds the [tokens, rows] logits of the chunked loss.
VOCAB_CHUNK = 8192


class HeapTrim:
    """Hands freed heap memory back to the OS when called (glibc's malloc_trim(0); nothing where the C library has
    none: macOS, musl). A StockModel given one calls it before each piece's weights: glibc keeps freed blocks under
    its mmap threshold (which rises to 32 MB as large blocks are freed, mallopt(3)) in the heap, where the per-layer
    temporaries of a conversion would stay resident under the next layer's weights, the largest allocation of every
    step."""

    def __init__(self):
        try:
            self._malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._malloc_trim = None

    def __call__(self) -> None:
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda' as a torch device; 'cuda' without CUDA is refused."""
    if device not in ("auto", "cpu", "cuda"):
        raise KvshrinkError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvshrinkError("--device cuda was asked for, but torch sees no CUDA device: pass --device cpu or auto")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


class StockModel:
    """A config's stock transformers causal LM whose weights are read tensor by tensor when a piece runs.

    `read(name)` returns a checkpoint tensor by its full name, `names` holds every name it can read; `heap_trim`,
    where given, runs before each piece is materialized (a conversion's models: the peak is one layer's weights).
    """

    def __init__(self, config: dict[str, Any], read: Callable[[str], torch.Tensor], names: set[str],
                 device: torch.device, heap_trim: HeapTrim | None = None):
        from transformers import AutoModelForCausalLM

        self.config = stock_config(config)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.read, self.names, self.device, self.heap_trim = read, names, device, heap_trim
        self.decoder = self.skeleton.get_decoder()
        self._path = {id(module): path for path, module in self.skeleton.named_modules()}

    @classmethod
    def of_checkpoint(cls, checkpoint, device: torch.device, heap_trim: HeapTrim | None = None) -> StockModel:
        """The stock model of a `checkpoint.SourceCheckpoint`, reading its tensors."""
        return cls(checkpoint.config, checkpoint.tensor, set(checkpoint.names), device, heap_trim)

    def path(self, module: nn.Module) -> str:
        return self._path[id(module)]

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def missing_tensors(self) -> list[str]:
        """Names the stock class needs that the checkpoint lacks (a tied LM head reads the input embeddings)."""
        tied = f"{self.path(self.skeleton.get_output_embeddings())}.weight"
        embeddings = f"{self.path(self.skeleton.get_input_embeddings())}.weight"
        return [name for name in self.skeleton.state_dict()
                if name not in self.names and not (name == tied and embeddings in self.names)]

    def tensor(self, name: str) -> torch.Tensor:
        """A weight by its full name; a tied LM head reads the input embeddings."""
        if name not in self.names and name == f"{self.path(self.skeleton.get_output_embeddings())}.weight":
            name = f"{self.path(self.skeleton.get_input_embeddings())}.weight"
        if name not in self.names:
            raise KvshrinkError(f"the checkpoint lacks {name}, which its stock class needs: re-download it")
        return self.read(name)

    def materialize(self, module: nn.Module, replaced: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A real, float32, eval-mode copy of a meta submodule with its weights read from the checkpoint, or from
        `replaced` (full names) where it has them."""
        path, replaced = self.path(module), replaced or {}
        if self.heap_trim is not None:  # the previous piece's and the last layer's temporaries, before these weights
            self.heap_trim()
        real = copy.deepcopy(module).to_empty(device=self.device)
        for submodule in real.modules():  # non-persistent buffers (Gemma's embedding scale) come from the config
            if any(name in submodule._non_persistent_buffers_set for name, _ in submodule.named_buffers(recurse=False)):
                self.skeleton._init_weights(submodule)
        # One tensor at a time, so a checkpoint-dtype copy of the whole piece is never alive beside the float32 one
        # (a 70B-width layer: 1.7 GB of bf16 next to 3.4 GB of float32).
        with torch.no_grad():
            for key, target in real.state_dict().items():
                name = f"{path}.{key}"
                tensor = replaced[name] if name in replaced else self.tensor(name)
                if tensor.shape != target.shape:
                    raise KvshrinkError(f"{name} has shape {list(tensor.shape)} where the config implies "
                                        f"{list(target.shape)}: the checkpoint does not match its config.json")
                target.copy_(tensor)
        return real.float().eval()

    def layer(self, index: int, replaced: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder layer `index` in its stock class; `replaced` holds tensors (full names) that override the
        checkpoint's, e.g. a converted attention read against the source's untouched MLP and norms."""
        return self.materialize(self.decoder.layers[index], replaced)

    def rotary_embedding(self) -> nn.Module:
        """Built anew on the device: its frequency table is a non-persistent buffer computed from the config."""
        with torch.device(self.device):
            return type(self.decoder.rotary_emb)(config=self.config).float()

    def attention_kind(self, index: int) -> str:
        """'full_attention', 'sliding_attention' or 'linear_attention' (a recurrent mixer, GraniteMoeHybrid's Mamba-2),
        as the stock model's forward picks the layer's mask."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) is not None else "full_attention"


class _Reached(Exception):
    """Stops a layer's forward once the input of interest has been captured."""


class AttentionTables:
    """The rotary (cos, sin) and the mask that `model`'s stock forward gives a decoder layer on unpadded windows:
    causal, or sliding-window causal for a sliding layer (None where the attention kernel is causal by itself).
    Built once per attention kind, window length and dtype, for whoever runs windows through `model`'s layers."""

    def __init__(self, model: StockModel):
        self.model = model
        self.rotary = model.rotary_embedding()
        self._built: dict[tuple[str, int, torch.dtype], tuple[Any, Any]] = {}

    def __call__(self, index: int, hidden: torch.Tensor) -> tuple[Any, Any]:
        """(position embeddings, attention mask) for layer `index` on windows like `hidden` ([1, T, hidden])."""
        key = (self.model.attention_kind(index), hidden.shape[1], hidden.dtype)
        if key not in self._built:
            self._built[key] = self._build(key[0], hidden)
        return self._built[key]

    @torch.no_grad()
    def _build(self, kind: str, hidden: torch.Tensor) -> tuple[Any, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:  # Gemma-3: one RoPE per layer type
            embeddings = self.rotary(hidden, positions, kind)
        else:
            embeddings = self.rotary(hidden, positions)
        if kind == "linear_attention":  # a recurrent mixer's mask only zeroes padding, and windows have none
            return embeddings, None
        build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        mask = build(config=self.model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                     position_ids=positions)
        return embeddings, mask


@dataclass
class _Window:
    hidden: torch.Tensor  # [1, T, hidden] float32 on the device
    ids: torch.Tensor  # [1, T] on the device


class LayerStream:
    """Hidden states of token windows, at the input of one decoder layer of a StockModel at a time.

    `run` passes them through a stock layer (the source's, or a converted one); `inputs_of` reads what one of
    its submodules receives without moving them. `tables` are the rotary tables and masks of the stream's model.
    """

    def __init__(self, model: StockModel, windows: list[torch.Tensor]):
        self.model = model
        embeddings = model.materialize(model.skeleton.get_input_embeddings())
        with torch.no_grad():
            self.windows = [
                _Window(embeddings(w[None].to(model.device)).float(), w[None].to(model.device)) for w in windows
            ]
        self.tables = AttentionTables(model)

    @staticmethod
    def _forward(layer: nn.Module, index: int, window: _Window, tables: AttentionTables) -> torch.Tensor:
        positions = torch.arange(window.hidden.shape[1], device=window.hidden.device)[None]
        embeddings, mask = tables(index, window.hidden)
        output = layer(window.hidden, attention_mask=mask, position_ids=positions, position_embeddings=embeddings)
        return (output[0] if isinstance(output, tuple) else output).float()

    @torch.no_grad()
    def run(self, layer: nn.Module, index: int, tables: AttentionTables | None = None) -> None:
        """Advance every window through `layer`, the stock layer at position `index` of the model `tables` were
        built for (default: the stream's model; a converted model's layer brings its own rotary tables and masks)."""
        for window in self.windows:
            window.hidden = self._forward(layer, index, window, tables if tables is not None else self.tables)

    @torch.no_grad()
    def inputs_of(self, layer: nn.Module, index: int, submodule: str) -> list[torch.Tensor]:
        """What `layer`'s submodule `submodule` receives from each window, [T, hidden] float32 each; the layer
        runs only up to that point and the windows stay where they are."""
        captured: list[torch.Tensor] = []

        def capture(module, args):
            captured.append(args[0][0].detach().float())
            raise _Reached

        handle = layer.get_submodule(submodule).register_forward_pre_hook(capture)
        try:
            for window in self.windows:
                try:
                    self._forward(layer, index, window, self.tables)
                except _Reached:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def negative_log_likelihood(self) -> tuple[float, int]:
        """(summed next-token loss, predicted tokens) of the windows' final hidden states: the final norm, then the
        LM head applied VOCAB_CHUNK rows at a time with a running log-sum-exp (no full logits in memory)."""
        norm = self.model.materialize(self.model.decoder.norm)
        head = self.model.skeleton.get_output_embeddings()
        weight = self.model.tensor(f"{self.model.path(head)}.weight")
        bias_name = f"{self.model.path(head)}.bias"
        bias = self.model.tensor(bias_name) if head.bias is not None else None
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        total, count = 0.0, 0
        for window in self.windows:
            states = norm(window.hidden)[0, :-1]
            targets = window.ids[0, 1:]
            running = torch.full((states.shape[0],), -math.inf, device=states.device)
            target_logit = torch.zeros(states.shape[0], device=states.device)
            for start in range(0, weight.shape[0], VOCAB_CHUNK):
                rows = weight[start : start + VOCAB_CHUNK].to(states.device, torch.float32)
                logits = states @ rows.T
                if bias is not None:
                    logits = logits + bias[start : start + VOCAB_CHUNK].to(states.device, torch.float32)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                running = torch.logaddexp(running, logits.logsumexp(dim=-1))
                inside = (targets >= start) & (targets < start + rows.shape[0])
                target_logit[inside] = logits[inside, targets[inside] - start]
            total += float((running - target_logit).sum())
            count += targets.numel()
        return total, count


def stream_perplexity(model: StockModel, windows: list[torch.Tensor], progress_desc: str | None = None) -> float:
    """exp(mean next-token loss) over all predicted tokens of `windows`, one layer in memory at a time."""
    from tqdm import tqdm

    stream = LayerStream(model, windows)
    for index in tqdm(
        range(model.num_layers), desc=progress_desc, unit="layer", disable=progress_desc is None, leave=False
    ):
        stream.run(model.layer(index), index)
    total, count = stream.negative_log_likelihood()
    return math.exp(total / count)
