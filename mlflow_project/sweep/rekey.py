"""Bring sweep points recorded before the thread count was part of the point key over to today's keys.

    python -m mlflow_project.sweep.rekey --threads 1 --dry-run              # list the store's old-key points
    python -m mlflow_project.sweep.rekey --threads 2 --runs 144cc994...,5aca6d55...
    python -m mlflow_project.sweep.rekey --threads 1                        # every other old-key point
    python -m mlflow_project.sweep.rekey --threads 2 --csv docs/results/<sweep>.points.csv

A point's key holds the torch thread count its clones were trained at (:func:`run.threaded_key`: at another count
the same point is another measurement). Points recorded earlier carry their measurement key alone, so no sweep
reuses or imports them any more. Given the count they were computed at (only you know it: the old runs and CSV
rows did not record it), this rewrites their key to ``threaded_key(old key, threads)`` and records the count:

- in the tracking store (``MLFLOW_TRACKING_URI`` or ``--tracking-uri``): every sweep point run without a
  ``stealguard.threads`` tag (of ``--sweep-key`` only, if given; of ``--runs`` only, if given) gets that tag, its
  old key as ``stealguard.measurement_key`` and the new ``stealguard.point_key``;
- in each ``--csv`` points.csv: every row with an empty ``threads`` column (of ``--runs`` only, if given) gets
  the count and the new key; the file is rewritten with today's columns.

Points that already have a thread count are never touched, so the command can be run again, and one count after
another for a store whose points were computed at different counts (``--runs`` first, then the rest).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_project.cli import integer
from mlflow_project.sweep.run import read_points, threaded_key, write_points_csv
from mlflow_project.sweep.select import MEASUREMENT_KEY_TAG, POINT_KEY_TAG, THREADS_TAG, sweep_child_runs


@dataclass(frozen=True)
class Rekeyed:
    """One point brought over: where it is (a run id, or a CSV path and row number), its label, both keys."""

    where: str
    label: str
    old_key: str
    new_key: str

    def __str__(self) -> str:
        return f"{self.where}  {self.label}: {self.old_key} -> {self.new_key}"


def _selected(run_id: str, runs: Sequence[str]) -> bool:
    return not runs or any(run_id.startswith(r) for r in runs)


def rekey_store(client, threads: int, runs: Sequence[str] = (), sweep_key: str = "",
                dry_run: bool = False) -> list[Rekeyed]:
    """Rekey the store's old-key sweep point runs (see the module doc); return what was (or would be) changed."""
    from mlflow.entities import ViewType

    done = []
    for exp in client.search_experiments(view_type=ViewType.ALL):
        for run in sweep_child_runs(client, exp.experiment_id, sweep_key):
            tags = run.data.tags
            if THREADS_TAG in tags or POINT_KEY_TAG not in tags or not _selected(run.info.run_id, runs):
                continue
            old = tags[POINT_KEY_TAG]
            item = Rekeyed(run.info.run_id, tags.get("stealguard.label", run.info.run_name or ""), old,
                           threaded_key(old, threads))
            if not dry_run:
                client.set_tag(run.info.run_id, MEASUREMENT_KEY_TAG, old)
                client.set_tag(run.info.run_id, THREADS_TAG, str(threads))
                client.set_tag(run.info.run_id, POINT_KEY_TAG, item.new_key)
            done.append(item)
    return done


def rekey_csv(path: str | Path, threads: int, runs: Sequence[str] = (), dry_run: bool = False) -> list[Rekeyed]:
    """Rekey a points.csv's rows that have no thread count (see the module doc); return what changed."""
    path = Path(path)
    rows = read_points(path, numbers=False)
    if rows and "point_key" not in rows[0]:
        raise ValueError(f"csv: {path} has no point_key column; expected a sweep's points.csv")
    done = []
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (the header is line 1)
        if str(row.get("threads") or "").strip() or not _selected(row.get("run_id", ""), runs):
            continue
        item = Rekeyed(f"{path}:{i}", row.get("label", ""), row["point_key"], threaded_key(row["point_key"], threads))
        row["point_key"], row["threads"] = item.new_key, str(threads)
        done.append(item)
    if done and not dry_run:
        write_points_csv(path, rows)
    return done


def main(argv: list[str] | None = None) -> list[Rekeyed]:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.sweep.rekey", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=integer, required=True,
                   help="the torch thread count the selected points' clones were trained at (>= 1)")
    p.add_argument("--runs", default="", help="comma-separated run ids (or their prefixes): only these points")
    p.add_argument("--sweep-key", default="", help="only the points of this sweep (store)")
    p.add_argument("--csv", action="append", default=[], help="a points.csv to rekey instead of the store "
                   "(repeatable)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    p.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads: must be >= 1; got {a.threads}")
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if a.csv:
        done = [item for path in a.csv for item in rekey_csv(path, a.threads, runs, a.dry_run)]
    else:
        from mlflow.tracking import MlflowClient

        from mlflow_project.lifecycle import tracking

        done = rekey_store(MlflowClient(tracking.resolve_tracking_uri(a.tracking_uri)), a.threads, runs, a.sweep_key,
                           a.dry_run)
    for item in done:
        print(item)
    verb = "would rekey" if a.dry_run else "rekeyed"
    print(f"{verb} {len(done)} points at {a.threads} threads")
    return done


if __name__ == "__main__":
    main()
