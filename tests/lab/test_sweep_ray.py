"""The sweep's Ray executor against a real local Ray head (``ray start --head`` on 127.0.0.1, its own temp dir,
stopped by its process group) and a real ``mlflow server`` with its artifact proxy: the tiny preset gives the
same points (keys, configs, metrics at one torch thread) and the same recommended point as the local executor,
through the real ``mlflow run . -e sweep`` CLI; a worker killed mid-point is retried and the sweep finishes;
a file tracking store is refused for a multi-node cluster."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.sweep import run as sw
from mlflow_project.sweep.ray_executor import check_tracking_for_cluster
from mlflow_project.sweep.select import POINT_KEY_TAG, RECOMMENDED_TAG, sweep_child_runs
from tests.support.cli import venv_env
from tests.support.mlflow_server import MlflowServer
from tests.support.ray_cluster import RayHead

REPO = Path(__file__).resolve().parents[2]
COMPARED = ("point_key", "defense_config", "label", "seed", *sw.METRIC_COLUMNS)


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=2) as h:
        yield h


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_sweep(server, digits_victim_dir, tmp_path_factory):
    """The tiny preset with the local executor at one torch thread (the module's), logged to the server."""
    return sw.run_sweep("tiny", victim=str(digits_victim_dir), tracking_uri=server.url, experiment="local",
                        results_dir=tmp_path_factory.mktemp("local"), progress=False)


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["point_key"]: r for r in csv.DictReader(f)}


