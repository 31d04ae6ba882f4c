"""Uptraining recipes: plain YAML (plus `key=value` overrides) validated into typed pydantic models.

Everything here runs before any model is loaded, so a mistyped key or a missing folder costs the user a
second, not the minutes it takes to load a model. The rules between keys are validators of the models below;
every problem is a one-line `KvshrinkError` naming the key and the fix (`convert/option_models.py`).
"""

from __future__ import annotations

import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, StrictBool, field_validator, model_validator

from kvshrink.convert.corpora import CORPORA
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.fitting import UNCHANGED
from kvshrink.convert.model_card import REPORT_FILE as CONVERSION_REPORT
from kvshrink.convert.option_models import Naming, OptionsModel, WholeNumber, build

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
# a converted attention's tensors, or those of the Mamba-2 mixer (GraniteMoeHybrid) that replaced it
_ATTENTION_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mamba)\.")
RECIPE_NAMING = Naming("recipe key", style="dotted")


class DataSource(OptionsModel):
    """One source of text; exactly one of `corpus`, `path` or `hf` is set."""

    corpus: str | None = None  # built-in offline text: train split for training, held-out for validation
    path: str | None = None  # a .txt/.jsonl/.parquet file, or a folder searched for them
    hf: str | None = None  # a Hugging Face dataset name, read streaming (needs network and the `datasets` package)
    config: str | None = None  # the HF dataset's configuration name
    split: str = "train"  # the HF dataset's split
    data_files: str | None = None  # passed to `datasets.load_dataset` (e.g. with hf: json)
    text_field: str = "text"  # the column holding the text (.jsonl, .parquet, HF datasets)
    weight: float | None = Field(None, gt=0)  # share of the training blocks drawn from this source, relative to the
    # other sources' weights (set on every source or none; local sources only); unset: every block once per pass

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, corpus: str | None) -> str | None:
        if corpus is not None and corpus not in CORPORA:
            raise ValueError(f"is {corpus!r}: choose one of {', '.join(CORPORA)}")
        return corpus

    @model_validator(mode="after")
    def _one_kind(self) -> DataSource:
        kinds = [k for k in ("corpus", "path", "hf") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"must set exactly one of corpus, path, hf (it sets {kinds or 'none'})")
        if self.weight is not None and self.hf is not None:
            raise ValueError(
                "is a streamed HF dataset, which is read in its own order and cannot be weighted: remove the "
                "weights, or download the data and use path"
            )
        return self

    def describe(self) -> str:
        if self.corpus:
            return f"corpus {self.corpus}"
        if self.path:
            return f"path {self.path}"
        return f"hf {self.hf}" + (f"/{self.config}" if self.config else "") + f" [{self.split}]"


class HeldOutSource(DataSource):
    """A source of validation text: a DataSource without a weight, which only sets the training mix."""

    @model_validator(mode="after")
    def _no_weight(self) -> HeldOutSource:
        if self.weight is not None:
            raise ValueError("has a weight, which only sets the training mix: remove it")
        return self


class Validation(OptionsModel):
    """Held-out text for validation perplexity (measured at the start, every eval_interval steps and at the end)."""

    sources: list[HeldOutSource] = Field(default_factory=list)  # corpora contribute their held-out split
    fraction: float = Field(0.0, ge=0, lt=1)  # instead: hold out this share of the training blocks (local data only)
    max_tokens: WholeNumber = Field(32768, gt=0)  # cap on validation tokens, so evaluation stays cheap


class Optimizer(OptionsModel):
    """AdamW; weight decay applies to matrices only (not to norms, biases or 1-d parameters)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    # rows 100x smaller than the model's typical weight (MLA's linearized latent) get AdamW's update scaled to
    # their size; plain AdamW moves every weight by about lr per step, which throws such rows out of their range
    size_scaled_rows: StrictBool = True


class Schedule(OptionsModel):
    """Linear warmup, then cosine or linear decay to zero, or a constant rate."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: WholeNumber = Field(0, ge=0)


