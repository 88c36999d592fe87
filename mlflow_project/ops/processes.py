"""Process groups the launchers (and the tests' servers) start with ``start_new_session=True``: one way to
tell whether a group is alive and one way to stop it (SIGTERM, then SIGKILL), used by ops/torchserve.py,
ops/demo.py and the integration tests' MLflow, Prometheus and demo servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> bool:
    """SIGTERM to process group ``pgid``, SIGKILL if any of it outlives ``timeout``; True once the group is gone.
    ``proc`` (the group leader, when it is our child) is reaped: a zombie still counts in its group."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()
            else:
                try:
                    os.waitpid(pgid, os.WNOHANG)
                except ChildProcessError:
                    pass
            if not group_alive(pgid):
                return True
            time.sleep(0.2)
    return not group_alive(pgid)
