"""Worker processes that never outlive the process that started them.

``ProcessPoolExecutor`` workers block waiting for work; if the parent is killed (``kill -9``, an
out-of-memory kill) nobody tells them, and they wait forever. :func:`die_with_parent` is a pool
``initializer`` that ties each worker's life to its parent's: on Linux the kernel sends the worker
``SIGKILL`` when the parent dies (``PR_SET_PDEATHSIG``); everywhere a daemon thread notices that
the worker was re-parented and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Pool initializer: end this worker as soon as process ``parent_pid`` is gone.

    Args:
        parent_pid: ``os.getpid()`` of the process that creates the pool.
        poll_seconds: how often the fallback thread checks the parent.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc: the thread still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
