"""mlflow_project/ops/torchserve.py without a TorchServe: config rendering, readiness errors, process-group
stop, pid files and the CLI's argument errors (the real servers are in tests/integration/)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlflow_project.ops import processes
from mlflow_project.ops import torchserve as tl

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "config.properties"
DEV = REPO / "deploy" / "config.dev.properties"


def test_render_config_keeps_the_base_and_sets_overrides_in_place(tmp_path):
    base = tmp_path / "base.properties"
    base.write_text("# a comment\nb=1\nmodel_store=store\n\na=2\nb=3\n")
    text = tl.render_config(base, {"b": "9", "new": "x", "model_store": "/abs"})
    assert text == "# a comment\nb=9\nmodel_store=/abs\n\na=2\nb=9\nnew=x\n"
    assert tl.render_config(None, {"k": "v"}) == "k=v\n"


def test_the_shipped_config_with_its_own_ports(tmp_path):
    ts = tl.TorchServe(tmp_path, tmp_path / "ts", base_config=SHIPPED, ports="config")
    base = tl.read_properties(SHIPPED)
    assert ts.token_auth is True  # disable_token_authorization=false
    assert ts.inference_url == base["inference_address"] and ts.metrics_url == base["metrics_address"]
    assert ts.ports["grpc_inference"] == int(base["grpc_inference_port"])
    ts.workdir.mkdir()
    used = tl.read_properties(ts.write_config())
    assert set(used) == set(base) | {"vmargs"}
    assert used["model_store"] == str(tmp_path.resolve())
    assert used["metrics_config"] == str(REPO / "deploy" / "metrics.yaml")
    assert used["vmargs"] == f"-Xmx1g -Djava.io.tmpdir={ts.workdir / 'tmp'}"
    for key in ("inference_address", "grpc_inference_port", "disable_token_authorization", "load_models",
                "enable_model_api", "max_request_size"):
        assert used[key] == base[key], key
    # the comments of the shipped file are kept
    assert (ts.workdir / "config.properties").read_text().startswith(SHIPPED.read_text().splitlines()[0])


def test_free_ports_models_and_overrides(tmp_path):
    ts = tl.TorchServe(tmp_path, tmp_path / "ts", ["a", "b.mar"], base_config=DEV, worker_port=23456,
                       properties={"enable_model_api": "true", "vmargs": "-Xmx256m"})
    assert ts.token_auth is False  # the dev file turns it off
    assert len(set(ts.ports.values())) == 5
    assert ts.inference_url == f"http://127.0.0.1:{ts.ports['inference']}"
    props = ts.config_overrides()
    assert props["management_address"] == f"http://127.0.0.1:{ts.ports['management']}"
    assert props["grpc_management_port"] == str(ts.ports["grpc_management"])
    assert props["load_models"] == "a.mar,b.mar"
    assert props["disable_token_authorization"] == "true"
    assert props["initial_worker_port"] == "23456"
    assert props["enable_model_api"] == "true" and props["vmargs"] == "-Xmx256m"  # properties win
    assert "grpc_inference_address" not in props  # the dev file binds gRPC to loopback itself


def test_no_base_file_binds_grpc_to_loopback_and_takes_given_ports(tmp_path):
    ts = tl.TorchServe(tmp_path, tmp_path / "ts", "all", ports={"inference": 18080}, token_auth=True)
    props = ts.config_overrides()
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["load_models"] == "all" and props["disable_token_authorization"] == "false"
    with pytest.raises(ValueError, match="ports"):
        tl.TorchServe(tmp_path, tmp_path / "ts", ports="fixed")
    with pytest.raises(ValueError, match="ports"):
        tl.TorchServe(tmp_path, tmp_path / "ts", ports={"http": 1})


def test_an_exited_server_is_reported_with_its_code_and_log(tmp_path):
    ts = tl.TorchServe(tmp_path, tmp_path / "ts")
    ts.workdir.mkdir()
    (ts.workdir / "torchserve.out").write_text("line 1\nJava not found\n")
    ts.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    ts.proc.wait()
    with pytest.raises(RuntimeError, match=r"(?s)torchserve exited with code 3:\n--- torchserve.out\n.*Java not found"):
        ts.wait_ready(5)


class _Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        ok = self.path == "/ping"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "Healthy"}' if ok else b"[]")

    def log_message(self, *args):
        pass


def test_not_ready_says_what_is_missing(tmp_path):
    ts = tl.TorchServe(tmp_path, tmp_path / "ts", ["m1", "m2"])
    with pytest.raises(TimeoutError, match=r"not ready after 0s: no 200 from http://127.0.0.1:\d+/ping"):
        ts.wait_ready(0.1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        ts = tl.TorchServe(tmp_path, tmp_path / "ts", ["m1", "m2"], ports={"inference": port, "management": port})
        with pytest.raises(TimeoutError, match="no READY worker for m1, m2"):
            ts.wait_ready(0.1)
    finally:
        server.shutdown()
        server.server_close()


def _group(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"up\n"
    return proc


def test_stop_group_escalates_to_sigkill():
    proc = _group("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                  "time.sleep(60)")
    assert processes.stop_group(proc.pid, timeout=0.5, proc=proc)
    assert proc.returncode == -9  # SIGTERM is ignored: only the SIGKILL it escalated to ended the 60 s sleep
    assert not processes.group_alive(proc.pid)
    assert processes.stop_group(proc.pid)  # already gone


def test_pid_files(tmp_path):
    pid_file = tmp_path / "ts.pid"
    assert processes.read_pid(pid_file) is None
    assert processes.running_pid(pid_file) is None
    pid_file.write_text("abc\n")
    with pytest.raises(ValueError, match="does not hold a pid: 'abc'"):
        processes.read_pid(pid_file)
    assert processes.running_pid(pid_file) is None
    pid_file.write_text("1234\n")
    assert processes.read_pid(pid_file) == 1234
    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")
    assert processes.running_pid(pid_file) is None
    live = _group("import time; print('up', flush=True); time.sleep(60)")
    try:
        pid_file.write_text(f"{live.pid}\n")
        assert processes.running_pid(pid_file) == live.pid
    finally:
        processes.stop_group(live.pid, 1, live)


def test_cli_stop(tmp_path, capsys):
    pid_file = tmp_path / "torchserve.pid"
    assert tl.main(["stop", "--pid-file", str(pid_file)]) == 0
    assert f"TorchServe is not running (no {pid_file})" in capsys.readouterr().out
    pid_file.write_text("junk")
    assert tl.main(["stop", "--pid-file", str(pid_file)]) == 0
    assert "does not hold a pid" in capsys.readouterr().out and not pid_file.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")
    assert tl.main(["stop", "--pid-file", str(pid_file)]) == 0
    assert f"TorchServe (pid {dead.pid}) was not running" in capsys.readouterr().out and not pid_file.exists()

    live = _group("import time; print('up', flush=True); time.sleep(60)")
    pid_file.write_text(f"{live.pid}\n")
    # start refuses while the pid file names a live group (no server is started)
    store = tmp_path / "store"
    store.mkdir()
    argv = ["start", "--config", str(DEV), "--model-store", str(store), "--workdir", str(tmp_path),
            "--pid-file", str(pid_file), "--stop-command", "make stop"]
    assert tl.main(argv) == 1
    assert f"TorchServe already running (pid {live.pid}); run make stop first" in capsys.readouterr().out
    assert not (tmp_path / "config.properties").exists()
    try:
        assert tl.main(["stop", "--pid-file", str(pid_file), "--timeout", "5"]) == 0
        assert f"TorchServe (pid {live.pid}) stopped" in capsys.readouterr().out
        live.wait(timeout=5)
        assert not pid_file.exists() and not processes.group_alive(live.pid)
    finally:
        processes.stop_group(live.pid, 1, live)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: command"),
        (["stop"], "the following arguments are required: --pid-file"),
        (["start", "--model-store", ".", "--workdir", "w"], "the following arguments are required: --config"),
        (["start", "--config", "nope.properties", "--model-store", ".", "--workdir", "w"],
         "--config: nope.properties: no such file"),
        (["start", "--config", str(DEV), "--model-store", "no_store", "--workdir", "w"],
         "--model-store: no_store: no such directory"),
        (["start", "--config", str(DEV), "--model-store", ".", "--workdir", "w", "--timeout", "0"],
         "--timeout: 0 must be > 0"),
        (["start", "--config", str(DEV), "--model-store", ".", "--workdir", "w", "--models", "a,,b"],
         "--models: 'a,,b': comma-separated archive names, none empty"),
        (["stop", "--pid-file", "p", "--timeout", "x"], "--timeout: 'x' is not a number"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tl.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
