"""Recipes: overrides, typed validation, and errors that name the key and the fix before any model loads."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from kvshrink.convert.cli import kvshrink_cli
from kvshrink.convert.errors import KvshrinkError
from kvshrink.uptrain.cli import uptrain_cli
from kvshrink.uptrain.recipe import apply_override, load_recipe, recipe_from_dict


def test_overrides_reach_nested_keys_and_parse_as_yaml(tiny_llama_dir, tiny_llama_teacher_dir, write_recipe):
    path = write_recipe(model=str(tiny_llama_dir), teacher=str(tiny_llama_teacher_dir), loss={"kind": "distill"})
    recipe = load_recipe(
        path, ["optimizer.lr=3e-4", "schedule.warmup_steps=5", "teacher=null", "loss.kind=lm", "data.0.corpus=kjv",
               "optimizer.betas=[0.8, 0.9]", "max_steps=7"]
    )
    assert recipe.optimizer.lr == 3e-4  # YAML reads 3e-4 as text; the recipe reads it as a number
    assert recipe.schedule.warmup_steps == 5
    assert recipe.teacher is None
    assert recipe.data[0].corpus == "kjv"
    assert recipe.optimizer.betas == (0.8, 0.9)
    assert recipe.total_steps(num_processes=1) == 7


def test_token_budgets_become_whole_steps(tiny_llama_dir, write_recipe):
    path = write_recipe(model=str(tiny_llama_dir), max_steps=None, max_tokens=1000)
    assert load_recipe(path).total_steps(num_processes=1) == 16  # ceil(1000 / (32 * 2))
    assert load_recipe(path).total_steps(num_processes=2) == 8
    fraction = load_recipe(path, ["max_tokens=null", "pretraining_fraction=0.05", "pretraining_tokens=2e4"])
    assert fraction.total_steps(num_processes=1) == 16  # 5% of 20k tokens = 1000


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"learning_rate": 1}, "unknown recipe key learning_rate: known keys"),
        ({"seq_lenn": 64}, "unknown recipe key seq_lenn: did you mean seq_len?"),
        ({"optimizer": {"lrr": 1e-3}}, "unknown recipe key optimizer.lrr: did you mean optimizer.lr?"),
        ({"optimizer": {"lr": "fast"}}, "recipe key optimizer.lr must be a number, got 'fast'"),
        ({"seq_len": 3.5}, "recipe key seq_len must be a whole number, got 3.5"),
        ({"trainable": "mlp"}, "recipe key trainable is 'mlp': choose one of all, attention, new"),
        ({"packing": "yes"}, "recipe key packing must be true or false"),
        ({"precision": "fp16"}, "recipe key precision is 'fp16': choose one of auto, fp32, bf16"),
        ({"max_tokens": 10}, "exactly one budget, got max_steps, max_tokens"),
        ({"max_steps": None}, "exactly one budget, got none"),
        ({"max_steps": 0}, "recipe key max_steps is 0: it must be greater than 0"),
        (
            {"loss": {"kind": "distill"}},
            "loss.kind is distill but there is no teacher: set teacher=PATH, or loss.kind=lm"
        ),
        ({"data": [{"corpus": "wiki"}]}, "data.0.corpus is 'wiki': choose one of pydoc, kjv"),
        ({"data": [{"corpus": "pydoc", "path": "x.txt"}]}, "data.0 must set exactly one of corpus, path, hf"),
        ({"data": [{"path": "x.txt"}]}, "no validation text: set validation.sources"),
        ({"output_dir": None}, "recipe key output_dir cannot be null"),
        (
            {"data": [{"corpus": "pydoc", "weight": 1}, {"corpus": "kjv"}]},
            "some data sources have a weight and some do not"
        ),
        ({"data": [{"corpus": "pydoc", "weight": 0}]}, "data.0.weight is 0: it must be greater than 0"),
        (
            {"data": [{"hf": "x", "weight": 1}]},
            "data.0 is a streamed HF dataset, which is read in its own order and cannot be weighted"
        ),
        (
            {"validation": {"sources": [{"corpus": "kjv", "weight": 1}]}},
            "validation.sources.0 has a weight, which only sets the training mix"
        ),
    ],
)
def test_invalid_recipes_are_refused_by_name(raw, message):
    base = {"model": "m", "output_dir": "o", "max_steps": 1}
    base.update(raw)
    with pytest.raises(KvshrinkError, match=message.replace("?", r"\?").replace("(", r"\(")):
        recipe_from_dict(base)


def test_missing_model_key_is_named():
    with pytest.raises(KvshrinkError, match="recipe key model is required: add `model: ...`"):
        recipe_from_dict({"output_dir": "o", "max_steps": 1})


def test_override_errors():
    with pytest.raises(KvshrinkError, match="is not key=value"):
        apply_override({}, "max_steps")
    with pytest.raises(KvshrinkError, match="data.3: '3' is not an index of a 1-item list"):
        apply_override({"data": [{"corpus": "pydoc"}]}, "data.3.corpus=kjv")


def test_inputs_are_checked_before_loading(tmp_path, tiny_llama_dir, write_recipe):
    with pytest.raises(KvshrinkError, match="model nowhere is not a model folder"):
        load_recipe(write_recipe(model="nowhere"))
    with pytest.raises(KvshrinkError, match="trainable: new needs .*kvshrink_report.json"):
        load_recipe(write_recipe(model=str(tiny_llama_dir), trainable="new"))
    with pytest.raises(KvshrinkError, match="data path .*missing.txt does not exist"):
        load_recipe(write_recipe(model=str(tiny_llama_dir), data=[{"path": str(tmp_path / "missing.txt")}],
                                 validation={"fraction": 0.1}))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(KvshrinkError, match="is not valid YAML at line"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("command", [[], ["uptrain"]])
def test_cli_prints_one_line_and_exits_1(tmp_path, write_recipe, command):
    cli = kvshrink_cli if command else uptrain_cli
    result = CliRunner().invoke(cli, [*command, str(write_recipe(model=str(tmp_path))), "optimizer.lrr=1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: unknown recipe key optimizer.lrr: did you mean optimizer.lr?"
    ]


def test_cli_help_tells_the_usage():
    result = CliRunner().invoke(kvshrink_cli, ["uptrain", "--help"])
    assert result.exit_code == 0
    assert "accelerate launch" in result.output and "--resume" in result.output


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[2].joinpath("recipes").glob("*-[cg]pu.yaml"))
    assert {path.name for path in recipes} >= {"smollm2-mqa-cpu.yaml", "smollm2-mla-cpu.yaml",
                                               "llama2-7b-gqa8-gpu.yaml", "llama2-7b-mla-gpu.yaml"}
    for path in recipes:
        if not path.name.startswith("pipeline-"):
            recipe_from_dict(yaml.safe_load(path.read_text()))
