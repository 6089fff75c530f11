"""One writer per output: a lock that refuses a second ``vpl`` run writing into the same place.

Two runs with different settings writing into one CAM folder would silently mix their files (a
rerun skips finished images, so nothing would ever repair the mix). Every command that writes takes
an exclusive, non-blocking ``flock`` on a small lock file beside its output for as long as it runs:

* a folder output ``OUT/`` is locked through ``OUT/.vpl.lock``;
* a file output ``DIR/name.pt`` through ``DIR/.name.pt.lock``.

The operating system releases the lock when the holder exits, however it exits (``kill -9``
included), so a lock never outlives its run and there is nothing stale to clean up by hand. The
lock file keeps the holder's description (command, process id, host, start time), which the
refusal quotes. Processes of one ``torchrun`` job share the lock (they see the same
``TORCHELASTIC_RUN_ID``). Once it holds the lock, a run removes the temporary files a killed run
left in the folder (see :func:`vpl_plugin._io.remove_stale_temp_files`).

On systems without ``fcntl`` (Windows) the lock is a no-op with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from vpl_plugin._io import remove_stale_temp_files

__all__ = ["OutputLocked", "lock_file_for", "output_lock"]

log = logging.getLogger(__name__)


#: descriptors of the locks this process holds; a forked child closes its copies at once, so a
#: worker process (``vpl masks --workers``) never keeps its parent's output locked
_HELD: set = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)  # the parent's descriptor keeps the lock; only the child's copy goes
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class OutputLocked(RuntimeError):
    """Another run is writing the same output; the message names it."""


def lock_file_for(output: os.PathLike | str, *, folder: bool) -> Path:
    """The lock file of an output folder (``OUT/.vpl.lock``) or file (``DIR/.NAME.lock``)."""
    output = Path(output)
    return output / ".vpl.lock" if folder else output.parent / f".{output.name}.lock"


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace")
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another vpl run (it has not described itself yet)"
    return (f"`{holder.get('command', 'vpl')}` (process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')})")


@contextmanager
def output_lock(output: os.PathLike | str, command: str, *, folder: bool = True,
                clean_temp: bool = True) -> Iterator[Path]:
    """Hold the lock of ``output`` while the block runs; refuse at once if another run holds it.

    Args:
        output: the output folder (``folder=True``, created if missing) or file.
        command: how the holder is described to a refused run, e.g. ``"vpl cams --out cams"``.
        folder: ``output`` is a folder (lock inside it) or a file (lock beside it).
        clean_temp: after taking the lock, delete the temporary files a killed run left: every
            one in an output folder; beside an output file, only those of its stem.

    Raises:
        OutputLocked: another process (not of this ``torchrun`` job) holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        log.warning("no file locking on this system: nothing stops a second run writing into %s", output)
        yield Path(output)
        return
    path = lock_file_for(output, folder=folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    _HELD.add(fd)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _wait_for_description(fd)
            if run_id and holder.get("run_id") == run_id:  # a sibling rank of this torchrun job
                yield path
                return
            raise OutputLocked(
                f"{output} is being written by {_describe(holder)}; a second run would mix its files "
                f"with that run's. Wait for it to finish, or give this run another output.") from None
        record = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": run_id}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        if clean_temp:
            removed = remove_stale_temp_files(path.parent, None if folder else Path(output).stem)
            if removed:
                log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed),
                         path.parent)
        yield path
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def _wait_for_description(fd: int, seconds: float = 2.0) -> dict:
    """The holder writes its description right after locking: give it a moment to appear."""
    deadline = time.monotonic() + seconds
    holder: Optional[dict] = _holder(fd)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = _holder(fd)
    return holder or {}