class Loss(OptionsModel):
    """lm: next-token cross-entropy; distill: KL(teacher || student) at a temperature; mix: a weighted sum."""

    kind: Literal["lm", "distill", "mix"] = "lm"
    temperature: float = Field(1.0, gt=0)
    distill_weight: float = Field(0.5, ge=0, le=1)  # mix only: loss = (1 - w) * lm + w * distill


Stage = Literal["attention_transfer", "end_to_end"]
STAGES = typing.get_args(Stage)  # in the order they run


class AttentionTransfer(OptionsModel):
    """Stage attention_transfer: each converted attention module, alone, learns to reproduce the source
    attention's output (MSE after o_proj) on the source's own inputs to that layer."""

    steps: WholeNumber = Field(40, gt=0)  # optimizer steps per converted layer
    sequences: WholeNumber = Field(64, gt=0)  # training blocks (seq_len tokens each) whose source attention inputs
    # every layer fits; 16 overfit
    micro_batch_size: WholeNumber = Field(4, gt=0)  # blocks per optimizer step
    lr: float = Field(1e-3, gt=0)  # AdamW, constant after a 10% warmup, no weight decay
    after_fit: StrictBool = False  # run even when the conversion already fitted its layers (its report's "fit")


class Recipe(OptionsModel):
    """A complete uptraining run. Paths are relative to the working directory."""

    model: str  # the converted checkpoint (any folder a stock transformers class loads)
    output_dir: str  # final model, uptrain_report.json and checkpoints/ go here
    teacher: str | None = None  # the source model, for distillation
    max_steps: WholeNumber | None = Field(None, gt=0)  # the budget: exactly one of max_steps, max_tokens,
    max_tokens: WholeNumber | None = Field(None, gt=0)  # pretraining_fraction
    pretraining_fraction: float | None = Field(None, gt=0, le=1)  # share of `pretraining_tokens` (the GQA paper
    pretraining_tokens: WholeNumber | None = Field(None, gt=0)  # used 0.05)
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(corpus="pydoc")])
    validation: Validation = Field(default_factory=Validation)
    seq_len: WholeNumber = Field(512, gt=0)
    packing: StrictBool = True  # concatenate documents (EOS between) into full blocks; false: pad each document's tail
    micro_batch_size: WholeNumber = Field(1, gt=0)  # sequences per process per forward pass
    gradient_accumulation: WholeNumber = Field(1, gt=0)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    loss: Loss = Field(default_factory=Loss)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # bf16: autocast, fp32 master weights, teacher in bf16;
    # auto: bf16 where the device multiplies bf16 natively (precision.py), else fp32
    gradient_checkpointing: StrictBool = False
    trainable: Literal["all", "attention", "new"] = "all"  # new: the tensors kvshrink_report.json lists
    freeze: list[str] = Field(default_factory=list)  # glob patterns of parameter names kept frozen anyway
    eval_interval: WholeNumber = Field(0, ge=0)  # steps between validations; 0: only at the start and the end
    save_interval: WholeNumber = Field(0, ge=0)  # steps between checkpoints; 0: only at the end
    keep_last: WholeNumber = Field(2, gt=0)  # checkpoints kept in output_dir/checkpoints
    log_interval: WholeNumber = Field(10, gt=0)  # steps between tracker entries
    seed: WholeNumber = 0
    tracker: Literal["none", "csv", "tensorboard", "wandb"] = "none"
    resume: StrictBool = False  # continue from the newest checkpoint in output_dir
    stages: list[Stage] = Field(default_factory=lambda: ["end_to_end"])
    attention_transfer: AttentionTransfer = Field(default_factory=AttentionTransfer)

    @model_validator(mode="after")
    def _stages_can_run(self) -> Recipe:
        stages = self.stages
        if not stages or len(set(stages)) != len(stages) or list(stages) != [s for s in STAGES if s in stages]:
            raise ValueError(
                f"stages {list(stages)} are not in an order that can run: list each once, attention_transfer before "
                "end_to_end (e.g. [attention_transfer, end_to_end])"
            )
        if "attention_transfer" in stages and self.teacher is None:
            raise ValueError(
                "stage attention_transfer needs the source model as teacher (its layers give the inputs and "
                "targets): set teacher=PATH"
            )
        if "end_to_end" in stages and self.loss.kind != "lm" and self.teacher is None:
            raise ValueError(
                f"loss.kind is {self.loss.kind} but there is no teacher: set teacher=PATH, or loss.kind=lm"
            )
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> Recipe:
        budgets = [k for k in ("max_steps", "max_tokens", "pretraining_fraction") if getattr(self, k) is not None]
        if len(budgets) != 1 and "end_to_end" in self.stages:
            raise ValueError(
                f"the recipe needs exactly one budget, got {', '.join(budgets) if budgets else 'none'}: set one of "
                "max_steps, max_tokens, or pretraining_fraction (with pretraining_tokens)"
            )
        if self.pretraining_fraction is not None and self.pretraining_tokens is None:
            raise ValueError(
                "pretraining_fraction needs pretraining_tokens: state the source model's pretraining token count"
            )
        return self

    @model_validator(mode="after")
    def _data_is_usable(self) -> Recipe:
        if not self.data:
            raise ValueError("the recipe's data list is empty: add at least one source (e.g. `- corpus: pydoc`)")
        weighted = [source.weight is not None for source in self.data]
        if any(weighted) and not all(weighted):
            raise ValueError("some data sources have a weight and some do not: give every source a weight, or none")
        validation = self.validation
        if not validation.sources and validation.fraction == 0 and not any(s.corpus for s in self.data):
            raise ValueError(
                "no validation text: set validation.sources (e.g. `- corpus: pydoc`) or validation.fraction (e.g. 0.02)"
            )
        if validation.fraction > 0 and any(s.hf for s in self.data):
            raise ValueError(
                "validation.fraction cannot split a streamed HF dataset: set validation.sources to its validation split"
            )
        return self

    def tokens_per_step(self, num_processes: int) -> int:
        return self.seq_len * self.micro_batch_size * self.gradient_accumulation * num_processes

    def total_steps(self, num_processes: int) -> int:
        """Optimizer steps the budget allows (a token budget is rounded up to whole steps)."""
        if "end_to_end" not in self.stages:
            return 0
        if self.max_steps is not None:
            return self.max_steps
        tokens = self.max_tokens
        if tokens is None:
            tokens = int(self.pretraining_fraction * self.pretraining_tokens)
        return max(1, math.ceil(tokens / self.tokens_per_step(num_processes)))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides (dotted keys reach nested ones), validate it."""
    path = Path(path)
    if not path.is_file():
        raise KvshrinkError(f"recipe {path} does not exist: pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise KvshrinkError(f"recipe {path} is not valid YAML{line}: fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise KvshrinkError(f"recipe {path} must be a mapping of keys to values: write it as `key: value` lines")
    for override in overrides:
        apply_override(raw, override)
    recipe = recipe_from_dict(raw)
    check_recipe_inputs(recipe)
    return recipe


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`null`, `3e-4`, `[1, 2]`, ...)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise KvshrinkError(f"override {override!r} is not key=value: write it like optimizer.lr=3e-4")
    value = yaml.safe_load(text) if text else None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, ".".join(parts[: depth + 1]))]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise KvshrinkError(
                f"override {override!r}: {'.'.join(parts[: depth + 1])} is a value, not a section: "
                "override it directly"
            )
        node = child
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = value
    else:
        node[parts[-1]] = value


def _list_index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise KvshrinkError(
            f"override key {key}: {part!r} is not an index of a {len(items)}-item list: use 0..{len(items) - 1}"
        )
    return int(part)


def recipe_from_dict(raw: Any) -> Recipe:
    """Validate a recipe mapping into a Recipe (types, unknown keys, and rules between keys)."""
    return build(Recipe, raw, RECIPE_NAMING)


def check_recipe_inputs(recipe: Recipe) -> None:
    """Check the folders and files a recipe names, without loading any model."""
    student = _model_config(recipe.model, "model")
    if recipe.teacher is not None:
        teacher = _model_config(recipe.teacher, "teacher")
        if teacher.get("vocab_size") != student.get("vocab_size"):
            raise KvshrinkError(
                f"teacher vocabulary ({teacher.get('vocab_size')}) differs from the model's "
                f"({student.get('vocab_size')}): distill from the model the conversion started from"
            )
    if recipe.trainable == "new":
        new_parameter_names(recipe.model)
    if "attention_transfer" in recipe.stages:
        changed_attention_layers(recipe.model, "stage attention_transfer")
    for source in list(recipe.data) + list(recipe.validation.sources):
        if source.path is not None:
            data_files(source.path)
    output = Path(recipe.output_dir)
    if output.exists() and not output.is_dir():
        raise KvshrinkError(f"output_dir {output} is a file: choose a folder path")


def _model_config(folder: str, key: str) -> dict[str, Any]:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise KvshrinkError(
            f"{key} {folder} is not a model folder (no config.json): pass a folder written by save_pretrained "
            "(e.g. the output of `convert`)"
        )
    return json.loads(config.read_text(encoding="utf-8"))


def new_parameter_names(model_dir: str | Path, needed_by: str = "trainable: new") -> list[str]:
    """The tensor names the conversion created or changed, from the model folder's kvshrink_report.json."""
    report = Path(model_dir) / CONVERSION_REPORT
    if not report.is_file():
        fix = "remove it from stages" if needed_by.startswith("stage") else "set trainable to all or attention"
        raise KvshrinkError(
            f"{needed_by} needs {report}, which the conversion writes to say what changed: use a folder made by "
            f"`convert`, or {fix}"
        )
    names = json.loads(report.read_text(encoding="utf-8")).get("new_parameters")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise KvshrinkError(
            f"{report} has no list of \"new_parameters\": re-run the conversion with this kvshrink version, "
            "or set trainable to all or attention"
        )
    return names


