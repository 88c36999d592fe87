"""The sweep's Ray executor: every point a Ray task, on a cluster of this machine or many.

Why tasks and not Ray Tune trials: a sweep point is one function call with a fixed config (no intermediate
reports, no early stopping, no search algorithm: the grid is given and every point runs to the end); the sweep
already owns what Tune would add (point keys and resumption from the tracking store, selection, the CSV and the
plots). A task is the smallest unit that gives what is needed here: a CPU share (``num_cpus``), retries when a
worker dies (``max_retries``), and the object store for what the points share (the victim, the shared work).

- ``ray_address``: ``auto`` (the cluster this machine is part of), ``ray://host:10001`` (Ray Client), a head's
  ``host:port`` (e.g. ``127.0.0.1:6379`` after ``ray start --head``), or "" (start a cluster of this machine on
  the spot and stop it at the end).
- Each task gets ``num_cpus=cpus_per_point`` and sets torch's thread count to it, so a point computes with the
  same threads wherever it runs (metrics equal the local executor's at equal thread counts; the count is part of
  the point's key, :func:`mlflow_project.sweep.run.threaded_key`).
- Tracking: the task logs its nested run itself, to the tracking URI, experiment and parent run it is given
  (:func:`mlflow_project.sweep.run.run_point`). A file store or SQLite file is refused when more than one node
  is alive: each node would write its own file and the driver would never see the points of the others.
- Resumption: a task whose worker dies is retried (``max_retries``); a point that raised is not (as with the
  local executor, the sweep stops). If the driver dies, its tasks die with it; the next run of the same sweep
  skips every key that has a FINISHED run.
- Shared work (:mod:`mlflow_project.sweep.shared`): one task per seed builds the memo tables with the points'
  CPU share, submitted with the seed's first point; the points get them through the object store.
- Order: points are submitted in the sweep's run order (every point at the first seed, then the extra seeds),
  at most as many at a time as the cluster has CPU slots (:func:`run_in_order`), so they run in that order.

Workers import the project from ``PYTHONPATH`` (this checkout's root is prepended, which is right for a cluster
of this machine); on a multi-node cluster the image must hold the project and its requirements
(docs/operations.md).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from mlflow_project.sweep.run import REPO_ROOT, PointJob, TrackingTarget, run_point
from mlflow_project.sweep.shared import build_shared, shared_key

MAX_RETRIES = 3  # per point, when its worker process or node dies
FORWARDED_ENV_PREFIXES = ("STEALGUARD_", "MLFLOW_TRACKING_")


def is_local_store(uri: str) -> bool:
    """True for a tracking URI that is a file on the machine that writes it (SQLite, a file store, a path)."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # one letter: a Windows drive


def alive_nodes(nodes: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for n in nodes if n.get("Alive"))


def check_tracking_for_cluster(uri: str, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a local-file tracking store for a cluster of more than one node (see the module doc)."""
    n = alive_nodes(nodes)
    if n > 1 and is_local_store(uri):
        raise ValueError(
            f"tracking_uri: {uri!r} is a file on this machine, but the Ray cluster has {n} nodes alive: each node's "
            "points would write their own copy of that file and the sweep would never see them. Run an "
            "`mlflow server` (with --serve-artifacts or a shared artifact store) and pass its http(s):// URI, or "
            "use a database server URI (postgresql://, mysql://)")


AUTH_HINT = (
    "If the cluster has token authentication on (`ray start` turns it on when ~/.ray/auth_token exists on the "
    "head, as Ray 2.59+ leaves it after any local ray.init()), a driver given an explicit address does not send "
    "a token unless told to: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the head's "
    "token for the sweep (docs/operations.md, 'Sweeps on a Ray cluster')")


def runtime_env() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": env}


def run_in_order(jobs: Sequence[PointJob], submit: Callable[[PointJob], Any], wait_one: Callable[[list], Any],
                 on_done: Callable[[PointJob, Any], None], slots: Callable[[], int],
                 cancel: Callable[[Any], None]) -> None:
    """Submit ``jobs`` in their run order with at most ``slots()`` (at least 1; read again before each
    submission, so nodes that join are used) in flight, and ``on_done(job, ref)`` each as it finishes. Handing
    Ray the whole grid at once let it start points in any order (a paper sweep, 2026-12-03, started seed 1's
    points before seed 0's new ones), losing the run order's promise that a first pass over the grid finishes
    first. The cost: an autoscaler sees only the cluster's current CPUs as demand. On an exception (a point that
    raised, Ctrl-C) the tasks in flight are cancelled and the rest never submitted."""
    queue = deque(jobs)
    pending: dict[Any, PointJob] = {}
    try:
        while queue or pending:
            while queue and len(pending) < max(1, slots()):
                job = queue.popleft()
                pending[submit(job)] = job
            ref = wait_one(list(pending))
            on_done(pending.pop(ref), ref)
    except BaseException:
        for ref in pending:
            cancel(ref)
        raise


def _point_task(job: PointJob, victim, shared, target: TrackingTarget, evaluate_fn):
    return run_point(job, victim, shared, target, evaluate_fn=evaluate_fn, in_worker=True)


def run_jobs(jobs: Sequence[PointJob], victim, target: TrackingTarget, on_row: Callable[[PointJob, dict], None], *,
             preset, victim_hash: str, share: bool, cpus_per_point: int = 1, address: str = "",
             evaluate_fn: Callable | None = None) -> None:
    """Run ``jobs`` as Ray tasks; call ``on_row(job, row)`` in this process as each one finishes."""
    import ray

    started = not ray.is_initialized()
    if started:
        # "" means a private cluster of this machine: Ray's "local", never ray.init()'s default, which would
        # attach to whatever RAY_ADDRESS or a `ray start` on this machine points at
        try:
            ray.init(address=address or "local", runtime_env=runtime_env(), log_to_driver=False,
                     include_dashboard=False if not address else None)
        except ConnectionError as e:
            if not address:
                raise
            raise ConnectionError(f"{e}. {AUTH_HINT}") from e
    try:
        check_tracking_for_cluster(target.uri, ray.nodes())
        if not jobs:
            return
        victim_ref = ray.put(victim)
        shared_refs: dict[int, Any] = {}
        build = ray.remote(num_cpus=cpus_per_point, max_retries=MAX_RETRIES)(build_shared)
        task = ray.remote(num_cpus=cpus_per_point, max_retries=MAX_RETRIES)(_point_task)

        def submit(j: PointJob):
            if share and j.seed not in shared_refs:  # a seed's shared work starts with its first point
                key = shared_key(victim_hash, preset, j.seed, cpus_per_point)
                shared_refs[j.seed] = build.remote(victim_ref, preset, j.seed, key, cpus_per_point)
            return task.remote(j, victim_ref, shared_refs.get(j.seed), target, evaluate_fn)

        def slots() -> int:
            return int(ray.cluster_resources().get("CPU", 0) // cpus_per_point)

        run_in_order(jobs, submit, lambda refs: ray.wait(refs, num_returns=1)[0][0],
                     lambda job, ref: on_row(job, ray.get(ref)), slots,
                     cancel=lambda ref: ray.cancel(ref, force=True))
    finally:
        if started:
            ray.shutdown()
