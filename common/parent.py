"""A process started by ps-launch ends with it: `die_with_parent()` asks the kernel (Linux, PR_SET_PDEATHSIG)
for SIGTERM when the launcher that started it dies, however it dies (SIGKILL, the OOM killer).

The launcher names itself in the child's environment (`PARENT_VARIABLE`) instead of setting the request
between fork and exec (a `preexec_fn`): a preexec_fn makes Python fork() where it would otherwise vfork(),
and fork() runs gRPC's fork handlers, which since grpcio 1.81 may restart gRPC's poller in the child and
abort it ("epoll_wait error: Bad file descriptor", grpc/grpc#43055) when the launcher has gRPC running (a
ps-launch called from a test or a notebook). Each ps-* command calls this first thing, so the request is
in place before it does any work; a launcher already dead by then is noticed (the parent is another process)
and answered with SIGTERM at once, as the kernel would have.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_VARIABLE = "ORMO_PS_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """SIGTERM this process when the launcher named in the environment dies (no-op when none is named, or
    off Linux). The variable is removed, so that no process this one starts takes it for its own."""
    launcher = os.environ.pop(PARENT_VARIABLE, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != launcher:  # the launcher died before the request took
        os.kill(os.getpid(), signal.SIGTERM)
