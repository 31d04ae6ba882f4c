"""Model folders as evaluation sees them: checked up front, loaded with stock transformers, described for reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.kvcache import bytes_held_per_token
from kvshrink.convert.model_card import REPORT_FILE

REPORT_FILES = {"conversion_report": REPORT_FILE, "uptrain_report": "uptrain_report.json"}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    label: str
    config: dict[str, Any]


def check_model_dirs(models: list[str | Path]) -> list[ModelFolder]:
    """Every model folder must hold a config.json; labels are folder names, made unique in order."""
    if not models:
        raise KvshrinkError("no model given: pass one or more Hugging Face model folders")
    folders, labels = [], set()
    for model in models:
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise KvshrinkError(f"model folder {model} does not exist: pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise KvshrinkError(
                f"{model} has no config.json: pass a Hugging Face model folder (save_pretrained output)"
            )
        label, suffix = path.name, 2
        while label in labels:
            label, suffix = f"{path.name}-{suffix}", suffix + 1
        labels.add(label)
        folders.append(ModelFolder(path, label, json.loads((path / "config.json").read_text())))
    return folders


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(folder: ModelFolder, device: str):
    """The model in its checkpoint dtype, in eval mode, on `device`; stock classes only, no remote code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder.path, dtype="auto", trust_remote_code=False)
    return model.to(device).eval()


def load_tokenizer(folder: ModelFolder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder.path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise KvshrinkError(
            f"cannot load a tokenizer from {folder.path} ({error}): copy the source model's tokenizer files there"
        ) from None


def model_metadata(folder: ModelFolder) -> dict[str, Any]:
    """What a comparison needs besides scores: identity, architecture, bytes held at long context and kvshrink's
    own reports."""
    metadata = {
        "model": str(folder.path),
        "label": folder.label,
        "architecture": (folder.config.get("architectures") or [folder.config.get("model_type", "unknown")])[0],
        # KV cache plus recurrent state per token of a sequence this long (a window or a state pays off with length)
        "bytes_held_per_token_at_context": bytes_held_per_token(folder.config),
    }
    for key, filename in REPORT_FILES.items():
        report = folder.path / filename
        metadata[key] = json.loads(report.read_text()) if report.is_file() else None
    return metadata
