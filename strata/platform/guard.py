"""Launch a replica so that it dies with the cluster process, even one killed by SIGKILL.

``python -m strata.platform.guard PARENT_PID -- command ...`` asks Linux to send SIGTERM
to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``, which survives
``exec``), checks the parent is still ``PARENT_PID`` (it may have died before the
``prctl``), then replaces itself with the command. The cluster's own shutdown path stops
replicas gracefully; this guard covers the case where that path never runs. Elsewhere
than Linux the command is simply executed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    """True when the kernel will signal us on the parent's death."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def main(argv: list[str]) -> None:
    """Parse ``PARENT_PID -- command...``, arm the death signal, exec the command."""
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: python -m strata.platform.guard PARENT_PID -- command ...\n")
        raise SystemExit(2)
    parent = int(argv[0])
    if _set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        raise SystemExit(f"guard: parent {parent} is already gone; not starting {argv[2]}")
    os.execvp(argv[2], argv[2:])  # nosec B606 (the platform's own replica command)


if __name__ == "__main__":
    main(sys.argv[1:])
