"""Offline text that exists on every machine kvshrink runs on, split into train and held-out parts.

Every corpus is cut once by characters: the first `TRAIN_FRACTION` is for calibration and uptraining, the
rest is held out for evaluation, so a conversion calibrated on the default text is never scored on it.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from kvshrink.convert.errors import KvshrinkError

TRAIN_FRACTION = 0.8
Split = Literal["train", "heldout", "all"]
CORPORA = ("pydoc", "kjv")


@functools.cache
def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


@functools.cache
def _kjv() -> str:
    if shutil.which("bible") is None:
        raise KvshrinkError(
            "the 'kjv' corpus needs the `bible` program: install it with "
            "`apt-get install bible-kjv bible-kjv-text` (or use the 'pydoc' corpus)"
        )
    dump = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    verse_ref = re.compile(r"^\S+\d+:\d+ ", re.MULTILINE)
    return verse_ref.sub("", dump)


def _split(text: str, split: Split) -> str:
    cut = int(len(text) * TRAIN_FRACTION)
    cut = text.rfind("\n", 0, cut) + 1 or cut
    if split == "train":
        return text[:cut]
    if split == "heldout":
        return text[cut:]
    return text


def corpus_text(name: str, split: Split = "all") -> str:
    """Text of a built-in offline corpus: 'pydoc' (Python's own topic docs) or 'kjv' (the King James Bible)."""
    loaders = {"pydoc": _pydoc_topics, "kjv": _kjv}
    if name not in loaders:
        raise KvshrinkError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    return _split(loaders[name](), split)


def read_text_file(path: str | Path) -> str:
    """A .txt file as is, or a .jsonl file's "text" fields joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise KvshrinkError(f"text file {path} does not exist: pass an existing .txt or .jsonl file")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KvshrinkError(
                    f"{path}:{number} is not a JSON object with a \"text\" field: fix the line or pass a .txt file"
                ) from None
        return "\n\n".join(texts)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvshrinkError(f"{path} is not UTF-8 text: pass a .txt or .jsonl file") from None


MIXED = "pydoc+kjv"
_MIX_CHUNK = 2048  # characters of one corpus before the other's turn: about half a 512-token window


def _interleaved(texts: list[str]) -> str:
    """The texts in turns of about _MIX_CHUNK characters (cut at line ends), so every stretch of a few windows
    holds each of them, until the shortest runs out."""
    pieces = []
    for text in texts:
        chunks, start = [], 0
        while start < len(text):
            end = text.find("\n", start + _MIX_CHUNK)
            end = len(text) if end < 0 else end + 1
            chunks.append(text[start:end])
            start = end
        pieces.append(chunks)
    return "".join(chunk for turn in zip(*pieces) for chunk in turn)


def default_calibration() -> str:
    """The default calibration text's name: pydoc and KJV interleaved, or pydoc alone where `bible` is missing."""
    return MIXED if shutil.which("bible") is not None else "pydoc"


def _named_text(source: str | None, split: Split) -> str | None:
    """A built-in corpus (or the default mix) in `split`, or None where `source` names a file."""
    source = default_calibration() if source is None else source
    if source == MIXED:
        return _interleaved([corpus_text(name, split) for name in ("pydoc", "kjv")])
    if source in CORPORA:
        return corpus_text(source, split)
    return None


def calibration_text(source: str | Path | None = None) -> str:
    """The text calibration runs on: a file the user names, a corpus name ('pydoc', 'kjv', or 'pydoc+kjv': the two
    interleaved), or by default the train splits of pydoc and KJV interleaved (pydoc alone without `bible`)."""
    text = _named_text(None if source is None else str(source), "train")
    return text if text is not None else read_text_file(source)


def check_text(source: str | Path | None = None) -> tuple[str, str]:
    """(text, what it is) the post-conversion check scores: the held-out split of the calibration corpus, which
    neither calibration nor the block-wise fit read; a user's file has no such split, so its own text."""
    text = _named_text(None if source is None else str(source), "heldout")
    if text is not None:
        return text, f"held-out split of {source or default_calibration()}"
    return read_text_file(source), f"{source} (the calibration text itself)"
