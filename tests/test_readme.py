"""The README's CLI reference is the commands' real --help, and its support matrix is the family specs' (regenerate
with `make readme`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_cli_reference_matches_the_real_help():
    script = Path(__file__).resolve().parent.parent / ".ci" / "readme_cli.py"
    spec = importlib.util.spec_from_file_location("readme_cli", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = module.README.read_text()
    assert module.readme_with_reference(current) == current, "README's CLI reference is stale: run `make readme`"
