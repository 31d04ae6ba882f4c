"""Options are declared once: the typed models agree with the libraries' choices, and every field is a CLI flag."""

from __future__ import annotations

from typing import get_args

import click
import pytest
from click.testing import CliRunner

from kvshrink.convert import engines, gqa
from kvshrink.convert.cli import convert_cli, kvshrink_cli
from kvshrink.convert.mla.head_norms import HEAD_NORM_FITS
from kvshrink.convert.mla.lowrank import FACTORIZATIONS
from kvshrink.convert.mla.rope import ROPE_METHODS
from kvshrink.convert.options import GqaOptions, MlaOptions


def _choices(model, field: str) -> set[str]:
    return set(get_args(model.model_fields[field].annotation))


def test_choices_match_what_the_libraries_implement():
    assert _choices(GqaOptions, "method") == set(gqa.method_names())
    assert _choices(MlaOptions, "rope_method") == set(ROPE_METHODS)
    assert _choices(MlaOptions, "factorization") == set(FACTORIZATIONS)
    assert _choices(MlaOptions, "head_norm_fit") == set(HEAD_NORM_FITS)
    assert _choices(MlaOptions, "target") == set(engines.TARGETS)


@pytest.mark.parametrize(("command", "model", "skipped"), [
    ("mha-to-gqa", GqaOptions, set()), ("mha-to-mqa", GqaOptions, {"groups"}), ("mha-to-mla", MlaOptions, set()),
])
def test_every_option_is_a_flag_with_its_description(command, model, skipped):
    help_text = " ".join(CliRunner().invoke(convert_cli, [command, "--help"]).output.split())
    for name, field in model.model_fields.items():
        if name in skipped or (field.json_schema_extra or {}).get("cli") is False:
            continue
        assert "--" + name.replace("_", "-") in help_text, name
        assert " ".join(field.description.split()[:4]) in help_text, name


def _commands(group, path=()):
    """(words, command) for every command under `group`, lazily imported subgroups included."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _required_options():
    for words, command in _commands(kvshrink_cli):
        for param in command.params:
            if isinstance(param, click.Option) and param.required:
                yield pytest.param(words, command, param, id=f"{' '.join(words)} {param.opts[-1]}")


@pytest.mark.parametrize(("words", "command", "missing"), list(_required_options()))
def test_a_missing_required_option_is_reported_the_click_way(words, command, missing):
    given = [value for param in command.params if param is not missing and param.required
             for value in ([param.opts[0], "1"] if isinstance(param, click.Option) else ["1"])]
    result = CliRunner().invoke(kvshrink_cli, [*words, *given])
    assert result.exit_code == 2, result.output
    assert f"Error: Missing option {' / '.join(repr(flag) for flag in missing.opts)}." in result.output, result.output
