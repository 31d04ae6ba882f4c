"""The offline suite's data: held-out text only, well-formed cloze items, a stable hash-named folder."""

from __future__ import annotations

import json
from collections import Counter

import yaml

from kvshrink.convert.corpora import corpus_text
from kvshrink.eval.offline_suite import CLOZE_CHOICES, DOMAINS, OFFLINE_TASKS, build_offline_suite


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_suite_is_built_once_with_absolute_paths_to_held_out_data(tmp_path):
    suite = build_offline_suite(tmp_path)
    assert build_offline_suite(tmp_path) == suite
    assert sorted(path.stem for path in suite.glob("*.yaml")) == sorted(OFFLINE_TASKS)
    for task in OFFLINE_TASKS:
        config = yaml.safe_load((suite / f"{task}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert data_file.startswith("/") and (suite / data_file.rsplit("/", 1)[1]).is_file()
    for domain in DOMAINS:
        heldout, train = corpus_text(domain, "heldout"), corpus_text(domain, "train")
        documents = _rows(suite / f"{domain}_ppl.jsonl")
        assert len(documents) >= 16
        assert all(row["text"] in heldout and row["text"] not in train for row in documents)


def test_cloze_items_are_hundreds_of_four_way_questions_with_distractors_as_common_as_answers(tmp_path):
    suite = build_offline_suite(tmp_path)
    for domain in DOMAINS:
        heldout_words = " ".join(corpus_text(domain, "heldout").split())
        items = _rows(suite / f"{domain}_cloze.jsonl")
        assert len(items) >= 500
        answers = Counter(item["choices"][item["label"]] for item in items)
        distractors = Counter(
            choice for item in items for index, choice in enumerate(item["choices"]) if index != item["label"]
        )
        for item in items:
            assert len({choice.lower() for choice in item["choices"]}) == CLOZE_CHOICES
            answer = item["choices"][item["label"]]
            # The answer really is the next word of held-out text.
            assert " ".join([*item["context"].split()[-4:], answer]) in heldout_words
        # Distractors come from the answers' own pool, so word frequency alone cannot pick the answer.
        assert set(distractors) <= set(answers)
        labels = Counter(item["label"] for item in items)
        assert min(labels.values()) > 0.15 * len(items)
