"""Every converter's options, declared once.

One pydantic model per command: the click options (`cli.py` builds them from the fields), the Python API
(`mha_to_gqa(source, out, GqaOptions(...))`), the pipeline's validation and the benchmarks all come from it.
A field's description is its `--help` text; json_schema_extra may give a `metavar`, a `short` flag, or
`cli: False` to keep it off the command line. Rules between options that need no source model are validators
here, so every entry point refuses the same option sets with the same message.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from kvshrink.convert import gqa
from kvshrink.convert.calibration import CALIBRATION_WINDOW
from kvshrink.convert.corpora import default_calibration
from kvshrink.convert.fitting import FitSettings
from kvshrink.convert.option_models import OptionsModel, build_options
from kvshrink.convert.precision import resolved_precision
from kvshrink.convert.staging import BREAK_LOCK_HELP, OVERWRITE_HELP

__all__ = [
    "FIXED_OPTIONS", "ConvertOptions", "GqaOptions", "LinearAttentionOptions", "MlaOptions", "SlidingWindowOptions",
    "build_options",
]

GqaMethod = Literal["mean", "grouped", "aligned", "output-aware"]
# Options a command sets itself: multi-query attention is grouped-query attention with one KV group.
FIXED_OPTIONS: dict[str, dict[str, Any]] = {"mha-to-mqa": {"groups": 1}}


class ConvertOptions(OptionsModel):
    """What every conversion takes."""

    check: bool = Field(True, description="Compare source and output perplexity on the calibration text after "
                        "converting (both run one layer at a time).")
    calibration: str | None = Field(
        None, description="Text for calibration and the check: a .txt/.jsonl file, or 'pydoc', 'kjv' or 'pydoc+kjv' "
        "(default: the train splits of Python's pydoc topics and the King James Bible interleaved, both offline; pydoc "
        "alone where the `bible` program is missing).", json_schema_extra={"metavar": "FILE|CORPUS"},
    )
    calibration_tokens: int = Field(8192, description="Tokens of calibration text the source reads.")
    check_tokens: int = Field(2048, ge=2, description="Tokens of calibration text the perplexity check reads.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where each layer runs during calibration and the check (auto: CUDA when present)."
    )
    overwrite: bool = Field(False, description=OVERWRITE_HELP)
    break_lock: bool = Field(False, description=BREAK_LOCK_HELP)
    out_shard_size: str = Field("5GB", description="Largest output shard, e.g. 5GB or 500MB.")
    allow_pickle: bool = Field(False, description="Read pickled .bin weights (torch.load with weights_only=True); "
                               "refused otherwise.")
    progress: bool = Field(True, description="Show progress bars.", json_schema_extra={"cli": False})

    @field_validator("out_shard_size")
    @classmethod
    def _a_size(cls, value: str) -> str:
        parse_size(value)
        return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} is not a size: use a form like 5GB, 500MB or 1000000")
    unit = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2).upper()]
    return int(float(match.group(1)) * unit)


MLA_SHAPE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*$")  # --mla-shape RANK+ROPE
FIT_MICRO_BATCH = 2  # calibration windows an optimizer step of the fit reads
FIT_CHECKS = 8  # held-out checks over the fit's steps; two without a new best stop it


class FittedOptions(ConvertOptions):
    """What the calibrated conversions (GQA/MQA, MLA) add: each converted layer fitted to its source layer."""

    calibration_tokens: int = Field(16384, description="Tokens of calibration text the source reads "
                                    "(512-token windows) for calibrated methods and the fit.")
    error_feedback: bool = Field(
        False, description="Calibrate each layer on the hidden states of the already converted layers before it "
        "(as GPTQ does) instead of the source's. Off by default: on SmolLM2 it made MQA 3.6% worse and MLA no "
        "better (benchmarks/error_feedback.py).",
    )

    fit: Literal["attention", "none"] = Field(
        "attention", description="attention: after the closed-form merge, fit each converted attention to the source "
        "attention's output on the calibration windows (AdamW, one layer at a time, early-stopped on held-out "
        "windows; SmolLM2's MQA: held-out pydoc perplexity 6.9x -> 2.0x the source's, 4.7 s a layer on 2 CPU "
        "cores, 2.3 of its 3.1 minutes); none: the closed form alone. Calibrated methods only.",
    )
    fit_steps: int = Field(128, ge=1, description="Optimizer steps of the fit per layer, at most (2 windows a step).")
    fit_lr: float = Field(
        2e-3, gt=0, description="Starting learning rate of the fit (AdamW, 10% warmup, then constant; a held-out check "
        "without a new best sends the layer back to its best point at half the rate, a second in a row stops it).",
    )
    fit_heldout_windows: int = Field(
        2, ge=1, description="Calibration windows held out of the fit, spread over the text: they decide early "
        "stopping and are reported; the other windows (--calibration-tokens / 512 in all) are fitted.",
    )
    fit_scope: Literal["changed", "attention"] = Field(
        "changed", description="changed: fit only the attention tensors the conversion created or changed; "
        "attention: every tensor of the converted attention.",
    )
    fit_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="What the fit's steps multiply in: bf16 autocast (float32 master weights, errors "
        "measured in float32) or fp32; auto: bf16 where the device multiplies bf16 natively (a CUDA GPU from Ampere "
        "on, a CPU with AVX512-BF16 or AMX), fp32 elsewhere.",
    )

    def fit_settings(self, device: torch.device) -> FitSettings:
        return FitSettings(steps=self.fit_steps, lr=self.fit_lr, micro_batch_size=FIT_MICRO_BATCH, checks=FIT_CHECKS,
                           precision=resolved_precision(self.fit_precision, device))

    def fit_report(self, device: torch.device) -> dict[str, Any]:
        """The settings the fit ran with (`fit_settings`) as the report and model card state them."""
        settings = self.fit_settings(device)
        return {"steps": settings.steps, "lr": settings.lr, "micro_batch_size": settings.micro_batch_size,
                "checks": settings.checks, "heldout_windows": self.fit_heldout_windows, "scope": self.fit_scope,
                "precision": settings.precision, "text": self.calibration or default_calibration()}


class GqaOptions(FittedOptions):
    """`convert mha-to-gqa` (and mha-to-mqa, which fixes groups to 1)."""

    groups: int = Field(..., description="Number of KV heads in the output; must divide the source's KV heads.",
                        json_schema_extra={"short": "-g"})
    method: GqaMethod = Field(
        gqa.DEFAULT_METHOD, description="How KV heads are merged: 'mean' averages them (the GQA paper); 'grouped' "
        "first groups similar heads; 'aligned' also rotates heads onto each other; 'output-aware' fits the shared "
        "K/V to keep logits and o_proj outputs. All but 'mean' calibrate on text.",
    )

    @model_validator(mode="after")
    def _some_groups(self) -> GqaOptions:
        if self.groups <= 0:
            raise ValueError(f"--groups must be a positive number of KV heads, got {self.groups}")
        return self

    @model_validator(mode="after")
    def _enough_calibration_text(self) -> GqaOptions:
        if gqa.needs_calibration(self.method) and self.calibration_tokens < 2:
            raise ValueError(f"--calibration-tokens must be at least 2, got {self.calibration_tokens}")
        return self


class MlaOptions(FittedOptions):
    """`convert mha-to-mla`."""

    kv_budget: float | None = Field(
        None, description="Target KV cache as a fraction of the source's, in (0, 1). Under --target vllm: the largest "
        "shape vLLM runs within it; otherwise the rank that fills it for the rope dim.",
        json_schema_extra={"metavar": "F"},
    )
    kv_rank: int | Literal["full"] | None = Field(
        None, description="Latent width (kv_lora_rank), or 'full' for an exact latent.",
        json_schema_extra={"metavar": "R|full"}
    )
    mla_shape: str | None = Field(
        None, description="Rank and rope dim at once, e.g. 512+64. vLLM runs 512+64 and 256+64 only.",
        json_schema_extra={"metavar": "R+D"},
    )
    rope_dim: int | Literal["all"] | None = Field(
        None, description="Width of the shared rope key (qk_rope_head_dim), even; 'all' keeps every rotary pair of "
        "every KV head (--target transformers). Default: 64 for vllm; 64 but at most head_dim / 2 for sglang; "
        "head_dim / 2 for transformers.", json_schema_extra={"metavar": "D|all"},
    )
    rope_method: Literal["rotate", "partial"] = Field(
        "rotate", description="rotate: RoRoPE, a complex unitary per frequency across KV heads concentrates key "
        "energy; partial: keep the best (head, frequency) pairs as they are (MHA2MLA).",
    )
    factorization: Literal["balanced", "activation", "output", "weight"] = Field(
        "balanced", description="Joint K/V latent: SVD whitened by the calibration inputs with keys and values scaled "
        "to equal energy (balanced), without that scaling (activation), weighted by the queries and o_proj that read "
        "K and V (output), or the plain weight SVD (weight).",
    )
    distance_aware: bool = Field(
        True, description="Fold the source's average rotation over attended distances into pairs that lose RoPE, let "
        "the part of a dropped pair that a kept one explains ride on its rope slot, and spend rope dims where a "
        "constant cannot stand in (fitted at 512-token context).",
    )
    target: Literal["vllm", "sglang", "transformers"] = Field(
        "vllm", description="vllm: only what vLLM runs (512+64 or 256+64, default RoPE, interleaved, no biases), also "
        "valid in SGLang and transformers. sglang: the same layout at any shape. transformers: any shape, exact "
        "per-pair frequencies (longrope), wrong in vLLM/SGLang.",
    )
    exact_only: bool = Field(
        False, description="Refuse families DeepseekV3 can only approximate (Qwen3's per-head q/k norms, otherwise "
        "replaced by calibrated linear maps) instead of converting them approximately.",
    )
    head_norm_fit: Literal["least-squares", "head-matrix", "mean-gain"] = Field(
        "least-squares", description="How per-head q/k norms (Qwen3) become linear, fitted on the calibration text: "
        "the least-squares map from the layer input to the normalized heads; one head_dim x head_dim matrix per head "
        "on the source projection (head-matrix); or TransMLA's mean 1/rms gain (mean-gain).",
    )
    exact_biases: bool = Field(
        False, description="Refuse query/value/rope-key biases the serving layout cannot hold exactly, instead of "
        "refitting them into the weights on the calibration text (approximate; the report gives each layer's error).",
    )

    @model_validator(mode="after")
    def _one_well_formed_size(self) -> MlaOptions:
        """Exactly one of the size options, each well formed (a source decides the rest: `mla.shapes`)."""
        sizes = (("--kv-rank", self.kv_rank), ("--kv-budget", self.kv_budget), ("--mla-shape", self.mla_shape))
        given = [flag for flag, value in sizes if value is not None]
        if len(given) != 1:
            raise ValueError(
                "pass exactly one of --kv-rank, --kv-budget or --mla-shape"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        if self.kv_budget is not None and not 0 < self.kv_budget < 1:
            raise ValueError(
                f"--kv-budget {self.kv_budget} must be a fraction of the source KV cache in (0, 1), e.g. 0.25"
            )
        if self.mla_shape is not None and not MLA_SHAPE.match(self.mla_shape):
            raise ValueError(f"--mla-shape {self.mla_shape!r} is not RANK+ROPE: use a form like 512+64")
        if self.mla_shape is not None and self.rope_dim is not None:
            raise ValueError("--mla-shape already sets the rope dim: drop --rope-dim")
        return self

    @model_validator(mode="after")
    def _a_whole_calibration_window(self) -> MlaOptions:
        if self.calibration_tokens < CALIBRATION_WINDOW:
            raise ValueError(
                f"--calibration-tokens {self.calibration_tokens} is less than one {CALIBRATION_WINDOW}-token window: "
                f"pass at least {CALIBRATION_WINDOW}"
            )
        return self


class SlidingWindowOptions(ConvertOptions):
    """`convert add-sliding-window`."""

    window: int = Field(..., ge=1, description="Tokens each sliding layer attends to (its own included), as the "
                        "stock class's sliding_window.", json_schema_extra={"short": "-w"})
    full_layers: float = Field(
        0.25, ge=0.0, le=1.0, description="Fraction of the layers that keep full attention, in [0, 1] (rounded to "
        "whole layers).", json_schema_extra={"metavar": "F"},
    )
    layer_choice: Literal["calibrated", "even"] = Field(
        "calibrated", description="calibrated: keep full attention in the layers that put the most attention beyond "
        "the window on the calibration text; even: evenly spaced full layers (Gemma's fixed pattern).",
    )
    calibration_length: int | None = Field(
        None, ge=2, description="Tokens per calibration window; must exceed --window so the window drops something "
        "(default: 4096, at most the model's context).", json_schema_extra={"metavar": "N"},
    )
    sink_tokens: int = Field(4, ge=0, description="First tokens of a text whose dropped attention mass is reported "
                             "apart (attention sinks, which a plain window drops).")


class LinearAttentionOptions(FittedOptions):
    """`convert add-linear-attention`."""

    linear_layers: str = Field(
        "0.5", description="Layers made linear (Mamba-2): a fraction of them in [0, 1) (with a decimal point, rounded "
        "to whole layers; 0 keeps every layer's attention; generation needs one attention layer), or their indices, "
        "e.g. 5 or 1,3,5 (0, alone is layer 0).", json_schema_extra={"metavar": "F|I,J,..."},
    )
    layer_choice: Literal["calibrated", "even"] = Field(
        "calibrated", description="calibrated: linearize the layers whose closed-form mixer changes the residual "
        "stream least on the calibration text (its output error over the stream's energy after attention); even: "
        "evenly spaced layers. Ignored for an explicit layer list.",
    )

    @field_validator("linear_layers")
    @classmethod
    def _fraction_or_indices(cls, value: str) -> str:
        linear_layer_request(value)
        return value


def linear_layer_request(text: str) -> float | list[int]:
    """--linear-layers: a fraction in [0, 1) when it is 0 or has a decimal point, else distinct layer indices
    ('5', '1,3,5'; '0,' is layer 0 alone)."""
    text = text.strip()
    if text == "0" or "." in text:
        try:
            fraction = float(text)
        except ValueError:
            raise ValueError(f"--linear-layers {text!r} is neither a fraction nor layer indices: use e.g. 0.5 or 1,3,5")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--linear-layers {fraction:g} is outside [0, 1): at least one layer must keep "
                             "attention (choose e.g. 0.5)")
        return fraction
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
        raise ValueError(f"--linear-layers {text!r} is not a list of distinct layer indices: use a form like 1,3,5")
    return sorted(map(int, parts))
