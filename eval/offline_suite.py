"""kvshrink's offline lm-eval task suite: YAML tasks over the held-out corpora, built locally, no downloads.

Two kinds of task, each over both built-in domains (Python's pydoc topics and the King James Bible):

- `kvshrink_<domain>_ppl` (loglikelihood_rolling): held-out documents of about `DOC_CHARS` characters;
  lm-eval reports word_perplexity, byte_perplexity and bits_per_byte.
- `kvshrink_<domain>_lastword` (multiple_choice, 4 options, chance 25%): a held-out sentence (pydoc: with the
  sentence before it) minus its final word; the options are that word and three distractors drawn from the
  same task's pool of final words in proportion to their frequency, so a model that only knows which words
  are common scores chance and only reading the context helps.

lm-eval needs absolute `data_files` paths, so the suite is written to a cache folder named after a hash of
its content (the held-out text differs between Python versions and `bible` packages); the paths stay valid
after the run, and the folder is reused by later runs on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import yaml

from kvshrink.convert.corpora import corpus_text
from kvshrink.convert.outdir import atomic_output_dir

SUITE_VERSION = 1
DOMAINS = ("pydoc", "kjv")
DOC_CHARS = 2000
PPL_DOCS = 48
LASTWORD_ITEMS = 1000
LASTWORD_CHOICES = 4
LASTWORD_MIN_WORDS = 8
SEED = 1234

OFFLINE_TASKS = tuple(f"kvshrink_{domain}_{kind}" for kind in ("ppl", "lastword") for domain in DOMAINS)
OFFLINE_ALIAS = "offline"

_FINAL_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})[.!?;:,]?$", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _documents(text: str) -> list[str]:
    """Consecutive lines packed into documents of at most about DOC_CHARS characters."""
    documents, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > DOC_CHARS:
            documents.append(current.strip())
            current = ""
        current += line
    if current.strip():
        documents.append(current.strip())
    return [document for document in documents if document]


def _evenly_spaced(items: list, count: int) -> list:
    """`count` items spread over the whole list, so a task samples all of the held-out part, not its start."""
    if len(items) <= count:
        return items
    return [items[index * len(items) // count] for index in range(count)]


def _kjv_passages(text: str) -> list[str]:
    return [verse.strip() for verse in text.splitlines() if verse.strip()]


def _pydoc_passages(text: str) -> list[str]:
    """Prose sentences, each with the sentence before it from the same paragraph; code and tables skipped."""
    passages = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>", "+", "|", "=")) for line in lines):
            continue
        sentences = _SENTENCE_END.split(" ".join(line.strip() for line in lines))
        passages.extend(" ".join(sentences[max(0, index - 1) : index + 1]) for index in range(len(sentences)))
    return passages


def _lastword_items(passages: list[str]) -> list[dict]:
    candidates = []
    for passage in passages:
        match = _FINAL_WORD.match(passage)
        if match and len(passage.split()) >= LASTWORD_MIN_WORDS:
            candidates.append((match["context"], match["word"]))
    candidates = _evenly_spaced(candidates, LASTWORD_ITEMS)
    pool = [word for _, word in candidates]
    rng = random.Random(SEED)
    items = []
    for context, word in candidates:
        options = {word.lower()}
        distractors = []
        while len(distractors) < LASTWORD_CHOICES - 1:
            candidate = rng.choice(pool)
            if candidate.lower() not in options:
                options.add(candidate.lower())
                distractors.append(candidate)
        choices = [word, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(word)})
    return items


def _task_configs(data_dir: Path) -> dict[str, dict]:
    configs = {}
    for domain in DOMAINS:
        common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": SUITE_VERSION}}
        configs[f"kvshrink_{domain}_ppl"] = {
            **common,
            "dataset_kwargs": {"data_files": {"test": str(data_dir / f"{domain}_ppl.jsonl")}},
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": name} for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }
        configs[f"kvshrink_{domain}_lastword"] = {
            **common,
            "dataset_kwargs": {"data_files": {"test": str(data_dir / f"{domain}_lastword.jsonl")}},
            "output_type": "multiple_choice",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return configs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def default_suite_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvshrink" / "eval-tasks"


def build_offline_suite(cache_dir: Path | None = None) -> Path:
    """Write the suite's data and task YAMLs (once per content hash) and return the folder for `include_path`."""
    heldout = {domain: corpus_text(domain, "heldout") for domain in DOMAINS}
    digest = hashlib.sha256(json.dumps([SUITE_VERSION, heldout], sort_keys=True).encode()).hexdigest()[:16]
    suite_dir = (cache_dir or default_suite_cache()).resolve() / f"v{SUITE_VERSION}-{digest}"
    if (suite_dir / "suite.json").is_file():
        return suite_dir
    passages = {"pydoc": _pydoc_passages, "kjv": _kjv_passages}
    with atomic_output_dir(suite_dir, overwrite=True) as staging:
        for domain, text in heldout.items():
            documents = [{"text": document} for document in _evenly_spaced(_documents(text), PPL_DOCS)]
            _write_jsonl(staging / f"{domain}_ppl.jsonl", documents)
            _write_jsonl(staging / f"{domain}_lastword.jsonl", _lastword_items(passages[domain](text)))
        # The YAMLs name the final folder, which exists once the staging folder is renamed into place.
        for name, config in _task_configs(suite_dir).items():
            (staging / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
        (staging / "suite.json").write_text(json.dumps({"version": SUITE_VERSION, "hash": digest}) + "\n")
    return suite_dir


def suite_hash(suite_dir: Path) -> str:
    return json.loads((suite_dir / "suite.json").read_text())["hash"]
