"""`kvshrink eval run` and `eval compare` on tiny byte-level models: files written, tables right, errors clear."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_per_token
from kvshrink.eval.offline_suite import OFFLINE_TASKS

LIMIT = 3


def invoke(*args: str):
    return CliRunner().invoke(kvshrink_cli, ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    result = invoke("run", tiny_models["mha"], tiny_models["gqa"], "--tasks", "offline", "--limit", LIMIT, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_run_writes_lm_eval_results_and_kvshrink_metadata(run_dir, tiny_models):
    assert json.loads((run_dir / "run.json").read_text()) == {"models": ["mha", "gqa"], "tasks": list(OFFLINE_TASKS)}
    for name in ("mha", "gqa"):
        results = json.loads((run_dir / name / "results.json").read_text())
        assert set(results["results"]) == set(OFFLINE_TASKS)
        for task in OFFLINE_TASKS:
            assert results["n-samples"][task]["effective"] == LIMIT
            scores = results["results"][task]
            if task.endswith("_cloze"):
                assert 0 <= scores["acc,none"] <= 1 and scores["acc_stderr,none"] >= 0
            else:
                # A random byte model knows nothing: about one token of 300 per byte, ~8 bits.
                assert 6 < scores["bits_per_byte,none"] < 10
        metadata = json.loads((run_dir / name / "kvshrink.json").read_text())
        config = json.loads((tiny_models[name] / "config.json").read_text())
        assert metadata["model"] == str(tiny_models[name].resolve())
        assert metadata["architecture"] == "LlamaForCausalLM"
        # no window, no state: what a sequence holds per token is the same at every length
        held = {str(context): kv_bytes_per_token(config) for context in LONG_CONTEXTS}
        assert metadata["bytes_held_per_token_at_context"] == held
        assert metadata["conversion_report"] is None and metadata["limit"] == LIMIT


def test_compare_writes_markdown_tables_and_a_png_plot(run_dir, tmp_path):
    result = invoke("compare", run_dir, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    for task in OFFLINE_TASKS:
        assert f"### {task}" in markdown and task in result.output
    base_row = next(line for line in markdown.splitlines() if line.startswith("| mha |"))
    assert "+0.0000" in base_row and "100.0%" in base_row and "1.00×" in base_row
    gqa_rows = [line for line in markdown.splitlines() if line.startswith("| gqa |")]
    assert len(gqa_rows) == len(OFFLINE_TASKS) and all("2.00×" in row for row in gqa_rows)
    png = (tmp_path / "cmp" / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "cmp" / "comparison.png")
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0


def test_compare_refuses_results_over_different_tasks(run_dir, tmp_path):
    other = tmp_path / "gqa"
    shutil.copytree(run_dir / "gqa", other)
    results = json.loads((other / "results.json").read_text())
    del results["results"]["kvshrink_kjv_cloze"]
    (other / "results.json").write_text(json.dumps(results))
    result = invoke("compare", run_dir / "mha", other, "--out", tmp_path / "cmp")
    assert result.exit_code == 1
    assert "different tasks" in result.output and "gqa lacks kvshrink_kjv_cloze" in result.output
    assert not (tmp_path / "cmp").exists()


def test_results_written_without_bytes_held_take_them_from_the_model_or_are_refused(run_dir, tmp_path):
    other = tmp_path / "gqa"
    shutil.copytree(run_dir / "gqa", other)
    metadata = json.loads((other / "kvshrink.json").read_text())
    del metadata["bytes_held_per_token_at_context"]  # as an older `eval run` wrote it
    (other / "kvshrink.json").write_text(json.dumps(metadata))
    result = invoke("compare", run_dir / "mha", other, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output  # from the model folder's config.json, still there
    gqa_rows = [line for line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines() if "| gqa |" in line]
    assert gqa_rows and all("2.00×" in row for row in gqa_rows)
    (other / "kvshrink.json").write_text(json.dumps({**metadata, "model": str(tmp_path / "gone")}))
    result = invoke("compare", run_dir / "mha", other, "--out", tmp_path / "cmp2")
    assert result.exit_code == 1 and not (tmp_path / "cmp2").exists()
    assert "predate bytes held at 32,768 tokens of context and its model folder is gone: rerun" in result.output


def test_compare_refuses_results_over_different_numbers_of_items(run_dir, tmp_path):
    other = tmp_path / "gqa"
    shutil.copytree(run_dir / "gqa", other)
    results = json.loads((other / "results.json").read_text())
    results["n-samples"]["kvshrink_kjv_cloze"]["effective"] = LIMIT + 1
    (other / "results.json").write_text(json.dumps(results))
    result = invoke("compare", run_dir / "mha", other, "--out", tmp_path / "cmp")
    assert result.exit_code == 1
    expected = f"kvshrink_kjv_cloze was scored on different numbers of items (mha: {LIMIT}, gqa: {LIMIT + 1})"
    assert expected in result.output


def test_compare_refuses_results_scored_on_different_offline_data(run_dir, tmp_path):
    other = tmp_path / "gqa"
    shutil.copytree(run_dir / "gqa", other)
    metadata = json.loads((other / "kvshrink.json").read_text())
    metadata["offline_suite"] = "0" * 16
    (other / "kvshrink.json").write_text(json.dumps(metadata))
    result = invoke("compare", run_dir / "mha", other, "--out", tmp_path / "cmp")
    assert result.exit_code == 1 and "offline suite's data differ" in result.output


def test_unknown_task_names_close_matches(tiny_models, tmp_path):
    result = invoke("run", tiny_models["mha"], "--tasks", "kvshrink_kjv_clozee,hellaswag", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "unknown task 'kvshrink_kjv_clozee'" in result.output and "kvshrink_kjv_cloze" in result.output
    assert not (tmp_path / "o").exists()


def test_missing_model_folder_is_named(tmp_path):
    result = invoke("run", tmp_path / "nowhere", "--tasks", "offline", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert f"model folder {tmp_path / 'nowhere'} does not exist" in result.output
    assert not (tmp_path / "o").exists()


def test_compare_needs_eval_run_output(tmp_path):
    result = invoke("compare", tmp_path, "--out", tmp_path / "cmp")
    assert result.exit_code == 1 and "holds no results.json or run.json" in result.output


def test_run_refuses_a_model_it_cannot_size_before_scoring_anything(tiny_models, tmp_path, monkeypatch):
    import lm_eval

    def never(**_):
        raise AssertionError("lm-eval scored a model before every model was sized")

    monkeypatch.setattr(lm_eval, "simple_evaluate", never)
    model = tmp_path / "recurrent"
    shutil.copytree(tiny_models["gqa"], model)
    config = json.loads((model / "config.json").read_text())
    # recurrent layers that are not GraniteMoeHybrid's Mamba-2 mixers: no state size kvshrink knows
    config["layer_types"] = ["linear_attention"] + ["full_attention"] * (config["num_hidden_layers"] - 1)
    (model / "config.json").write_text(json.dumps(config))
    result = invoke("run", tiny_models["mha"], model, "--tasks", "offline", "--limit", LIMIT, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "are not Mamba-2 mixers, whose state kvshrink can size" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
