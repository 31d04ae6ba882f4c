"""kvshrink's offline lm-eval task suite: YAML tasks over the held-out corpora, built locally, no downloads.

Two kinds of task, each over both built-in domains (Python's pydoc topics and the King James Bible):

- `kvshrink_<domain>_ppl` (loglikelihood_rolling): held-out documents of about `DOC_CHARS` characters;
  lm-eval reports word_perplexity, byte_perplexity and bits_per_byte.
- `kvshrink_<domain>_cloze` (multiple_choice, 4 options, chance 25%): pick the word that comes next.
  kjv: a held-out verse minus its final word. pydoc: a word of 4+ letters inside a held-out prose sentence,
  with the sentence before it as context. The options are the true word and three distractors drawn from the
  same task's pool of answer words in proportion to their frequency, so a model that only knows which words
  are common scores chance; only reading the context helps. `CLOZE_ITEMS` items, spread evenly over the
  held-out part.

lm-eval needs absolute `data_files` paths, so the suite is written to a cache folder named after a hash of
its data (the held-out text differs between Python versions and `bible` packages); the paths stay valid
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
from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.outdir import atomic_output_dir

SUITE_VERSION = 1
# lm-eval's own aggregation for each perplexity metric, named so it does not warn on every run
PERPLEXITY_METRICS = {
    "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte"
}
DOMAINS = ("pydoc", "kjv")
DOC_CHARS = 2000
PPL_DOCS = 32
CLOZE_ITEMS = 1000
CLOZE_CHOICES = 4
CLOZE_MIN_WORDS = 8
SEED = 1234

OFFLINE_TASKS = tuple(f"kvshrink_{domain}_{kind}" for kind in ("ppl", "cloze") for domain in DOMAINS)
OFFLINE_ALIAS = "offline"

_VERSE_FINAL_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})[.!?;:,]?$")
_PROSE_WORD = re.compile(r"(?<=\s)[A-Za-z]{4,}(?=[\s.,;:!?]|$)")
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


def _kjv_targets(text: str) -> list[tuple[str, str]]:
    """Each verse minus its final word, and that word."""
    targets = []
    for verse in text.splitlines():
        match = _VERSE_FINAL_WORD.match(verse.strip())
        if match and len(verse.split()) >= CLOZE_MIN_WORDS:
            targets.append((match["context"], match["word"]))
    return targets


def _prose_paragraphs(text: str) -> list[str]:
    """pydoc paragraphs that read as prose, joined into one line; code, tables and headings skipped."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip().removeprefix("* ") for line in paragraph.splitlines()]
        joined = " ".join(lines)
        code_marks = sum(joined.count(mark) for mark in "()[]{}=_<>|+")
        if any(line.startswith((">>>", "...", "===", "---")) for line in lines) or code_marks > 0.02 * len(joined):
            continue
        paragraphs.append(joined)
    return paragraphs


def _pydoc_targets(text: str) -> list[tuple[str, str]]:
    """Every word of 4+ letters, with the sentence before it and its own sentence up to the word."""
    targets = []
    for paragraph in _prose_paragraphs(text):
        sentences = _SENTENCE_END.split(paragraph)
        for index, sentence in enumerate(sentences):
            previous = sentences[index - 1] + " " if index else ""
            for match in _PROSE_WORD.finditer(sentence):
                context = (previous + sentence[: match.start()]).rstrip()
                if len(context.split()) >= CLOZE_MIN_WORDS:
                    targets.append((context, match[0]))
    return targets


def _cloze_items(targets: list[tuple[str, str]]) -> list[dict]:
    targets = _evenly_spaced(targets, CLOZE_ITEMS)
    pool = [word for _, word in targets]
    rng = random.Random(SEED)
    items = []
    for context, word in targets:
        options = {word.lower()}
        distractors = []
        while len(distractors) < CLOZE_CHOICES - 1:
            candidate = rng.choice(pool)
            if candidate.lower() not in options:
                options.add(candidate.lower())
                distractors.append(candidate)
        choices = [word, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(word)})
    return items


def _task_configs(data_dir: Path) -> dict[str, dict]:
    def task(domain: str, kind: str, output_type: str, metrics: dict[str, str], higher_is_better: bool, **fields):
        return {
            "dataset_path": "json", "test_split": "test", "metadata": {"version": SUITE_VERSION},
            "dataset_kwargs": {"data_files": {"test": str(data_dir / f"{domain}_{kind}.jsonl")}},
            "output_type": output_type, **fields,
            "metric_list": [{"metric": metric, "aggregation": aggregation, "higher_is_better": higher_is_better}
                            for metric, aggregation in metrics.items()],
        }

    configs = {}
    for domain in DOMAINS:
        configs[f"kvshrink_{domain}_ppl"] = task(
            domain, "ppl", "loglikelihood_rolling", PERPLEXITY_METRICS, False, doc_to_text="", doc_to_target="{{text}}"
        )
        configs[f"kvshrink_{domain}_cloze"] = task(
            domain, "cloze", "multiple_choice", {"acc": "mean", "acc_norm": "mean"}, True,
            doc_to_text="context", doc_to_choice="choices", doc_to_target="label",
        )
    return configs


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _data_files() -> dict[str, str]:
    """The suite's data, file name -> content; cheap to build, so it is rebuilt to know its hash."""
    targets = {"pydoc": _pydoc_targets, "kjv": _kjv_targets}
    files = {}
    for domain in DOMAINS:
        text = corpus_text(domain, "heldout")
        files[f"{domain}_ppl.jsonl"] = _jsonl([{"text": doc} for doc in _evenly_spaced(_documents(text), PPL_DOCS)])
        files[f"{domain}_cloze.jsonl"] = _jsonl(_cloze_items(targets[domain](text)))
    return files


def default_suite_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvshrink" / "eval-tasks"


def build_offline_suite(cache_dir: Path | None = None) -> Path:
    """Write the suite's data and task YAMLs (once per content) and return the folder for lm-eval's include_path.

    The folder is named after a hash of the data, so a change of corpus or of this generator gets a new one.
    """
    files = _data_files()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    suite_dir = (cache_dir or default_suite_cache()).resolve() / f"v{SUITE_VERSION}-{digest}"
    if (suite_dir / "suite.json").is_file():
        return suite_dir
    try:
        with atomic_output_dir(suite_dir, shared=True) as staging:
            for name, content in files.items():
                (staging / name).write_text(content, encoding="utf-8")
            # The YAMLs name the final folder, which exists once the staging folder is renamed into place.
            for name, config in _task_configs(suite_dir).items():
                (staging / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
            (staging / "suite.json").write_text(json.dumps({"version": SUITE_VERSION, "hash": digest}) + "\n")
    except KvshrinkError:
        if not (suite_dir / "suite.json").is_file():
            raise
        # Another run wrote the same suite meanwhile; its copy is identical.
    return suite_dir


def suite_hash(suite_dir: Path) -> str:
    return json.loads((suite_dir / "suite.json").read_text())["hash"]
