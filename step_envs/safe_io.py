"""Writes that never lose or mislabel data, shared by every command that writes an output folder.

- ``folder_lock(folder, command)``: one writer per output folder (collect, import-robomimic, train-policy,
  train-predictor, export). The lock is ``.<name>.lock`` beside the folder, holding the writer's pid; it is an
  ``flock``, so the kernel drops it when the process dies and a stale file of a dead pid is simply taken over.
- ``replacing_folder(final)``: build a folder's new contents in a hidden sibling and rename it into place only
  when complete; the old folder survives any failure (datasets, exports).
- ``commit_files(folder, writers)``: replace several files of a folder as one set (a checkpoint's weights,
  config and training state), so that after a kill they are all old or all new.
- ``fault_point(name)``: a test hook that kills the process at an exact point (tests/test_faults.py).

The renames are POSIX renames within one folder (atomic on a local file system).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# ------------------------------------------------------------------ fault injection (tests only)
FAULT_ENV = "STEP_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: with ``STEP_FAULT=<name>:<n>`` set, the n-th arrival at this point SIGKILLs the process.

    Tests use it to kill a run exactly between two saves or inside one, instead of after a guessed delay.
    Points: ``train-step`` (after each training step, its log record and save), ``commit-staged`` (a file set is
    written but not committed), ``commit-rename`` (after each rename of a committed set), ``folder-swap`` (between
    the two renames that swap a folder in). Unset (always, outside tests) it costs one dictionary lookup.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        _kill()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs, as with a power cut or the OOM killer


# ------------------------------------------------------------------ one file
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling, then rename it over ``path``: a kill leaves the old file or the new."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ one writer per output folder
class FolderLockedError(RuntimeError):
    """Another live process is writing the same output folder."""


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
        info = {}
    if "pid" not in info:
        return "another process"
    return (f"pid {info['pid']} (`step {info.get('command', '?')}` on {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


@contextmanager
def folder_lock(folder: str | Path, command: str, wait: bool = False):
    """Hold the lock of an output folder for the block; FolderLockedError at once if a live process has it, or,
    with ``wait``, block until it lets go (a short read-modify-write such as a bench ``--merge``)."""
    folder = Path(folder).resolve()
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderLockedError(
                f"{folder} is being written by {holder}; wait for it to finish or choose another output folder "
                f"(lock file {path})."
            ) from None
        try:  # the previous holder may have removed the file between our open and flock: lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    info = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking, so no one locks a file that is being removed
        os.close(fd)


# ------------------------------------------------------------------ a folder replaced as a whole
def _siblings(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.{kind}-*"))


def recover_folder(final: str | Path) -> None:
    """Undo what a killed ``replacing_folder`` left: partial builds are deleted, a half-done swap is rolled back.

    Call it only while holding the folder's writer lock (it deletes hidden siblings of ``final``).
    """
    final = Path(final)
    for partial in _siblings(final, "new"):
        shutil.rmtree(partial, ignore_errors=True)
    old = _siblings(final, "old")
    if old and not final.exists():  # killed between the two renames of a swap: put the old folder back
        os.rename(old.pop(), final)
    for leftover in old:
        shutil.rmtree(leftover, ignore_errors=True)


def interrupted_swap(final: str | Path) -> Path | None:
    """The old copy of ``final`` that a swap killed half-way left beside it (readers mention it in errors)."""
    final = Path(final)
    old = _siblings(final, "old") if not final.exists() else []
    return old[-1] if old else None


@contextmanager
def replacing_folder(final: str | Path):
    """Yield a fresh path beside ``final`` to build into; on success the new folder takes ``final``'s place.

    The yielded folder (``.<name>.new-<pid>``) does not exist yet; the block creates and fills it, and should
    check it. On any exception it is deleted and ``final`` is untouched. On success the old ``final`` is renamed
    away, the new one renamed into place, and the old one deleted (a kill between the two renames is undone by
    ``recover_folder``, which this calls first). Hold the writer lock of the folder that contains ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    new = final.parent / f".{final.name}.new-{os.getpid()}"
    try:
        yield new
        if not new.exists():
            raise RuntimeError(f"Nothing was written to {new}.")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    fault_point("folder-swap")
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ several files committed as one set
COMMIT_PREFIX = ".commit-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_commit(folder: Path, record: Path) -> None:
    try:
        staged = json.loads(record.read_text())
    except FileNotFoundError:
        return  # another process completed it meanwhile
    for name, staged_name in staged.items():
        try:
            os.replace(folder / staged_name, folder / name)
        except FileNotFoundError:
            pass  # already renamed
        fault_point("commit-rename")
    record.unlink(missing_ok=True)


def finish_commits(folder: str | Path) -> None:
    """Complete the renames of a file set whose commit a kill interrupted; idempotent, safe for any reader.

    A folder without commit records (every folder but one a kill hit mid-save) is only listed, never written.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for record in sorted(folder.glob(COMMIT_PREFIX + "*.json")):
        try:
            _apply_commit(folder, record)
        except PermissionError:
            return  # a read-only copy: nothing a reader can do; the writer will complete it


_STAGED = re.compile(r".+\.new-\d+-\d+$|^\.commit-\d+-\d+\.json\.tmp$")  # names commit_files stages under


def discard_staged(folder: str | Path) -> None:
    """Delete staged files that a kill left before their commit record (writer only, after finish_commits)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for staged in folder.iterdir():
        if _STAGED.match(staged.name) and staged.is_file():
            staged.unlink(missing_ok=True)


def commit_files(folder: str | Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace the files ``writers`` names in ``folder`` as one set: after a kill, all old or all new.

    ``writers`` maps a file name to a function writing that file's new content to the path it is given. Every
    file is first written in full under a staging name (``<name>.new-<token>``); then a commit record listing
    them is written atomically (``.commit-<token>.json``); then each staged file is renamed over its target and
    the record removed. A kill before the record leaves the old set; a kill after it is completed by
    ``finish_commits``, which readers (``agents.checkpoint``) and writers call before they read.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = f"{time.time_ns()}-{os.getpid()}"
    staged = {}
    for name, write in writers.items():
        path = folder / f"{name}.new-{token}"
        write(path)
        _fsync(path)
        staged[name] = path.name
    fault_point("commit-staged")
    record = folder / f"{COMMIT_PREFIX}{token}.json"
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(staged))
    _fsync(tmp)
    os.replace(tmp, record)
    _apply_commit(folder, record)
