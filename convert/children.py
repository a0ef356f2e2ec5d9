"""Processes this one starts (batch workers, the verifying process) end when it does.

Its own module, importing nothing of the package: the verifying process arms it before it
imports torch, and nothing else should delay that import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(parent: int) -> None:
    """End this process when PARENT dies (a SIGKILLed batch must not leave workers holding its
    stdout open): the kernel's parent-death signal on Linux, and a thread that watches the
    parent everywhere (it also covers a parent that died before the signal was armed)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="linconvert-parent-watch").start()
