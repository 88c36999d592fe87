"""The shipped production config (deploy/config.properties) is safe by default, proven on a real TorchServe
started with it: unauthenticated inference and management requests are refused, the inference, management,
metrics and gRPC addresses listen on loopback only, and the model-control API is off.

The file is used as shipped except: its five ports are rewritten to free ones, model_store and metrics_config
are resolved to absolute paths (as `make serve` does), and two isolation settings are appended (a private
java.io.tmpdir and initial_worker_port, so the worker sockets cannot collide with another TorchServe on this
machine). The test checks that every other setting reaches TorchServe unchanged.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mlflow_project.lifecycle.package import build_archive, stage
from tests.support.torchserve import REPO, TorchServe
from tests.support.victims import export, make_net

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHIPPED = REPO / "deploy" / "config.properties"
ADDRESSES = {"inference_address": "inference", "management_address": "management", "metrics_address": "metrics"}
PORTS = {"grpc_inference_port": "grpc_inference", "grpc_management_port": "grpc_management"}
PATHS = ("model_store", "metrics_config")
ADDED = ("vmargs", "initial_worker_port")
MODEL = "sec_identity"


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class ShippedConfigServer(TorchServe):
    """A TorchServe started with deploy/config.properties (ports, paths and isolation rewritten only)."""

    def __init__(self, model_store: Path, workdir: Path) -> None:
        super().__init__(model_store, workdir, models=[MODEL], token_auth=True)
        self.shipped = read_properties(SHIPPED)

    def write_config(self) -> Path:
        props = dict(self.shipped)
        for key, port in ADDRESSES.items():
            props[key] = re.sub(r":\d+$", f":{self.ports[port]}", props[key])
        for key, port in PORTS.items():
            props[key] = str(self.ports[port])
        props["model_store"] = str(self.model_store)
        props["metrics_config"] = str((REPO / props["metrics_config"]).resolve())
        props["vmargs"] = f"-Xmx512m -XX:+UseSerialGC -Djava.io.tmpdir={self.workdir / 'tmp'}"
        props["initial_worker_port"] = str(self.worker_port)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")
        return path

    def keys(self) -> dict[str, str]:
        doc = json.loads((self.workdir / "key_file.json").read_text())
        return {kind: doc[kind]["key"] for kind in ("inference", "management", "API") if kind in doc}

    def auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = requests.get(f"{self.management_url}/models/{MODEL}", headers=self.auth("management"),
                                 timeout=2)
                if r.status_code == 200 and any(w.get("status") == "READY" for w in r.json()[0]["workers"]):
                    return
            except (requests.RequestException, OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"torchserve not ready after {timeout:.0f}s:\n{self.tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ShippedConfigServer]:
    root = tmp_path_factory.mktemp("security")
    victim = export(make_net("mlp", seed=0), "eager", root / "src", "mlp")
    staged = stage(root / "stage", victim=victim, defense={"name": "identity"}, input_spec={"shape": [64]})
    build_archive(MODEL, staged, root / "store")
    ts = ShippedConfigServer(root / "store", root / "ts")
    ts.start(timeout=240)
    try:
        yield ts
    finally:
        ts.stop()


def test_the_shipped_file_says_loopback_token_auth_and_no_model_api():
    props = read_properties(SHIPPED)
    for key in ADDRESSES:
        assert re.fullmatch(r"https?://127\.0\.0\.1:\d+", props[key]), (key, props[key])
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"


def test_only_ports_paths_and_isolation_were_rewritten(server):
    used = read_properties(server.workdir / "config.properties")
    rewritten = set(ADDRESSES) | set(PORTS) | set(PATHS)
    assert set(used) == set(server.shipped) | set(ADDED)
    for key, value in server.shipped.items():
        if key not in rewritten:
            assert used[key] == value, key
    for key in ADDRESSES:  # the host part is the shipped one
        assert used[key].rsplit(":", 1)[0] == server.shipped[key].rsplit(":", 1)[0]


def assert_refused(r: requests.Response) -> None:
    """TorchServe 0.12 refuses a missing or wrong token with 400 InvalidKeyException (not 401)."""
    assert r.status_code in (400, 401), (r.status_code, r.text)
    assert r.json()["type"] == "InvalidKeyException", r.text
    assert "Token Authorization failed" in r.json()["message"], r.text


def test_unauthenticated_inference_is_refused(server):
    url = f"{server.inference_url}/predictions/{MODEL}"
    body = {"instances": [[0.1] * 64]}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, server.auth("management")):
        r = requests.post(url, json=body, headers=headers, timeout=30)
        assert_refused(r)
        assert "probabilities" not in r.text
    ok = requests.post(url, json=body, headers=server.auth("inference"), timeout=30)
    assert ok.status_code == 200, ok.text  # the refusal is the token check, not a broken model
    assert len(ok.json()["predictions"]) == 1


def test_unauthenticated_management_is_refused(server):
    url = f"{server.management_url}/models"
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, server.auth("inference")):
        r = requests.get(url, headers=headers, timeout=30)
        assert_refused(r)
        assert MODEL not in r.text
        assert_refused(requests.delete(f"{url}/{MODEL}", headers=headers, timeout=30))
        assert_refused(requests.put(f"{url}/{MODEL}", params={"min_worker": 3}, headers=headers, timeout=30))
    ok = requests.get(url, headers=server.auth("management"), timeout=30)
    assert ok.status_code == 200 and MODEL in ok.text


def test_the_model_api_is_off_even_with_the_management_key(server):
    url = f"{server.management_url}/models"
    auth = server.auth("management")
    register = requests.post(url, params={"url": f"{MODEL}.mar", "model_name": "again"}, headers=auth, timeout=60)
    assert register.status_code >= 400, register.text
    assert "model api" in register.text.lower() or "not allowed" in register.text.lower(), register.text
    delete = requests.delete(f"{url}/{MODEL}", headers=auth, timeout=60)
    assert delete.status_code >= 400, delete.text
    still = requests.post(f"{server.inference_url}/predictions/{MODEL}", json=[[0.0] * 64],
                          headers=server.auth("inference"), timeout=30)
    assert still.status_code == 200, "the model is still served: the delete did nothing"


def _listening(pids: set[int]) -> dict[int, set[str]]:
    """port -> local addresses of the LISTEN TCP sockets owned by ``pids`` (from /proc)."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    target = fd.readlink().as_posix()
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found: dict[int, set[str]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = local.split(":")
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(bytes.fromhex(hexaddr[i : i + 8])[::-1] for i in range(0, width, 8))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped  # Java listens on an IPv6 socket bound to ::ffff:127.0.0.1
            found.setdefault(int(hexport, 16), set()).add(str(addr))
    return found


def _group_pids(pgid: int) -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp
            pids.add(int(stat.parent.name))
    return pids


def test_every_listening_socket_is_on_loopback(server):
    listening = _listening(_group_pids(server.proc.pid))
    for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management"):
        port = server.ports[name]
        assert listening.get(port) == {"127.0.0.1"}, (name, port, listening)
    for port, addrs in listening.items():
        assert addrs == {"127.0.0.1"}, f"port {port} listens on {addrs}"
    r = requests.get(f"{server.metrics_url}/metrics", timeout=30)
    assert r.status_code == 200 and "ts_inference_requests_total" in r.text
