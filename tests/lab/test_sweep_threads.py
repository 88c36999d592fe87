"""A point's torch thread count is part of its identity: sweeps at another count measure anew (and report the
other count's rows beside theirs), the rows and runs say the count, old-key points are brought over by rekey, and
seeds are paired only at one count."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.lab.training import torch_threads
from mlflow_project.sweep import rekey
from mlflow_project.sweep import run as sw
from mlflow_project.sweep.presets import get_preset
from mlflow_project.sweep.select import MEASUREMENT_KEY_TAG, POINT_KEY_TAG, THREADS_TAG, paired_note

GRID = [{"name": "identity"}, {"name": "label_only"}]


def uri(path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    _, path = sw.resolve_victim(get_preset("tiny"), cache_dir=tmp_path_factory.mktemp("victims"), progress=False)
    return path


def sweep(victim_dir, store, out, threads, **kw):
    with torch_threads(threads):
        return sw.run_sweep("tiny", victim=victim_dir, tracking_uri=store, results_dir=out, progress=False,
                            grid=GRID, **kw)


def point_runs(client, result):
    return {p["label"]: client.get_run(p["run_id"]) for p in result.points}


def test_a_sweep_at_another_thread_count_measures_its_points_anew(victim_dir, tmp_path):
    store = uri(tmp_path / "m.db")
    one = sweep(victim_dir, store, tmp_path / "one", 1)
    two = sweep(victim_dir, store, tmp_path / "two", 2)
    assert (two.new_points, two.reused_points) == (2, 0) and two.sweep_key == one.sweep_key  # one parent
    assert [p["threads"] for p in one.points] == [1, 1]
    # the 2-thread rows, then the 1-thread ones beside them (not reused, not averaged in: each point has its own)
    assert [(p["label"], p["threads"], p["status"]) for p in two.points] == [
        ("identity", 2, "new"), ("label_only", 2, "new"), ("identity", 1, sw.OTHER_THREADS),
        ("label_only", 1, sw.OTHER_THREADS)]
    assert [p["run_id"] for p in two.points[2:]] == [p["run_id"] for p in one.points]
    means = sw.aggregate(two.points)
    assert [(m["n_seeds"], m["threads"]) for m in means] == [(1, "2"), (1, "2")]
    client = MlflowClient(store)
    for a, b in zip(one.points, two.points[:2], strict=True):
        ra, rb = client.get_run(a["run_id"]), client.get_run(b["run_id"])
        assert (ra.data.tags[THREADS_TAG], rb.data.tags[THREADS_TAG]) == ("1", "2")
        assert ra.data.tags[MEASUREMENT_KEY_TAG] == rb.data.tags[MEASUREMENT_KEY_TAG]  # the same measurement ...
        assert a["point_key"] != b["point_key"]  # ... computed at two thread counts
    again = sweep(victim_dir, store, tmp_path / "again", 1)
    assert (again.new_points, again.reused_points) == (0, 2)
    assert [p["threads"] for p in again.points] == [1, 1, 2, 2]  # a reused row has its run's count
    rows = sw.read_points(again.artifacts["csv"])
    assert [r["threads"] for r in rows] == ["1", "1", "2", "2"]
    assert [r["status"] for r in sw.preferred_rows(rows)] == ["reused", "reused"]
    # a report at a count nothing ran at stands the other counts' points in (the lowest count first)
    with torch_threads(3):
        report = sw.run_sweep("tiny", victim=victim_dir, tracking_uri=store, results_dir=tmp_path / "r",
                              progress=False, grid=GRID, report_only=True)
    assert {p["status"] for p in report.points} == {sw.OTHER_THREADS} and len(report.points) == 4
    assert [m["threads"] for m in sw.aggregate(report.points)] == ["1", "1"]


def make_legacy(client, result) -> dict[str, str]:
    """What a store looked like before the thread count: the point key tag is the measurement key, no count."""
    old = {}
    for p in result.points:
        tags = client.get_run(p["run_id"]).data.tags
        client.set_tag(p["run_id"], POINT_KEY_TAG, tags[MEASUREMENT_KEY_TAG])
        client.delete_tag(p["run_id"], THREADS_TAG)
        client.delete_tag(p["run_id"], MEASUREMENT_KEY_TAG)
        old[p["label"]] = tags[MEASUREMENT_KEY_TAG]
    return old


def test_rekey_brings_old_key_store_points_over_at_the_count_it_is_told(victim_dir, tmp_path, capsys):
    store = uri(tmp_path / "legacy.db")
    first = sweep(victim_dir, store, tmp_path / "a", 1)
    client = MlflowClient(store)
    old = make_legacy(client, first)
    runs = point_runs(client, first)
    with pytest.raises(LookupError, match="no finished point yet.*sweep.rekey"):  # old keys match no point
        sweep(victim_dir, store, tmp_path / "b", 1, report_only=True)
    dry = rekey.main(["--threads", "1", "--tracking-uri", store, "--dry-run"])
    assert len(dry) == 2 and "would rekey 2 points at 1 threads" in capsys.readouterr().out
    assert client.get_run(runs["identity"].info.run_id).data.tags[POINT_KEY_TAG] == old["identity"]  # untouched
    # identity was (say) computed at 2 threads, label_only at 1: one count after another, --runs first
    done = rekey.main(["--threads", "2", "--tracking-uri", store, "--runs", runs["identity"].info.run_id[:10]])
    assert [d.label for d in done] == ["identity"]
    assert [d.label for d in rekey.main(["--threads", "1", "--tracking-uri", store])] == ["label_only"]
    assert rekey.main(["--threads", "1", "--tracking-uri", store]) == []  # counted points are never touched
    tags = client.get_run(runs["identity"].info.run_id).data.tags
    assert (tags[THREADS_TAG], tags[MEASUREMENT_KEY_TAG]) == ("2", old["identity"])
    assert tags[POINT_KEY_TAG] == sw.threaded_key(old["identity"], 2)
    resumed = sweep(victim_dir, store, tmp_path / "d", 1)
    assert [(p["label"], p["status"]) for p in resumed.points] == [
        ("identity", "new"), ("label_only", "reused"), ("identity", sw.OTHER_THREADS)]
    assert [p["run_id"] for p in resumed.points[1:]] == [runs["label_only"].info.run_id, runs["identity"].info.run_id]


def test_rekey_gives_an_old_points_csv_its_count_and_then_it_imports(victim_dir, tmp_path, capsys):
    made = sweep(victim_dir, uri(tmp_path / "a.db"), tmp_path / "a", 1)
    rows = sw.read_points(made.artifacts["csv"], numbers=False)
    measured = {p["run_id"]: MlflowClient(uri(tmp_path / "a.db")).get_run(p["run_id"]).data.tags[MEASUREMENT_KEY_TAG]
                for p in made.points}
    legacy = tmp_path / "legacy.points.csv"
    sw.write_points_csv(legacy, [{**r, "point_key": measured[r["run_id"]], "threads": ""} for r in rows])
    fresh = sweep(victim_dir, uri(tmp_path / "b.db"), tmp_path / "b", 1, import_from=[legacy])
    assert fresh.imported_points == 0
    err = capsys.readouterr().err
    assert f"2 rows of {legacy} have no thread count" in err and "mlflow_project.sweep.rekey --threads N" in err
    done = rekey.main(["--threads", "1", "--csv", str(legacy)])
    assert len(done) == 2 and all(d.where.startswith(f"{legacy}:") for d in done)
    assert [r["point_key"] for r in sw.read_points(legacy, numbers=False)] == [p["point_key"] for p in made.points]
    again = sweep(victim_dir, uri(tmp_path / "c.db"), tmp_path / "c", 1, import_from=[legacy])
    assert (again.imported_points, again.new_points) == (2, 0)
    assert [p["threads"] for p in again.points] == [1, 1]
    # rows at another count are imported as what they are: kept and reported beside, and measured anew here
    at2 = tmp_path / "at2.points.csv"
    sw.write_points_csv(at2, [{**r, "point_key": measured[r["run_id"]], "threads": ""} for r in rows])
    rekey.main(["--threads", "2", "--csv", str(at2)])
    store = uri(tmp_path / "d.db")
    other = sweep(victim_dir, store, tmp_path / "d", 1, import_from=[at2])
    assert (other.imported_points, other.new_points) == (2, 2)
    assert [(p["threads"], p["status"]) for p in other.points] == [(1, "new"), (1, "new"), (2, sw.OTHER_THREADS),
                                                                   (2, sw.OTHER_THREADS)]
    tags = MlflowClient(store).get_run(other.points[2]["run_id"]).data.tags
    assert (tags[THREADS_TAG], tags[POINT_KEY_TAG]) == ("2", sw.threaded_key(measured[rows[0]["run_id"]], 2))
    with pytest.raises(SystemExit):
        rekey.main(["--threads", "0", "--csv", str(legacy)])


def test_seeds_pair_only_at_one_thread_count():
    def row(defense, seed, value, threads):
        return {"defense_config": json.dumps({"name": defense}), "seed": seed, "attacker_accuracy_strongest": value,
                "threads": threads}

    per_seed = [row("label_only", 0, 0.36, "1"), row("label_only", 1, 0.40, "1"), row("label_only", 2, 0.39, "1"),
                row("mad", 0, 0.41, "2"), row("mad", 1, 0.39, "1"), row("mad", 2, 0.40, "1")]
    mad = {"defense_config": json.dumps({"name": "mad"})}
    lab = {"defense_config": json.dumps({"name": "label_only"})}
    note = paired_note(mad, lab, per_seed, "label_only")
    assert note == ("paired by seed vs label_only: +0.0 (-1.0 / +1.0 on seeds 1,2; lower on 1 of 2, "
                    "sign test p = 0.75; not paired: seed 0 at 2 vs 1 threads)")
    note = paired_note(mad, lab, per_seed[:2] + per_seed[3:5], "label_only")
    assert note == ("paired by seed vs label_only: too few seeds at one thread count; not paired: seed 0 at 2 vs 1 "
                    "threads")
