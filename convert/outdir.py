"""Output folders that appear whole or not at all: written beside the target, renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvshrink.convert.errors import KvshrinkError


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output folder that exists (unless overwrite) or that lies inside the source."""
    out = out.resolve()
    if source is not None:
        source = source.resolve()
        if out == source or source in out.parents:
            raise KvshrinkError(
                f"output {out} is inside the source {source}: choose an output folder outside the source"
            )
    if out.exists() and not overwrite:
        raise KvshrinkError(f"output {out} already exists: remove it, choose another, or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise KvshrinkError(f"output {out} exists and is not a folder: remove it or choose another path")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error it is deleted."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise KvshrinkError(f"output {out} appeared while writing: remove it or pass --overwrite")
        shutil.rmtree(out)
    staging.rename(out)
