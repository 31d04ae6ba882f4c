"""Output folders that appear whole or not at all: written beside the target, renamed into place at the end.

The staging folder records which process writes it (convert/staging.py), so that a later run removes what a killed
run left and refuses to write an OUT that a live run is writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from kvshrink.convert.errors import KvshrinkError
from kvshrink.convert.staging import make_staging, release_staging, settle_claims


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None, break_lock: bool = False) -> None:
    """Refuse an output folder that exists (unless overwrite), that lies inside the source, or that another run
    is writing (unless break_lock); remove what killed runs left beside it. Called before any expensive work."""
    out = out.resolve()
    if source is not None:
        source = source.resolve()
        if out == source or source in out.parents:
            raise KvshrinkError(
                f"output {out} is inside the source {source}: choose an output folder outside the source"
            )
    settle_claims(out, break_lock)
    if out.exists() and not overwrite:
        raise KvshrinkError(f"output {out} already exists: remove it, choose another, or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise KvshrinkError(f"output {out} exists and is not a folder: remove it or choose another path")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(
    out: Path, overwrite: bool = False, break_lock: bool = False, shared: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error it is deleted.

    Another run writing `out` is refused (unless break_lock); with `shared` (a cache that concurrent runs fill
    with the same content) it is left alone and the last rename wins.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging(out, break_lock, shared)
    staging.chmod(0o777 & ~_current_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    release_staging(staging)
    if out.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise KvshrinkError(f"output {out} appeared while writing: remove it or pass --overwrite")
        shutil.rmtree(out)
    staging.rename(out)