def runs_attention_transfer(recipe: Recipe) -> bool:
    """Whether the attention_transfer stage runs: listed in stages, with a layer left to transfer."""
    return "attention_transfer" in recipe.stages and bool(transfer_layers(recipe))


def transfer_layers(recipe: Recipe) -> list[int]:
    """The layers attention_transfer fits: those the conversion changed, less those its block-wise fit already
    fitted (the same loop) or found exact, unless `attention_transfer.after_fit`."""
    layers = changed_attention_layers(recipe.model, "stage attention_transfer")
    if recipe.attention_transfer.after_fit:
        return layers
    done = fitted_layers(recipe.model)
    return [layer for layer in layers if layer not in done]


def fitted_layers(model_dir: str | Path) -> set[int]:
    """Layers the conversion's block-wise fit fitted, found already exact, or left alone as unchanged from the source
    (from its kvshrink_report.json)."""
    report = Path(model_dir) / CONVERSION_REPORT
    if not report.is_file():
        return set()
    entries = json.loads(report.read_text(encoding="utf-8")).get("layers") or []
    return {entry["layer"] for entry in entries
            if "fit" in entry and entry["fit"].get("kept_closed_form") in (None, "already exact", UNCHANGED)}


def changed_attention_layers(model_dir: str | Path, needed_by: str) -> list[int]:
    """Indices of the decoder layers whose attention tensors the conversion changed (from its report)."""
    layers = sorted({int(m.group(1)) for n in new_parameter_names(model_dir, needed_by)
                     if (m := _ATTENTION_TENSOR.match(n))})
    if not layers:
        raise KvshrinkError(
            f"{Path(model_dir) / CONVERSION_REPORT} lists no attention tensor (model.layers.N.self_attn.*): "
            f"{needed_by} has nothing to train; remove it from stages"
        )
    return layers


def data_files(path: str | Path) -> list[Path]:
    """A data file, or the .txt/.jsonl/.parquet files under a folder (sorted, so the order is reproducible)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise KvshrinkError(f"data file {path} is not {', '.join(DATA_SUFFIXES)}: convert it to one of those")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not found:
            raise KvshrinkError(
                f"data folder {path} holds no {', '.join(DATA_SUFFIXES)} files: add some or fix the path"
            )
        return found
    raise KvshrinkError(f"data path {path} does not exist: fix the path in the recipe")

