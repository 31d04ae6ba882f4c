"""`kvshrink pipeline` on a tiny model: every step runs, the report lists every model, --resume skips done steps."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.kvcache import LONG_CONTEXTS, kv_bytes_at_context
from kvshrink.eval.pipeline import load_pipeline

WINDOWED = {"name": "mqa-mean-w16", "command": "add-sliding-window", "source": "mqa-mean",
            "options": {"window": 16, "full_layers": 0.5, "calibration_length": 96, "calibration_tokens": 192,
                        "check": False}}


def _write(path, content) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


@pytest.fixture
def pipeline_file(tmp_path, tiny_models):
    recipe = _write(tmp_path / "recipe.yaml", {
        "model": "set-by-pipeline", "output_dir": "set-by-pipeline", "teacher": "set-by-pipeline",
        "max_steps": 2, "seq_len": 32, "micro_batch_size": 2, "loss": {"kind": "distill"},
        "validation": {"sources": [{"corpus": "pydoc"}], "max_tokens": 256}, "trainable": "new",
    })
    return _write(tmp_path / "pipeline.yaml", {
        "source": str(tiny_models["mha"]),
        "output_dir": str(tmp_path / "run"),
        "conversions": [
            {"name": "gqa2", "command": "mha-to-gqa", "options": {"groups": 2, "check_tokens": 256,
                                                                  "calibration_tokens": 2048}},
            {"name": "mqa-mean", "command": "mha-to-mqa", "options": {"method": "mean", "check": False}},
            WINDOWED,
        ],
        "uptraining": [{"conversion": "mqa-mean", "recipe": recipe}],
        "evaluation": {"tasks": ["kvshrink_kjv_cloze"], "limit": 8, "batch_size": 4},
    })


def test_pipeline_runs_every_step_and_resumes(pipeline_file, tmp_path):
    result = CliRunner().invoke(kvshrink_cli, ["pipeline", pipeline_file])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    for label in ("| mha |", "| gqa2 |", "| mqa-mean |", "| mqa-mean-uptrained |", "| mqa-mean-w16 |"):
        assert label in report, report
    assert "gqa/mean + uptrain" in report and "2.00×" in report and "4.00×" in report
    windowed = json.loads((run / "models" / "mqa-mean-w16" / "config.json").read_text())
    assert windowed["architectures"] == ["MinistralForCausalLM"] and windowed["num_key_value_heads"] == 1
    row = next(line for line in report.splitlines() if line.startswith("| mqa-mean-w16 |"))
    assert "window/calibrated" in row
    for context in LONG_CONTEXTS:  # a window's saving shows as bytes held at long context
        assert f"| {kv_bytes_at_context(windowed, context):,.0f} |" in row
    assert (run / "compare" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(run / "report.md") in result.output

    converted = run / "models" / "gqa2" / "model.safetensors"
    stamp = converted.stat().st_mtime_ns
    resumed = CliRunner().invoke(kvshrink_cli, ["pipeline", pipeline_file, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert converted.stat().st_mtime_ns == stamp and "converting" not in resumed.output

    refused = CliRunner().invoke(kvshrink_cli, ["pipeline", pipeline_file])
    assert refused.exit_code != 0 and "already exists" in refused.output and "--overwrite" in refused.output


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda p: p.update(conversion=[]), "unknown pipeline key conversion: did you mean conversions?"),
        (
            lambda p: p["conversions"][0]["options"].update(grups=2),
            "conversion 'gqa2': unknown option 'grups': did you mean groups?"
        ),
        (lambda p: p["conversions"][1].update(name="gqa2"), "must be unique"),
        (lambda p: p["uptraining"][0].update(conversion="mla"), "names conversion 'mla', which is not listed"),
        (
            lambda p: p["conversions"][0].update(command="mha-to-xyz"),
            "choose one of mha-to-gqa, mha-to-mqa, mha-to-mla"
        ),
        (lambda p: p["conversions"][0]["options"].pop("groups"), "conversion 'gqa2': option 'groups' is required"),
        (lambda p: p.update(source="example:llama"), "unknown example"),
        (
            lambda p: p["conversions"][2]["options"].update(window=0),
            "conversion 'mqa-mean-w16': option 'window' is 0: it must be 1 or more"
        ),
        (
            lambda p: p["conversions"][2]["options"].pop("window"),
            "conversion 'mqa-mean-w16': option 'window' is required"
        ),
        (
            lambda p: p["conversions"][2]["options"].update(full_layers=1.5),
            "option 'full_layers' is 1.5: it must be 1 or less"
        ),
        (lambda p: p["conversions"][2].update(source="mqa"), "names source 'mqa', which is not listed"),
        (lambda p: p["conversions"][1].update(source="mqa-mean-w16"), "cycle (mqa-mean -> mqa-mean-w16 -> mqa-mean)"),
        (
            lambda p: p["conversions"][1].update(command="mha-to-mla", options={"kv_budget": 0.5}),
            "cannot window 'mqa-mean' (mha-to-mla)"
        ),
        (
            lambda p: p["conversions"][1].update(command="add-linear-attention", options={}),
            "cannot window 'mqa-mean' (add-linear-attention): its GraniteMoeHybrid output has no sliding window"
        ),
        (
            lambda p: p["conversions"][1].update(command="add-linear-attention", options={"linear_layers": "2.5"}),
            "--linear-layers 2.5 is outside [0, 1)"
        ),
    ],
)
def test_bad_pipeline_files_are_refused_before_any_work(pipeline_file, tmp_path, change, fragment):
    content = yaml.safe_load(open(pipeline_file))
    change(content)
    bad = _write(tmp_path / "bad.yaml", content)
    result = CliRunner().invoke(kvshrink_cli, ["pipeline", bad])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and fragment in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_conversion_runs_after_the_one_it_names_as_source(pipeline_file, tmp_path):
    content = yaml.safe_load(open(pipeline_file))
    content["conversions"].insert(0, content["conversions"].pop())  # the windowed one listed first
    pipeline = load_pipeline(_write(tmp_path / "reordered.yaml", content))
    assert [c.name for c in pipeline.conversions] == ["mqa-mean", "mqa-mean-w16", "gqa2"]
