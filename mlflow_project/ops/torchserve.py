"""Run one local TorchServe: render its config.properties, start it, wait until it serves, stop it, read its log.

Used by `make serve` / `make stop` (through the CLI below), by `make demo` (mlflow_project/ops/demo.py) and by the
integration tests and benches (tests/support/torchserve.py).

An instance owns a work directory: ``config.properties`` (a base file such as deploy/config.properties with
overrides), ``torchserve.out``, ``logs/`` (LOG_LOCATION, METRICS_LOCATION), ``tmp/`` (TMPDIR and java.io.tmpdir:
TorchServe's workers talk to the frontend over ``<java.io.tmpdir>/.ts.sock.<initial_worker_port + n>``, so a
private directory keeps two instances on one host apart) and ``key_file.json`` (token auth: TorchServe writes it
into its working directory). It runs in its own process group and is stopped by signalling that group (the
launcher, the Java frontend and its Python workers), never with ``torchserve --stop``, which could hit another
instance.

CLI (a detached server and its pid file)::

    python -m mlflow_project.ops.torchserve start --config deploy/config.properties --model-store model_store \
        --workdir .run/serve
    python -m mlflow_project.ops.torchserve stop --pid-file .run/serve/torchserve.pid
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import requests

from handlers import deployment
from mlflow_project.ops.processes import DetachedServer, running_pid, stop_pid_file

REPO = Path(__file__).resolve().parents[2]
TORCHSERVE = Path(sys.executable).with_name("torchserve")
METRICS_YAML = REPO / "deploy" / "metrics.yaml"
ADDRESSES = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
GRPC_PORTS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}
PORT_NAMES = (*ADDRESSES, *GRPC_PORTS)
# TorchServe 0.12's own defaults, for a base file that does not set them
TS_DEFAULTS = {"inference_address": "http://127.0.0.1:8080", "management_address": "http://127.0.0.1:8081",
               "metrics_address": "http://127.0.0.1:8082", "grpc_inference_port": "7070",
               "grpc_management_port": "7071"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def read_properties(path: Path | str) -> dict[str, str]:
    """key -> value of a .properties file (comments and blank lines skipped; a repeated key: the last wins)."""
    return deployment.read_properties(str(path))


def render_config(base: Path | str | None, overrides: Mapping[str, str]) -> str:
    """The base file's text (comments and order kept) with every key of ``overrides`` set in place; the keys the
    base does not have are appended."""
    lines, done = [], set()
    for line in Path(base).read_text(encoding="utf-8").splitlines() if base is not None else []:
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith(("#", "!")) and key in overrides:
            line = f"{key}={overrides[key]}"
            done.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in done]
    return "\n".join(lines) + "\n"


class TorchServe(DetachedServer):
    """One TorchServe process serving ``models`` (names of .mar files in ``model_store``, "all", or None to keep
    the base config's ``load_models``).

    ``ports``: "free" (five free loopback ports), "config" (as the base config says) or a mapping of some of
    ``PORT_NAMES`` to ports (the others free). ``token_auth``: None follows the base config's
    ``disable_token_authorization`` (TorchServe's default, ON, without one). ``properties`` are set last.
    """

    name = "torchserve"

    def __init__(
        self,
        model_store: Path | str,
        workdir: Path | str,
        models: Iterable[str] | str | None = None,
        *,
        base_config: Path | str | None = None,
        ports: Mapping[str, int] | str = "free",
        host: str = "127.0.0.1",
        properties: Mapping[str, str] | None = None,
        metrics_config: Path | str | None = METRICS_YAML,
        token_auth: bool | None = None,
        worker_port: int | None = None,
        jvm_args: str = "-Xmx1g",
        env: Mapping[str, str] | None = None,
        pid_file: Path | str | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.models = None if models is None else [models] if isinstance(models, str) else list(models)
        self.base_config = Path(base_config) if base_config is not None else None
        self.base = read_properties(self.base_config) if self.base_config is not None else {}
        if token_auth is None:
            token_auth = self.base.get("disable_token_authorization", "false").strip().lower() != "true"
        self.token_auth = token_auth
        self.host = host
        self.keep_ports = ports == "config"
        if self.keep_ports:
            self.ports = {n: int(self.base.get(k, TS_DEFAULTS[k])) for n, k in GRPC_PORTS.items()}
            self.addresses = {n: self.base.get(k, TS_DEFAULTS[k]) for n, k in ADDRESSES.items()}
            self.ports.update({n: int(a.rsplit(":", 1)[1]) for n, a in self.addresses.items()})
        else:
            given = {} if isinstance(ports, str) else dict(ports)
            if isinstance(ports, str) and ports != "free" or set(given) - set(PORT_NAMES):
                raise ValueError(f"ports: 'free', 'config' or a mapping of {', '.join(PORT_NAMES)}; got {ports!r}")
            self.ports = {n: int(given.get(n) or free_port(host)) for n in PORT_NAMES}
            # the base address's scheme (http or https) with this instance's host and port
            self.addresses = {n: f"{self.base.get(k, 'http://').split('://', 1)[0]}://{host}:{self.ports[n]}"
                              for n, k in ADDRESSES.items()}
        self.metrics_config = Path(metrics_config).resolve() if metrics_config is not None else None
        self.worker_port = worker_port
        self.jvm_args = jvm_args
        self.env = dict(env or {})
        self.properties = dict(properties or {})
        self.pid_file = Path(pid_file) if pid_file is not None else None
        self.log_dir = self.workdir / "logs"
        self.tmp_dir = self.workdir / "tmp"
        self.proc: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return self.addresses["inference"]

    @property
    def management_url(self) -> str:
        return self.addresses["management"]

    @property
    def metrics_url(self) -> str:
        return self.addresses["metrics"]

    def config_overrides(self) -> dict[str, str]:
        """What this instance sets over the base config."""
        props: dict[str, str] = {}
        if not self.keep_ports:
            props.update({k: self.addresses[n] for n, k in ADDRESSES.items()})
            props.update({k: str(self.ports[n]) for n, k in GRPC_PORTS.items()})
        for key in ("grpc_inference_address", "grpc_management_address"):  # gRPC on loopback, not 0.0.0.0
            if key not in self.base:
                props[key] = self.host
        props["model_store"] = str(self.model_store)
        if self.models is not None:
            props["load_models"] = ",".join(m if m == "all" or m.endswith(".mar") else f"{m}.mar"
                                            for m in self.models)
        if self.metrics_config is not None:
            props["metrics_config"] = str(self.metrics_config)
        props["disable_token_authorization"] = "false" if self.token_auth else "true"
        if self.worker_port:
            props["initial_worker_port"] = str(self.worker_port)
        props["vmargs"] = f"{self.jvm_args} -Djava.io.tmpdir={self.tmp_dir}".strip()
        props.update(self.properties)
        return props

    def write_config(self) -> Path:
        path = self.workdir / "config.properties"
        path.write_text(render_config(self.base_config, self.config_overrides()), encoding="utf-8")
        return path

    def launch(self) -> subprocess.Popen:
        """Start the process (its own session and process group) and return at once; see :meth:`wait_ready`."""
        if not TORCHSERVE.is_file():
            raise FileNotFoundError(f"torchserve not found at {TORCHSERVE}: install requirements/serve.txt "
                                    "(make setup)")
        if not self.model_store.is_dir():
            raise FileNotFoundError(f"model store {self.model_store} is not a directory")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        # TS_CONFIG_FILE: TorchServe's own pointer to its config file, through which the StealGuard handler reads
        # its stealguard_* properties (handlers/deployment.py)
        env = {**os.environ, **self.env, "TMPDIR": str(self.tmp_dir), "LOG_LOCATION": str(self.log_dir),
               "METRICS_LOCATION": str(self.log_dir), "TS_CONFIG_FILE": str(config)}
        cmd = [str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(self.model_store)]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        return self.spawn(cmd, self.workdir / "torchserve.out", cwd=self.workdir, env=env)

    def not_ready(self) -> str:
        """What is not ready yet ("" when everything is)."""
        try:
            r = requests.get(f"{self.inference_url}/ping", headers=self.token_header("inference"), timeout=2)
            pinged = r.status_code == 200
        except requests.RequestException:
            pinged = False
        if not pinged:
            return f"no 200 from {self.inference_url}/ping"
        names = [m.removesuffix(".mar") for m in self.models or [] if m != "all"]
        missing = [n for n in names if not self.model_ready(n)]
        return f"no READY worker for {', '.join(missing)}" if missing else ""

    def model_ready(self, name: str) -> bool:
        try:
            r = requests.get(f"{self.management_url}/models/{name}", headers=self.token_header("management"),
                             timeout=2)
            return r.status_code == 200 and any(
                w.get("status") == "READY" for m in r.json() for w in m.get("workers", []))
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def token_header(self, kind: str) -> dict[str, str]:
        """The Authorization header for ``kind`` ("inference", "management") with token auth on, else {}."""
        if not self.token_auth:
            return {}
        try:
            key = json.loads((self.workdir / "key_file.json").read_text(encoding="utf-8"))[kind]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return {"Authorization": f"Bearer {key}"}

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of torchserve.out, model_log.log and ts_log.log."""
        lines: list[str] = []
        for name in ("torchserve.out", "logs/model_log.log", "logs/ts_log.log"):
            p = self.workdir / name
            if p.is_file():
                lines.append(f"--- {name}")
                lines.extend(p.read_text(errors="replace").splitlines()[-n:])
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ CLI


def _existing(kind: str):
    def check(value: str) -> str:
        p = Path(value)
        if not (p.is_file() if kind == "file" else p.is_dir()):
            raise argparse.ArgumentTypeError(f"{value}: no such {kind}")
        return value
    return check


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return v


def _models(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{value!r}: comma-separated archive names, none empty")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.ops.torchserve",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a detached TorchServe, wait until it serves, write its pid file")
    s.add_argument("--config", required=True, type=_existing("file"),
                   help="base config.properties (its addresses and ports are used as they are)")
    s.add_argument("--model-store", required=True, type=_existing("directory"))
    s.add_argument("--workdir", required=True, help="config, logs, tmp, key_file.json")
    s.add_argument("--pid-file", help="default: <workdir>/torchserve.pid")
    s.add_argument("--models", type=_models, help="comma-separated archives to load (default: the config's "
                   "load_models) and wait for")
    s.add_argument("--metrics-config", type=_existing("file"), default=str(METRICS_YAML))
    s.add_argument("--jvm-args", default="-Xmx1g", help="vmargs besides -Djava.io.tmpdir")
    s.add_argument("--timeout", type=_positive, default=120.0, help="seconds to wait until it serves")
    s.add_argument("--stop-command", help="what to tell the user to run to stop it (default: this CLI's stop)")
    t = sub.add_parser("stop", help="stop the TorchServe of a pid file (its whole process group)")
    t.add_argument("--pid-file", required=True)
    t.add_argument("--timeout", type=_positive, default=30.0, help="seconds after SIGTERM before SIGKILL")
    return p


def cmd_start(a: argparse.Namespace) -> int:
    pid_file = a.pid_file or os.path.join(a.workdir, "torchserve.pid")
    stop_cmd = a.stop_command or f"python -m mlflow_project.ops.torchserve stop --pid-file {pid_file}"
    running = running_pid(pid_file)
    if running is not None:
        print(f"TorchServe already running (pid {running}); run {stop_cmd} first")
        return 1
    ts = TorchServe(a.model_store, a.workdir, models=a.models, base_config=a.config, ports="config",
                    metrics_config=a.metrics_config, jvm_args=a.jvm_args, pid_file=pid_file)
    proc = ts.launch()
    logs = os.path.join(a.workdir, "logs", "")
    try:
        ts.wait_ready(a.timeout)
    except RuntimeError as e:  # it exited
        print(e)
        Path(pid_file).unlink(missing_ok=True)
        return 1
    except TimeoutError as e:
        print(f"{str(e).splitlines()[0]} (still running as pid {proc.pid}): see {logs}, {stop_cmd}")
        return 1
    except BaseException:
        ts.stop()
        raise
    print(f"TorchServe ready on {ts.inference_url} (pid {proc.pid}, logs {logs})")
    if ts.token_auth:
        print('token auth ON: send -H "Authorization: Bearer <inference key>" '
              f"(keys: {os.path.join(a.workdir, 'key_file.json')})")
    print(f"stop it with: {stop_cmd}")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    return stop_pid_file(a.pid_file, "TorchServe", a.timeout)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    return cmd_start(a) if a.command == "start" else cmd_stop(a)


if __name__ == "__main__":
    sys.exit(main())
