"""Who is writing an output: every run that writes OUT first claims it beside OUT, with a record of its process.

Two kinds of claim live in OUT's parent folder:

- a staging folder `.OUT.partial-XXXX` (outdir.atomic_output_dir), which becomes OUT when complete and holds an
  owner record (OWNER_FILE) while it is written;
- a lock file `.OUT.lock-XXXX` (run_lock), which is the owner record itself, held by runs that write into OUT in
  place (uptrain's output_dir, the pipeline's folder).

An owner record names the process id, the host and the process's start (so that a later process reusing the
pid is not taken for the owner). A run that targets OUT first makes its own claim, then looks at the others:
a claim whose owner no longer runs on this host is removed (one line on stderr, with the bytes freed); one whose
owner runs, or runs on another host (which cannot be checked), makes the run refuse unless it breaks the lock.
Claiming before looking means two runs starting at once see each other and refuse; neither writes over the other.

A staging folder without an owner record was written by an older kvshrink (or by a run in its first
milliseconds): it is removed once nothing in it changed for OWNERLESS_STALE_AFTER, and refused before that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from kvshrink.convert.errors import KvshrinkError

BREAK_LOCK_FLAG = "--break-lock"  # every command that writes a folder has it (ConvertOptions.break_lock for converters)
BREAK_LOCK_HELP = (
    "Write the output even when another run seems to be writing it (a live process on this host, or one on another "
    "host, which cannot be checked): that run's staging folder or lock is removed. What killed runs left is removed "
    "without this flag."
)
OWNER_FILE = ".kvshrink-owner.json"
STAGING_MARK = ".partial-"
LOCK_MARK = ".lock-"
OWNERLESS_STALE_AFTER = 24 * 3600  # seconds; a live run of an older kvshrink writes its staging far more often
UNKNOWN_START = "unknown"  # the platform cannot tell when a process started: any live process with the pid owns it

break_lock_option = click.option(BREAK_LOCK_FLAG, is_flag=True, help=BREAK_LOCK_HELP)
OVERWRITE_HELP = "Replace OUT if it exists."
overwrite_option = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)


def _process_start(pid: int) -> str | None:
    """When process `pid` started, as an id no later process with the same pid shares; None when no process runs
    under `pid` (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():
            return _process_start_without_proc(pid)
        return UNKNOWN_START if _hidden_but_running(pid) else None
    fields = stat.rsplit(")", 1)[1].split()  # the command name before ")" may hold spaces
    state, start_ticks = fields[0], fields[19]  # stat fields 3 and 22 (starttime, clock ticks since boot)
    if state in ("Z", "X"):
        return None
    return f"{_boot_id()}:{start_ticks}"


def _hidden_but_running(pid: int) -> bool:
    """/proc mounted with hidepid shows no other user's processes; signal 0 still finds them (and is refused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str:
    """Ticks since boot repeat after a reboot; the boot id tells boots apart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start_without_proc(pid: int) -> str | None:
    """macOS and other systems without /proc: psutil (which accelerate already needs) reads the start time."""
    try:
        import psutil
    except ImportError:
        return UNKNOWN_START
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else f"{process.create_time():.6f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # access denied: the process exists
        return UNKNOWN_START


@dataclass(frozen=True)
class Owner:
    """The process that made a claim, and when."""

    pid: int
    host: str
    process_start: str
    since: float  # seconds since the epoch

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The record of process `pid` on this host, stamped now."""
        return cls(pid, socket.gethostname(), _process_start(pid) or UNKNOWN_START, time.time())

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        """The record at `path`, or None when it is missing or unreadable (a claim in its first moments)."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(record["pid"]), str(record["host"]), str(record["process_start"]), float(record["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def runs(self) -> bool:
        """Whether the owner still runs; only asked on its own host."""
        now = _process_start(self.pid)
        if now is None:
            return False
        return UNKNOWN_START in (now, self.process_start) or now == self.process_start

    def __str__(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"process {self.pid} on {self.host} since {since}"


@dataclass(frozen=True)
class Claim:
    """A staging folder or lock file of some OUT, and its owner (None: no readable owner record)."""

    path: Path
    owner: Owner | None

    def last_change(self) -> float:
        """The newest modification time of anything in the claim (a run writes its staging as it goes)."""
        times = [self.path.lstat().st_mtime]
        for folder, _, files in os.walk(self.path):
            times += [os.lstat(os.path.join(folder, name)).st_mtime for name in files]
        return max(times)


def claims_on(out: Path) -> list[Claim]:
    """Every staging folder and lock file of `out` in its parent folder."""
    if not out.parent.is_dir():
        return []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError as error:
        raise KvshrinkError(
            f"{out.parent} cannot be listed ({error.strerror}): choose an output folder in one you can read"
        ) from None
    found = []
    for path in entries:
        if path.name.startswith(f".{out.name}{STAGING_MARK}") and path.is_dir():
            found.append(Claim(path, Owner.read(path / OWNER_FILE)))
        elif path.name.startswith(f".{out.name}{LOCK_MARK}") and path.is_file():
            found.append(Claim(path, Owner.read(path)))
    return found


def _bytes_in(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(os.lstat(os.path.join(folder, name)).st_size for folder, _, files in os.walk(path) for name in files)


def _size_text(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def remove_left_over(path: Path, whose: str) -> None:
    """Delete what a run that no longer writes left behind (`whose` says which run), saying so on stderr."""
    try:
        freed = _bytes_in(path)
    except FileNotFoundError:  # another run removed it first
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if os.path.lexists(path):  # not ours to delete (another user's): say so, and go on
        print(f"could not remove {path}, left by {whose}: remove it by hand", file=sys.stderr)
    else:
        print(f"removed {path}, left by {whose}: freed {_size_text(freed)}", file=sys.stderr)


def _blocker(out: Path, claim: Claim) -> str | None:
    """Why `claim` stops a new run from writing `out`, or None when it is stale (its run is gone)."""
    owner = claim.owner
    if owner is None:
        idle = time.time() - claim.last_change()
        if idle >= OWNERLESS_STALE_AFTER:
            return None
        return (f"{out} has {claim.path.name} without an owner record, changed {idle / 60:.0f} min ago (an older "
                f"kvshrink's run, or one starting now): wait for it, or pass {BREAK_LOCK_FLAG} if no run writes "
                f"{out.name} (after {OWNERLESS_STALE_AFTER // 3600} h untouched it is removed)")
    if not owner.on_this_host:
        return (f"{out} is being written by {owner}, another host, where kvshrink cannot tell whether it still runs: "
                f"wait for it, or pass {BREAK_LOCK_FLAG} if that run is gone")
    if owner.runs():
        return (f"{out} is being written by {owner}: wait for it, or pass {BREAK_LOCK_FLAG} if that process does "
                "not write it")
    return None


def _whose(claim: Claim) -> str:
    if claim.owner is None:
        return f"an older kvshrink's run (untouched for {OWNERLESS_STALE_AFTER // 3600} h or more)"
    return f"{claim.owner}, which no longer runs"


def _is_mine(claim: Claim) -> bool:
    """A claim of this very process (its own staging, or a lock it holds around writers of the same OUT)."""
    owner = claim.owner
    return owner is not None and owner.on_this_host and owner.pid == os.getpid() and owner.runs()


def settle_claims(out: Path, break_lock: bool = False, shared: bool = False) -> None:
    """Remove the stale claims on `out`; refuse in one line if another run is writing it.

    break_lock: remove every other run's claim, live or not. shared: other runs may write the same content at
    once (a cache), so their live claims are left alone instead of refused.
    """
    out = Path(out).resolve()
    blockers = []
    for claim in claims_on(out):
        if _is_mine(claim):
            continue
        try:
            blocker = _blocker(out, claim)
        except FileNotFoundError:  # renamed into place or removed since it was listed
            continue
        if blocker is None:
            remove_left_over(claim.path, _whose(claim))
        elif break_lock:
            remove_left_over(claim.path, f"{claim.owner or 'a run without an owner record'} ({BREAK_LOCK_FLAG})")
        else:
            blockers.append(blocker)
    if blockers and not shared:  # after removing the stale claims, which a refused run leaves no reason to keep
        raise KvshrinkError(blockers[0])


def make_staging(out: Path, break_lock: bool = False, shared: bool = False) -> Path:
    """A new staging folder beside `out`, claimed by this process, after settling the other claims on `out`."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    try:
        Owner.of(os.getpid()).write(staging / OWNER_FILE)
        settle_claims(out, break_lock, shared)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def release_staging(staging: Path) -> None:
    """Drop the owner record before the staging folder becomes OUT: it describes the writing, not the result."""
    (staging / OWNER_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(out: str | Path, break_lock: bool = False) -> Iterator[Path]:
    """Hold a lock on `out` while this run writes into it in place: another run that targets `out` refuses, and a
    lock or staging that killed runs left on `out` is removed. Yields `out`, resolved."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}{LOCK_MARK}", dir=out.parent, suffix=".json")
    lock = Path(name)
    try:
        os.close(handle)
        Owner.of(os.getpid()).write(lock)
        settle_claims(out, break_lock)
        yield out
    finally:
        lock.unlink(missing_ok=True)
