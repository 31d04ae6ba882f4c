"""The offline accuracy tasks can tell a real model from chance (otherwise they could not show degradation)."""

from __future__ import annotations

import json

import pytest

from kvshrink.eval.offline_suite import CLOZE_CHOICES, OFFLINE_TASKS
from kvshrink.eval.options import EvalOptions
from kvshrink.eval.run import run_eval

# A subset keeps the test fast: SmolLM2 scores ~0.85 against a chance of 0.25, so 40 items (standard error
# ~0.06) still clear 3 standard errors by a wide margin.
ITEMS = 40


@pytest.fixture
def one_torch_thread():
    """Tests share 2 busy cores; there torch's default of one thread per core spins waiting for a core, and a
    single thread runs this test several times faster."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_smollm2_beats_chance_on_the_cloze_tasks_by_three_standard_errors(smollm2_dir, tmp_path, one_torch_thread):
    cloze_tasks = [task for task in OFFLINE_TASKS if task.endswith("_cloze")]
    (result_dir,) = run_eval([smollm2_dir], tmp_path / "run", EvalOptions(tasks=cloze_tasks, limit=ITEMS, device="cpu"))
    results = json.loads((result_dir / "results.json").read_text())["results"]
    for task in cloze_tasks:
        accuracy, stderr = results[task]["acc,none"], results[task]["acc_stderr,none"]
        assert accuracy - 1 / CLOZE_CHOICES > 3 * stderr, (task, accuracy, stderr)