def test_the_ray_cli_sweep_gives_the_local_executors_points_and_selection(head, server, local_sweep,
                                                                          digits_victim_dir, tmp_path):
    out = tmp_path / "ray"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "sweep", "--env-manager", "local",
           "-P", "preset=tiny", "-P", "executor=ray", "-P", f"ray_address={head.address}", "-P", "cpus_per_point=1",
           "-P", f"victim={digits_victim_dir}", "-P", f"results_dir={out}"]
    env = venv_env(MLFLOW_TRACKING_URI=server.url, MLFLOW_EXPERIMENT_NAME="ray", OMP_NUM_THREADS="1",
                   **head.client_env)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"mlflow run -e sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ray_rows, local_rows = read_rows(out / "points.csv"), read_rows(local_sweep.results_dir / "points.csv")
    assert list(ray_rows) == list(local_rows)  # same keys in the same (run) order
    for key, r in ray_rows.items():
        for col in COMPARED:
            assert r[col] == local_rows[key][col], (r["label"], col)
    sel = json.loads((out / "selection.json").read_text())["recommended"]
    assert sel["point_key"] == local_sweep.recommended["point_key"]
    # every point is a FINISHED nested run of the CLI's parent run on the server, with its artifacts proxied
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("ray").experiment_id
    children = sweep_child_runs(client, exp, local_sweep.sweep_key, finished_only=True)
    assert sorted(c.data.tags[POINT_KEY_TAG] for c in children) == sorted(ray_rows)
    parents = {c.data.tags["mlflow.parentRunId"] for c in children}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["stealguard.kind"] == "sweep"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {"sweep/points.csv",
                                                                                 "sweep/selection.json"}
    assert "summary.txt" in {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert [c.data.tags.get(RECOMMENDED_TAG) for c in children].count("true") == 1


def test_a_worker_killed_mid_point_is_retried_and_the_sweep_finishes(head, server, local_sweep, digits_victim_dir,
                                                                   tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(sw.KILL_ONCE_ENV, str(marker))  # forwarded to the workers (STEALGUARD_* variables)
    for k, v in head.client_env.items():
        monkeypatch.setenv(k, v)
    grid = [{"name": "identity"}, {"name": "label_only"}]
    result = sw.run_sweep("tiny", victim=str(digits_victim_dir), tracking_uri=server.url, experiment="killed",
                          results_dir=tmp_path / "out", progress=False, grid=grid, executor="ray",
                          ray_address=head.address, cpus_per_point=1)
    assert marker.is_file() and "killed worker" in marker.read_text()
    assert result.new_points == 2 and all(r["status"] == "new" for r in result.points)
    local = {r["point_key"]: r for r in local_sweep.points}
    for r in result.points:  # the retried point computed what the local executor did
        for k in sw.METRIC_COLUMNS:
            a, b = r[k], local[r["point_key"]][k]
            assert a == b or (math.isnan(a) and math.isnan(b)), (r["label"], k)
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("killed").experiment_id
    runs = client.search_runs([exp], filter_string="tags.`stealguard.kind` = 'sweep_point'")
    # the killed attempt's run was marked FAILED by the retry; each point has exactly one FINISHED run
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]
    # the driver restarted: every key is finished, nothing runs again
    again = sw.run_sweep("tiny", victim=str(digits_victim_dir), tracking_uri=server.url, experiment="killed",
                         results_dir=tmp_path / "again", progress=False, grid=grid, executor="ray",
                         ray_address=head.address, cpus_per_point=1)
    assert (again.new_points, again.reused_points) == (0, 2)


def test_a_file_store_is_refused_for_a_multi_node_cluster():
    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}, {"NodeID": "c", "Alive": False}]
    for uri in ("sqlite:////tmp/mlflow.db", "/tmp/mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ValueError, match="2 nodes alive: each node's points would write their own copy"):
            check_tracking_for_cluster(uri, nodes)
    check_tracking_for_cluster("http://mlflow:5000", nodes)  # a server is fine
    check_tracking_for_cluster("sqlite:////tmp/mlflow.db", nodes[:1] + nodes[2:])  # one node alive: one file


def test_an_empty_address_starts_a_private_cluster_not_the_one_ray_address_names(monkeypatch):
    """--ray-address '' is documented as a cluster of this machine started for the sweep: ray.init gets Ray's
    "local", which ignores RAY_ADDRESS and a running `ray start` (ray.init()'s default would attach to them)."""
    import ray

    from mlflow_project.sweep import ray_executor

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(Stop):
        ray_executor.run_jobs([], None, None, lambda *a: None, preset=None, victim_hash="", share=False, address="")
    assert seen["address"] == "local" and seen["include_dashboard"] is False
    with pytest.raises(Stop):
        ray_executor.run_jobs([], None, None, lambda *a: None, preset=None, victim_hash="", share=False,
                              address="127.0.0.1:6379")
    assert seen["address"] == "127.0.0.1:6379"


def test_points_are_submitted_in_run_order_with_no_more_in_flight_than_slots():
    """The executor's scheduling alone (no Ray): whatever order tasks finish in (here the newest first), the
    submissions follow the run order, never more than slots() are in flight, a slot count that grows is used,
    and when a point raises the ones in flight are cancelled and the rest never submitted."""
    from mlflow_project.sweep.ray_executor import run_in_order

    jobs = [f"seed{s}-p{i}" for s in range(2) for i in range(5)]
    submitted, finished, in_flight, peak, cancelled = [], [], set(), [], []
    slot_counts = iter([2] * 6 + [3] * 100)

    def submit(job):
        submitted.append(job)
        in_flight.add(job)
        peak.append(len(in_flight))
        return job

    def wait_one(refs):
        return refs[-1]  # the newest: the order Ray must not be trusted with

    def on_done(job, ref):
        in_flight.discard(ref)
        finished.append(job)

    run_in_order(jobs, submit, wait_one, on_done, lambda: next(slot_counts), cancel=cancelled.append)
    assert submitted == jobs and sorted(finished) == sorted(jobs) and not cancelled
    assert peak[:4] == [1, 2, 2, 2] and max(peak) == 3
    # a point that raises stops the sweep: in-flight tasks cancelled, the queue not submitted
    submitted.clear()
    in_flight.clear()

    def boom(job, ref):
        raise RuntimeError(f"{job} raised")

    with pytest.raises(RuntimeError, match="seed0-p1 raised"):
        run_in_order(jobs, submit, wait_one, boom, lambda: 2, cancel=cancelled.append)
    assert submitted == jobs[:2] and cancelled == ["seed0-p0"]


def test_a_refused_connection_to_an_explicit_address_says_how_to_send_the_token(monkeypatch):
    import ray

    from mlflow_project.sweep import ray_executor

    def refused(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ConnectionError, match=r"at 127\.0\.0\.1:6379\. If the cluster has token authentication on.*"
                                              r"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH"):
        ray_executor.run_jobs([], None, None, lambda *a: None, preset=None, victim_hash="", share=False,
                              address="127.0.0.1:6379")
    with pytest.raises(ConnectionError) as private:  # a private cluster of this machine: no token to send
        ray_executor.run_jobs([], None, None, lambda *a: None, preset=None, victim_hash="", share=False, address="")
    assert "RAY_AUTH_MODE" not in str(private.value)


def test_a_killed_driver_resumes_from_its_finished_points(head, server, digits_victim_dir, tmp_path):
    """The sweep process itself (under ``mlflow run``) is killed once a point has finished; the same command
    again reuses the finished points and runs only the rest."""
    import time

    from mlflow_project.ops.processes import stop_group

    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "sweep", "--env-manager", "local",
           "-P", "preset=tiny", "-P", "executor=ray", "-P", f"ray_address={head.address}",
           "-P", f"victim={digits_victim_dir}", "-P", f"results_dir={tmp_path / 'out'}"]
    env = venv_env(MLFLOW_TRACKING_URI=server.url, MLFLOW_EXPERIMENT_NAME="driver", OMP_NUM_THREADS="1",
                   **head.client_env)
    client = MlflowClient(server.url)
    log = (tmp_path / "first.out").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finished() -> list:
        exp = client.get_experiment_by_name("driver")
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=(
            "tags.`stealguard.kind` = 'sweep_point' AND attributes.status = 'FINISHED'"))

    while not finished():
        assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
        time.sleep(1.0)
    stop_group(proc.pid, 5.0, proc)  # the driver and its mlflow run wrapper, mid-sweep
    log.close()
    time.sleep(5.0)  # the dead driver's tasks are killed with it; let a point caught mid-logging settle
    done_before = {r.data.tags[POINT_KEY_TAG] for r in finished()}
    assert 1 <= len(done_before) < 7
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"({7 - len(done_before)} new, {len(done_before)} reused)" in again.stdout
    rows = read_rows(tmp_path / "out" / "points.csv")
    assert len(rows) == 7 and done_before <= set(rows)
