"""Process groups the launchers (and the tests' servers) start with ``start_new_session=True``: one way to
tell whether a group is alive, one way to stop it (SIGTERM, then SIGKILL), and the pid files of detached servers
(read, and stop what one names), used by ops/torchserve.py, ops/prometheus.py, ops/demo.py and the integration
tests' MLflow, Ray and demo servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


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


def read_pid(pid_file: Path | str) -> int | None:
    """The pid in ``pid_file``; None when there is no such file."""
    try:
        text = Path(pid_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit() or int(text) <= 1:
        raise ValueError(f"{pid_file} does not hold a pid: {text[:40]!r}")
    return int(text)


def running_pid(pid_file: Path | str) -> int | None:
    """The pid in ``pid_file`` when its process group is alive; None when there is no file, it holds no pid, or
    the group is gone."""
    try:
        pid = read_pid(pid_file)
    except ValueError:
        return None
    return pid if pid is not None and group_alive(pid) else None


def stop_pid_file(pid_file: Path | str, what: str, timeout: float = 30.0) -> int:
    """Stop the detached server ``what`` whose group leader's pid is in ``pid_file`` (its whole process group),
    say what happened, and remove the pid file; the CLI exit code (1 only if the group survived SIGKILL)."""
    pid_file = Path(pid_file)
    try:
        pid = read_pid(pid_file)
    except ValueError as e:
        print(f"{what} is not running ({e}; removed it)")
        pid_file.unlink()
        return 0
    if pid is None:
        print(f"{what} is not running (no {pid_file})")
        return 0
    if not group_alive(pid):  # also a pid reused by a process that does not lead a group
        print(f"{what} (pid {pid}) was not running")
    elif stop_group(pid, timeout):
        print(f"{what} (pid {pid}) stopped")
    else:
        print(f"{what} (pid {pid}): process group {pid} survived SIGKILL; pid file kept")
        return 1
    pid_file.unlink(missing_ok=True)
    return 0


class DetachedServer:
    """What the launchers (ops/torchserve.py, ops/prometheus.py) share: a server process started in its own
    session and process group (:meth:`spawn`, its pid in ``pid_file`` when one is given), waited for until
    :meth:`not_ready` says nothing is missing, and stopped by signalling its group (:meth:`stop`, which removes the
    pid file it wrote). Subclasses set ``name`` and ``pid_file`` and define ``launch``, ``not_ready`` and ``tail``."""

    name = "server"
    pid_file: Path | None = None
    proc: subprocess.Popen | None = None

    def launch(self) -> subprocess.Popen:
        raise NotImplementedError

    def not_ready(self) -> str:
        """What is not ready yet ("" when everything is)."""
        raise NotImplementedError

    def tail(self, n: int = 60) -> str:
        return ""

    def spawn(self, cmd: Sequence[str], log: Path, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(list(cmd), cwd=cwd, env=None if env is None else dict(env),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if self.pid_file is not None:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self.proc.pid}\n", encoding="utf-8")
        return self.proc

    def start(self, timeout: float = 120.0):
        """Launch and wait until it serves; stop it if it does not."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll :meth:`not_ready` until it is empty; RuntimeError if the process exits, TimeoutError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            waiting = self.not_ready()
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {waiting}\n{self.tail()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL if it outlives ``timeout``; removes the pid file."""
        if self.proc is None:
            return
        stop_group(self.proc.pid, timeout, self.proc)  # start_new_session: the process leads its own group
        if self.pid_file is not None:
            try:
                if read_pid(self.pid_file) == self.proc.pid:
                    self.pid_file.unlink()
            except ValueError:
                pass
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
