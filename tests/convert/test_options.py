"""Options are declared once: the typed models agree with the libraries' choices, and every field is a CLI flag."""

from __future__ import annotations

from typing import get_args

import pytest
from click.testing import CliRunner

from kvshrink.convert import engines, gqa
from kvshrink.convert.cli import convert_cli
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
])  # fmt: skip
def test_every_option_is_a_flag_with_its_description(command, model, skipped):
    help_text = " ".join(CliRunner().invoke(convert_cli, [command, "--help"]).output.split())
    for name, field in model.model_fields.items():
        if name in skipped or (field.json_schema_extra or {}).get("cli") is False:
            continue
        assert "--" + name.replace("_", "-") in help_text, name
        assert " ".join(field.description.split()[:4]) in help_text, name
