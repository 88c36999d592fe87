"""Sweep defenses x budgets against one attack and query set, in MLflow; choose the operating point.

    python -m mlflow_project.sweep.run --preset quick                       # Fashion-MNIST, Knockoff, ~4 minutes
    python -m mlflow_project.sweep.run --preset paper --queryset mnist5k    # the larger protocol (see RESULTS.md)
    python -m mlflow_project.sweep.run --preset tiny                        # digits, seconds (what the tests run)
    mlflow run . -e sweep -P preset=quick -P attack=knockoff_argmax --env-manager local
    mlflow run . -e sweep -P preset=paper -P executor=ray -P ray_address=auto -P cpus_per_point=2 --env-manager local

Executors (``--executor``): ``local`` runs the points one after another in this process; ``ray`` runs each as a
Ray task (:mod:`mlflow_project.sweep.ray_executor`, docs/operations.md "Sweeps on a Ray cluster"). Both log each
point's nested run through :func:`run_point`, so parent run, CSV, plots and selection are the same. For
non-adaptive attacks the victim's (and surrogate's) outputs are computed once per seed and shared by every point
(:mod:`mlflow_project.sweep.shared`; ``--no-share-queries`` turns it off).

Every grid point (a defense config, :func:`presets.defense_grid`) is one nested MLflow run under a parent
run, evaluated with :func:`mlflow_project.lab.evaluate.evaluate` against the same victim (trained once, or reused
from disk) and the same attacker queries (same query set and seed for every point). A point is identified by
a stable hash of its full configuration (victim weights, dataset, attack, query set, budget, epochs, seeds,
defense) and of the torch thread count its clones train at (a CPU training run reproduces only at the same count:
:func:`threaded_key`): a rerun looks the hash up among the FINISHED point runs of the same sweep and skips it, so an
interrupted sweep (exception, Ctrl-C, killed process) resumes where it stopped and a widened grid only runs
the new points.

Seeds (``--seeds 0,1,2``): every point is run once per seed (attacker query order and clone initialisation;
the victim stays the same); the seed is part of a point's key, not of the sweep's, so adding seeds later runs
only the new (point, seed) pairs under the same parent. ``--multi-seed-points identity,label_only,mad(epsilon=0.9)``
restricts the extra seeds to those points (labels as in the CSV; the rest of the grid runs the first seed).

ood_gated's tau belongs to the victim, not to the preset: MAD at l1 1 outside the gate flips every row the gate
takes, so the benign drop is about the share of correctly answered test rows under ``max p < tau``, which differs
from victim to victim (the largest tau within 0.9 points was 0.58 on one paper victim and 0.565 on another).
``--ood-gated-max-drop D`` (the paper preset's default is 0.9; 0 turns it off) calibrates it when the sweep
starts: each (``--ood-gated-inside``, ``--ood-gated-outside``) pair also gets the point at the largest tau whose
drop on the victim's test set is at most D (:func:`calibrate_ood_gated`, :func:`mlflow_project.lab.screen.
calibrate_tau`); stderr says which tau, and ``sweep.json`` on the parent run holds the grid. ``--ood-gated-taus``
adds fixed taus beside it. ``--ood-gated-scores max_prob,gaussian`` gives each pair a point per gate score: the
maximum probability, and the class-conditional Gaussian on the posterior's logits (plugins.ood), fitted on the
victim's training posteriors when the sweep starts (:func:`fit_ood_gaussian`) and calibrated the same way.

Outputs, written to ``--results-dir`` and logged as artifacts of the parent run: ``points.csv`` (every (point,
seed) run, its metrics, run id and thread count, then the grid's points finished at other thread counts, status
``other_threads``: :func:`preferred_rows`, and the grid's points finished in the store at seeds this run was not
given, status ``stored``, e.g. a second driver's seeds of the same sweep: :func:`stored_rows`), ``points_mean.csv``
(one row per point: the mean over its seeds and the min/max of each attacker accuracy),
``attacker_vs_defender_accuracy.png``, ``attacker_vs_l1.png`` (strongest attacker), ``attacker_soft_vs_l1.png``,
``attacker_top1_vs_l1.png`` and ``selection.json``. The selection (:func:`select.choose`, on the per-point means)
picks, among points whose defender accuracy dropped by at most ``--max-drop`` points and whose mean L1 is at most
``--max-l1``, the lowest strongest-attacker accuracy, and only if it beats label_only (else label_only, or the
undefended point); it prints why and tags the point's run (its first seed's) ``stealguard.recommended=true``
(:func:`select.find_recommended_run` and ``register --sweep-run`` find it again).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from handlers.victim_export import VictimExport
from mlflow_project.cli import integer
from mlflow_project.lab import data
from mlflow_project.lab.training import torch_threads
from mlflow_project.sweep.presets import PRESETS, Preset, defense_grid, describe, get_preset
from mlflow_project.sweep.select import (
    KIND_TAG,
    MEASUREMENT_KEY_TAG,
    MISINFORMATION_TAG,
    POINT_KEY_TAG,
    RECOMMENDED_TAG,
    SWEEP_KEY_TAG,
    THREADS_TAG,
    choose,
    sweep_child_runs,
    tag_recommended,
    thread_count,
)
from mlflow_project.sweep.shared import NON_ADAPTIVE, SharedWork, build_shared, shared_key

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO_ROOT / "results" / "sweeps"
MISINFORMATION_ARTIFACT = "misinformation"  # on the parent run: the model the adaptive_misinformation points used
METRIC_COLUMNS = (
    "victim_accuracy", "defender_accuracy", "perturbation_l1_mean", "perturbation_l1_max", "kl_mean",
    "top1_flip_rate", "angular_deviation_mean", "attacker_accuracy", "attacker_agreement", "queries",
    "attacker_accuracy_soft", "attacker_accuracy_top1", "attacker_accuracy_strongest", "attacker_agreement_soft",
    "attacker_agreement_top1", "query_top1_flip_rate", "defender_nll", "defender_ece", "victim_nll", "victim_ece",
)
SPREAD_COLUMNS = ("attacker_accuracy_soft", "attacker_accuracy_top1", "attacker_accuracy_strongest",
                  "defender_accuracy")
CSV_COLUMNS = ("label", "defense", "epsilon", "beta", "gamma", "decimals", "norm", *METRIC_COLUMNS,
               "accuracy_drop_points", "seconds", "status", "recommended", "point_key", "run_id", "defense_config",
               "tau", "target", "seed", "k", "threads")
MEAN_CSV_COLUMNS = (*CSV_COLUMNS, "seeds", "n_seeds", *(f"{c}_{e}" for c in SPREAD_COLUMNS for e in ("min", "max")))
NUMERIC_COLUMNS = (*METRIC_COLUMNS, "accuracy_drop_points", "seconds", "epsilon", "beta", "gamma", "decimals", "tau",
                   "k", "seed", "n_seeds", *(f"{c}_{e}" for c in SPREAD_COLUMNS for e in ("min", "max")))
PROTOCOL_VERSION = 2  # part of every key: points recorded before the attackers were a set are not reused
OTHER_THREADS = "other_threads"  # a row's status: a finished point of the grid at another thread count (a stand-in)
# a row's status: a finished (point, seed) of the grid in this sweep's store that this run was not asked for (e.g.
# another driver's seeds of the same sweep, run beside this one): the parent's outputs hold every finished seed
STORED = "stored"
PARENT_KIND = "sweep"
POINT_KIND = "sweep_point"
EXECUTORS = ("local", "ray")
PARENT_TAG = "mlflow.parentRunId"  # what makes a run nested under another in MLflow
# test-only: a Ray worker that finds this variable (a marker file path) and no marker kills itself mid-point
KILL_ONCE_ENV = "STEALGUARD_TEST_KILL_POINT_ONCE"


# ---------------------------------------------------------------------------------------------- identities


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace), first ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes and bytes), independent of file formats."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SweepSpec:
    """What every point of a sweep shares (its hash is the sweep key) and the grid of defenses."""

    preset: Preset
    victim_path: str
    victim_hash: str
    grid: list[dict[str, Any]]
    oracle: str = "local"
    misinformation_hash: str = ""  # weights of the misinformation model, for defenses that need one
    threads: int = 1  # the torch thread count the points' clones are trained at (part of every point key)

    def context(self) -> dict[str, Any]:
        """What every point and seed of the sweep shares (the seed is a point's, see :meth:`point_key`)."""
        p = self.preset
        return {
            "dataset": p.dataset, "victim_weights": self.victim_hash, "attack": p.attack, "queryset": p.queryset,
            "budget": p.budget, "epochs": p.epochs, "surrogate_seed": p.surrogate_seed,
            "lr": p.clone_lr, "batch_size": p.clone_batch_size, "oracle": self.oracle,
            "attack_options": dict(sorted(p.attack_options.items())), "protocol": PROTOCOL_VERSION,
        }

    @property
    def sweep_key(self) -> str:
        return stable_hash(self.context())

    def measurement_key(self, defense: Mapping[str, Any], seed: int | None = None) -> str:
        """What a point measures, however it is computed (the point key before the thread count was in it)."""
        seed = self.preset.seed if seed is None else seed
        ident = {**self.context(), "seed": seed, "defense": dict(defense)}
        if needs_misinformation(defense):  # other points keep the keys they always had
            ident["misinformation_weights"] = self.misinformation_hash
        return stable_hash(ident)

    def point_key(self, defense: Mapping[str, Any], seed: int | None = None) -> str:
        return threaded_key(self.measurement_key(defense, seed), self.threads)


def threaded_key(measurement_key: str, threads: int) -> str:
    """A point key: the point's measurement key and the torch thread count its clones were trained at.

    A clone trained on the same answers from the same seed is bit-for-bit the same only at the same thread
    count (measured 2026-12-03, paper protocol: label_only's clone at 1 thread scored 36.46 %, the undefended
    point's top-1 twin, trained on the same labels at 2 threads, 38.37 %; at 1 thread both, the two agree to the
    digit), so points computed at different counts are different measurements and a sweep reuses only its own
    count's. Keys recorded before this (a measurement key alone) are brought over by
    :mod:`mlflow_project.sweep.rekey`, given the count they were computed at."""
    if int(threads) < 1:
        raise ValueError(f"threads: a point's clones train at >= 1 torch thread; got {threads}")
    return stable_hash({"measurement": measurement_key, "threads": int(threads)})


def needs_misinformation(defense: Mapping[str, Any]) -> bool:
    from plugins import needs

    return needs(defense, "misinformation")


def fit_ood_gaussian(preset: Preset, vict) -> dict[str, Any] | None:
    """The Gaussian gate's statistics on the victim (:func:`mlflow_project.lab.screen.fit_gaussian`), as the dict
    an ood_gated config holds, when the preset has ood_gated points with score ``gaussian``; else None."""
    from mlflow_project.sweep.presets import has_gaussian_points

    if not has_gaussian_points(preset):
        return None
    from mlflow_project.lab.screen import fit_gaussian

    return fit_gaussian(vict).model_dump()


def calibrate_ood_gated(preset: Preset, vict, victim_path: str, progress: bool,
                        gaussian: Mapping[str, Any] | None = None) -> dict[tuple[str, str, str], float]:
    """``ood_gated_max_drop``: for each (inside, outside, score) gate of the preset, the largest tau whose benign
    drop on the victim's test set stays within it (:func:`mlflow_project.lab.screen.calibrate_tau`), said on
    stderr. Score ``gaussian`` needs ``gaussian``, the statistics of :func:`fit_ood_gaussian`."""
    from mlflow_project.lab.screen import calibrate_tau
    from mlflow_project.sweep.presets import inner_config, ood_gated_gates
    from plugins.ood import PosteriorGaussian

    stats = None if gaussian is None else PosteriorGaussian.model_validate(gaussian)
    taus: dict[tuple[str, str, str], float] = {}
    for inside, outside, score in ood_gated_gates(preset):
        configs = [inner_config(name, preset.ood_gated_epsilon) for name in (inside, outside)]
        misinformation = resolve_misinformation(preset, vict, victim_path, progress) \
            if any(needs_misinformation(c) for c in configs) else None
        if score == "gaussian" and stats is None:
            raise ValueError("calibrate_ood_gated: score 'gaussian' needs the fitted statistics (fit_ood_gaussian)")
        found = calibrate_tau(vict, *configs, preset.ood_gated_max_drop, surrogate_seed=preset.surrogate_seed,
                              misinformation=misinformation, gaussian=stats if score == "gaussian" else None)
        taus[(inside, outside, score)] = found["tau"]
        print(f"ood_gated_max_drop {preset.ood_gated_max_drop:g}: tau {found['tau']:g} for inside={inside}, "
              f"outside={outside}, score={score} (benign drop {found['drop']:.2f} points; the gate takes "
              f"{100 * found['gated']:.2f} % of the test rows)", file=sys.stderr)
    return taus


# ---------------------------------------------------------------------------------------------- the victim


# The thread count the sweep trains its cached victim and misinformation model with, whatever --threads says: a
# CPU training run is bit-for-bit reproducible only at a fixed count (measured: a 1-epoch Fashion-MNIST LeNet
# trained at 1 and at 2 threads gives different weights), and the points' keys hold the victim's weights hash, so
# --import-from matches a committed points.csv only when the victim is rebuilt bit for bit. Measured 2026-12-02:
# the paper victim retrained here at 1 and at 2 threads scores 92.34 % and 92.04 %, and neither is the 92.28 % one
# the committed paper points were measured on (another session's machine; the CPU type, i.e. which oneDNN kernels
# run, is the likely difference, not verified). 1, so that --threads does not change the weights.
CACHED_TRAINING_THREADS = 1


def default_victim_dir(dataset: str, arch: str) -> Path:
    """Where the lab keeps a trained victim (``artifacts/victims/<dataset>_<arch>``, git-ignored)."""
    return REPO_ROOT / "artifacts" / "victims" / f"{dataset}_{arch}"


def resolve_victim(preset: Preset, victim: str = "", cache_dir: str | Path | None = None, progress: bool = True):
    """The sweep's victim: ``victim`` if given, else the lab's saved one, else trained once and cached.

    Returns (evaluate.Victim, path). A trained victim is written to ``cache_dir`` (default
    ``results/victims``) under a name that holds dataset, arch, epochs and seed, and reused on later sweeps.
    """
    from mlflow_project.lab.evaluate import load_victim
    from mlflow_project.lab.train_victim import export_victim, train_victim

    arch = preset.arch or data.default_arch(preset.dataset)
    if victim:
        v = load_victim(victim)
        return v, victim
    lab = default_victim_dir(preset.dataset, arch)
    if VictimExport.is_export(lab):
        return load_victim(lab), str(lab)
    epochs = preset.victim_epochs or None
    cache = Path(cache_dir) if cache_dir else REPO_ROOT / "results" / "victims"
    out = cache / f"{preset.dataset}_{arch}_e{preset.victim_epochs or 'default'}_s{preset.seed}"
    if not VictimExport.is_export(out):
        with torch_threads(CACHED_TRAINING_THREADS):  # the same weights (and point keys) whatever --threads says
            res = train_victim(preset.dataset, arch, epochs=epochs, seed=preset.seed, progress=progress)
        # only what load_exported needs (the full set of runtime exports is train_victim's job)
        export_victim(res.model, res.arch, res.spec, out, res.test_accuracy, runtimes=False)
    return load_victim(out), str(out)


def resolve_misinformation(preset: Preset, vict, victim_path: str, progress: bool = True) -> Path:
    """adaptive_misinformation's model for the sweep's victim: trained once (train_misinformation, the victim's
    dataset and arch, the preset's misinformation_epochs and seed) and cached next to the victim directory
    (``<victim>.misinformation-e<epochs>-s<seed>``; under ``results/misinformation`` when the victim is an MLflow
    URI). Returns the export directory."""
    from mlflow_project.lab.train_misinformation import INFO_FILE, export_misinformation, train_misinformation

    epochs = preset.misinformation_epochs or None
    tag = f"e{epochs or 'default'}-s{preset.seed}"
    local = Path(victim_path)
    if local.is_dir():
        out = local.parent / f"{local.name}.misinformation-{tag}"
    else:
        name = f"{vict.spec.dataset}_{vict.arch}_{weights_hash(vict.model)}-{tag}"
        out = REPO_ROOT / "results" / "misinformation" / name
    info_path = out / INFO_FILE
    if info_path.is_file() and VictimExport.is_export(out):
        info = json.loads(info_path.read_text())
        if info.get("dataset") == vict.spec.dataset and info.get("arch") == vict.arch:
            return out
    with torch_threads(CACHED_TRAINING_THREADS):
        res = train_misinformation(vict.spec.dataset, vict.arch, epochs=epochs, seed=preset.seed, progress=progress)
    export_misinformation(res, out, runtimes=False)  # what load_exported needs
    return out


# ---------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    parent_run_id: str
    sweep_key: str
    points: list[dict[str, Any]]
    recommended: dict[str, Any] | None
    results_dir: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    new_points: int = 0
    reused_points: int = 0
    seconds: float = 0.0
    imported_points: int = 0  # of the reused ones: recorded from --import-from rows


def _flat_row(defense: Mapping[str, Any], metrics: Mapping[str, float], **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"label": describe(dict(defense)), "defense": defense["name"],
                           "defense_config": json.dumps(dict(defense), sort_keys=True)}
    for k in ("epsilon", "beta", "gamma", "decimals", "norm", "tau", "target", "k"):
        row[k] = defense.get(k, "")
    for k in METRIC_COLUMNS:
        v = metrics.get(k)
        row[k] = float(v) if v is not None else math.nan
    if math.isfinite(row["victim_accuracy"]) and math.isfinite(row["defender_accuracy"]):
        row["accuracy_drop_points"] = 100.0 * (row["victim_accuracy"] - row["defender_accuracy"])
    else:
        row["accuracy_drop_points"] = math.nan
    row.update(extra)
    return row


def _reused_row(defense: Mapping[str, Any], seed: int, run, key: str, status: str = "reused") -> dict[str, Any]:
    """The CSV row of a finished point run (this store's, or one imported into it)."""
    threads = run.data.tags.get(THREADS_TAG, "")
    return _flat_row(defense, run.data.metrics, status=status, point_key=key, seed=seed, run_id=run.info.run_id,
                     seconds=run.data.metrics.get("seconds_total", math.nan),
                     threads=int(threads) if threads.isdigit() else "")


def _find_parent(client, experiment_id: str, sweep_key: str):
    flt = f"tags.`{SWEEP_KEY_TAG}` = '{sweep_key}' AND tags.`{KIND_TAG}` = '{PARENT_KIND}'"
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def finished_points(client, experiment_id: str, sweep_key: str) -> dict[str, Any]:
    """``{point_key: run}`` of the FINISHED point runs of a sweep (the newest run wins if a key repeats)."""
    done: dict[str, Any] = {}
    for run in sweep_child_runs(client, experiment_id, sweep_key, finished_only=True):
        key = run.data.tags.get(POINT_KEY_TAG)
        if key:
            done[key] = run
    return done


def other_count_rows(done: Mapping[str, Any], spec: SweepSpec,
                     todo: Sequence[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Rows (status ``other_threads``) of the finished runs that measured a (point, seed) of ``todo`` at another
    thread count than the sweep's: not reused (at the sweep's count that point is still to run), but reported
    beside its points, so that changing the count loses no measurement from the CSV and a (point, seed) not yet
    measured at the sweep's count is still represented (:func:`preferred_rows`)."""
    order = {spec.measurement_key(d, s): i for i, (d, s) in enumerate(todo)}
    found = []
    for key, run in done.items():
        tags = run.data.tags
        threads = tags.get(THREADS_TAG, "")
        if tags.get(MEASUREMENT_KEY_TAG) in order and threads != str(spec.threads):
            found.append((order[tags[MEASUREMENT_KEY_TAG]], int(threads) if threads.isdigit() else 0, key, run))
    return [_reused_row(*todo[i], run, key, status=OTHER_THREADS) for i, _, key, run in sorted(found)]


def stored_rows(done: Mapping[str, Any], spec: SweepSpec,
                todo: Sequence[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Rows (status ``stored``) of the finished runs of the grid's points, at the sweep's thread count, at seeds
    that ``todo`` does not hold: two drivers of one sweep (say seeds 0 and 1,2 side by side) share its parent run,
    and whichever finishes last writes the parent's outputs from every seed either measured, not only its own."""
    asked = {spec.point_key(d, s) for d, s in todo}
    seeds = sorted({int(float(run.data.params["seed"])) for run in done.values()
                    if _is_number(run.data.params.get("seed"))})
    configs = list({json.dumps(d, sort_keys=True): d for d, _ in todo}.values())
    out = []
    for seed in seeds:
        for defense in configs:
            key = spec.point_key(defense, seed)
            if key in done and key not in asked:
                out.append(_reused_row(defense, seed, done[key], key, status=STORED))
    return out


def preferred_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per (point, seed): the sweep's own (any status but ``other_threads``) where there is one, else the
    first other-count row. What the means, the selection and the paired differences are computed from; the rows'
    ``threads`` column says which count each is at."""
    own = {(r.get("defense_config"), r.get("seed")) for r in rows if r.get("status") != OTHER_THREADS}
    out, seen = [], set()
    for r in rows:
        ident = (r.get("defense_config"), r.get("seed"))
        if r.get("status") == OTHER_THREADS and (ident in own or ident in seen):
            continue
        seen.add(ident)
        out.append(r)
    return out


@dataclass
class PointJob:
    """One (defense, seed) point to evaluate: what a worker needs besides the victim and the shared work."""

    index: int  # its place in the sweep's run order (rows are reported in that order whoever finishes first)
    defense: dict[str, Any]
    seed: int
    key: str
    label: str
    cfg: Any  # evaluate.EvalConfig
    tags: dict[str, str]
    threads: int = 1  # torch threads the point runs at, wherever it runs (its key holds them)


@dataclass(frozen=True)
class TrackingTarget:
    """Where a point logs, from wherever it runs: the tracking URI, the experiment and the sweep's parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str


def run_point(job: PointJob, victim, shared: SharedWork | None, target: TrackingTarget,
              evaluate_fn: Callable | None = None, in_worker: bool = False) -> dict[str, Any]:
    """Evaluate one point at ``job.threads`` torch threads and log it as a nested run of the sweep's parent
    (created here, tagged ``mlflow.parentRunId``, then entered with ``mlflow.start_run(run_id=...)``); return its
    CSV row. The same function runs in the sweep's process (local executor) and in a Ray worker. Runs of the same
    point key left RUNNING by a dead worker or driver are marked FAILED first."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_project.lab.evaluate import evaluate, log_evaluation
    from mlflow_project.lifecycle import tracking

    torch.set_num_threads(job.threads)
    if mlflow.get_tracking_uri() != target.uri:
        mlflow.set_tracking_uri(target.uri)
    client = MlflowClient(target.uri)
    stale = client.search_runs([target.experiment_id], run_view_type=1, filter_string=(
        f"tags.`{POINT_KEY_TAG}` = '{job.key}' AND tags.`{SWEEP_KEY_TAG}` = '{job.tags[SWEEP_KEY_TAG]}' "
        "AND attributes.status = 'RUNNING'"))
    for run in stale:
        client.set_terminated(run.info.run_id, "FAILED")
    run = client.create_run(target.experiment_id, run_name=f"{job.label} seed {job.seed}",
                            tags={**job.tags, PARENT_TAG: target.parent_run_id})
    with mlflow.start_run(run_id=run.info.run_id, nested=True) as child:
        marker = os.environ.get(KILL_ONCE_ENV)
        if in_worker and marker:
            try:
                with open(marker, "x") as f:  # exclusive create: one worker of the sweep dies, once
                    f.write(f"killed worker {os.getpid()} in point {job.key}\n")
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        result = (evaluate_fn or evaluate)(job.cfg, victim=victim, progress=False, shared=shared)
        log_evaluation(result)
        tracking.log_params({"defense_config": json.dumps(job.defense, sort_keys=True)})
        mlflow.set_tags({KIND_TAG: POINT_KIND, "stealguard.label": job.label})
    return _flat_row(job.defense, result.metrics, status="new", point_key=job.key, run_id=child.info.run_id,
                     seed=job.seed, seconds=result.seconds.get("total", math.nan), threads=job.threads)


def recorded_points(paths: Sequence[str | Path], measurements: set[str]) -> dict[str, dict[str, Any]]:
    """``{point_key: row}`` of the rows of the points.csv files ``paths`` that measured one of ``measurements``
    (measurement keys: :meth:`SweepSpec.measurement_key`) at the thread count in their ``threads`` column (a
    point key hashes the victim's weights, the attacker, the protocol, the defense, the seed and the thread
    count, so a matching row measured this very point at that count); each row gets its ``measurement_key``; a
    later file's row wins. Rows of other sweeps are ignored."""
    out: dict[str, dict[str, Any]] = {}
    at: dict[str, dict[str, str]] = {}  # thread count -> {point key at that count: measurement key}

    def measured(row: Mapping[str, Any]) -> str | None:
        t = thread_count(row)
        if not t.isdigit() or int(t) < 1:
            return None
        if t not in at:
            at[t] = {threaded_key(m, int(t)): m for m in measurements}
        return at[t].get(row.get("point_key", ""))

    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"import_from: no points.csv at {path}")
        rows = read_points(path)
        if rows and "point_key" not in rows[0]:
            raise ValueError(f"import_from: {path} has no point_key column; expected a sweep's points.csv")
        matched = [(row, m) for row in rows if row.get("status") != "failed" and (m := measured(row))]
        for row, m in matched:
            out[row["point_key"]] = {**row, "imported_from": str(path), "measurement_key": m}
        legacy = sum(1 for row in rows if not thread_count(row))
        if legacy:
            print(legacy_rows_message(path, legacy), file=sys.stderr)
        elif rows and not matched:
            print(import_mismatch_message(path, rows), file=sys.stderr)
    return out


def legacy_rows_message(path: Path, n: int) -> str:
    return (f"import_from: {n} rows of {path} have no thread count (recorded before it was part of the point key), "
            f"so none of them can match a point of this sweep. If you know the torch thread count their clones "
            f"were trained at, add it: python -m mlflow_project.sweep.rekey --threads N --csv {path}")


def import_mismatch_message(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """Why no row of an --import-from file matched: most often the victim. Its weights are in every point key, and
    a victim retrained on another CPU type (or, before CACHED_TRAINING_THREADS, at another thread count) is not
    the same victim bit for bit, however close its accuracy."""
    accuracies = sorted({f"{100 * float(r['victim_accuracy']):.2f} %" for r in rows if r.get("victim_accuracy")})
    return (f"import_from: none of the {len(rows)} rows of {path} is a point of this sweep, so all are measured "
            f"anew. A point key covers the victim's weights, the attacker, the protocol, the defense and the seed; "
            f"the file's rows were measured on a victim of test accuracy {', '.join(accuracies) or 'unknown'}. If "
            f"that victim was retrained here, it is not the same one bit for bit (training reproduces only on the "
            f"same CPU type): pass the original victim with --victim to import its points.")


def import_point(client, experiment_id: str, parent_id: str, job: PointJob, row: Mapping[str, Any]):
    """Record a point measured in another tracking store (its points.csv ``row``) as a FINISHED nested run of
    this sweep: the tags, params, metrics and defense.json artifact a run of :func:`run_point` has, plus
    ``stealguard.imported_from`` (the CSV and the original run id), so the selection, the report and
    ``register --sweep-run`` treat it like any finished point. Returns the run."""
    from mlflow.entities import Metric, Param, RunTag

    from mlflow_project.lab.evaluate import DEFENSE_ARTIFACT

    now = int(time.time() * 1000)
    # the row's own key and thread count (a row at another count than the sweep's is imported as what it is)
    own = {POINT_KEY_TAG: row["point_key"], THREADS_TAG: thread_count(row)}
    run = client.create_run(experiment_id, run_name=f"{job.label} seed {job.seed} (imported)",
                            tags={**job.tags, **own, PARENT_TAG: parent_id})
    run_id = run.info.run_id
    metrics = {k: float(row[k]) for k in METRIC_COLUMNS if _is_number(row.get(k)) and math.isfinite(float(row[k]))}
    if _is_number(row.get("seconds")):
        metrics["seconds_total"] = float(row["seconds"])
    params = {**{k: str(v) for k, v in job.cfg.params().items()},
              "defense_config": json.dumps(job.defense, sort_keys=True)}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, v[:6000]) for k, v in params.items()],
                     tags=[RunTag(KIND_TAG, POINT_KIND), RunTag("stealguard.label", job.label),
                           RunTag("stealguard.imported_from", f"{row['imported_from']} run {row.get('run_id', '')}")])
    client.log_dict(run_id, dict(job.defense), DEFENSE_ARTIFACT)
    client.set_terminated(run_id, "FINISHED")
    return client.get_run(run_id)


class LocalShared:
    """The local executor's shared work: one :class:`SharedWork` per seed, from its cache file or built once."""

    def __init__(self, directory: Path, victim, preset: Preset, victim_hash: str) -> None:
        self.directory, self.victim, self.preset, self.victim_hash = directory, victim, preset, victim_hash
        self.by_seed: dict[int, SharedWork] = {}

    def get(self, seed: int) -> SharedWork:
        if seed not in self.by_seed:
            key = shared_key(self.victim_hash, self.preset, seed, torch.get_num_threads())
            path = self.directory / f"{key}.pt"
            if path.is_file():
                self.by_seed[seed] = SharedWork.from_file(path)
            else:
                self.by_seed[seed] = build_shared(self.victim, self.preset, seed, key)
                self.by_seed[seed].to_file(path)
        return self.by_seed[seed]

    def save(self) -> None:
        for work in self.by_seed.values():  # the memo may have grown (attacks it was not warmed for)
            work.to_file(self.directory / f"{work.key}.pt")


def run_sweep(
    preset: Preset | str = "quick",
    victim: str = "",
    tracking_uri: str | None = None,
    experiment: str = "stealguard",
    results_dir: str | Path | None = None,
    max_drop: float | None = None,
    progress: bool = True,
    victim_cache_dir: str | Path | None = None,
    evaluate_fn: Callable | None = None,
    grid: Sequence[Mapping[str, Any]] | None = None,
    report_only: bool = False,
    max_l1: float | None = None,
    executor: str = "local",
    ray_address: str = "",
    cpus_per_point: int = 1,
    share_queries: bool = True,
    import_from: Sequence[str | Path] = (),
) -> SweepResult:
    """Run (or resume) the sweep of ``preset``; return its points, selection and output files.

    ``evaluate_fn(EvalConfig, victim=..., progress=...)`` defaults to :func:`mlflow_project.lab.evaluate.evaluate`
    (a seam for tests that inject failures). ``grid`` overrides the preset's defense grid. ``report_only``:
    evaluate nothing and leave the parent run's state alone; write the outputs and select from the points
    finished so far (e.g. while a long sweep is still running, or after it was stopped). ``max_drop`` /
    ``max_l1`` default to the preset's. ``executor``: ``local`` (one point after another in this process) or
    ``ray`` (each point a Ray task with ``cpus_per_point`` CPUs and as many torch threads, on the cluster at
    ``ray_address``: ``auto``, ``ray://host:10001``, ``host:port`` of a head, or "" for a cluster of this machine
    started on the spot; see :mod:`mlflow_project.sweep.ray_executor`). ``share_queries``: for non-adaptive
    attacks, compute the victim's and surrogate's outputs on the queries once per seed
    (:mod:`mlflow_project.sweep.shared`; same answers, bit for bit). ``import_from``: points.csv files of
    earlier runs of this sweep (e.g. the committed ``docs/results/*.points.csv`` from another session's tracking
    store); a point of the grid that this store has not finished but whose point key is in one of them is
    recorded here from that row (:func:`import_point`) instead of being evaluated again.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_project.lab.evaluate import EvalConfig
    from mlflow_project.lifecycle import tracking

    t_start = time.perf_counter()
    if executor not in EXECUTORS:
        raise ValueError(f"executor: unknown {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if cpus_per_point < 1:
        raise ValueError(f"cpus_per_point: must be >= 1; got {cpus_per_point}")
    preset = get_preset(preset) if isinstance(preset, str) else preset
    caps = (preset.max_drop if max_drop is None else max_drop, preset.max_l1 if max_l1 is None else max_l1)
    experiment_id = tracking.setup(tracking_uri, experiment)
    client = MlflowClient(mlflow.get_tracking_uri())

    vict, victim_path = resolve_victim(preset, victim, victim_cache_dir, progress)
    if vict.spec.dataset != preset.dataset:
        raise ValueError(f"victim: {victim_path} was trained on {vict.spec.dataset!r} but the sweep's dataset is "
                         f"{preset.dataset!r}")
    gaussian = fit_ood_gaussian(preset, vict) if grid is None else None
    calibrated = calibrate_ood_gated(preset, vict, victim_path, progress, gaussian) \
        if grid is None and preset.ood_gated_max_drop > 0 else None
    configs = [dict(c) for c in (grid if grid is not None else defense_grid(preset, calibrated, gaussian))]
    if not configs:
        raise ValueError("grid: the sweep has no points; enable at least one defense")
    # the thread count each point trains its clones at: a Ray task's CPUs, or this process's torch threads
    threads = cpus_per_point if executor == "ray" else torch.get_num_threads()
    spec = SweepSpec(preset=preset, victim_path=victim_path, victim_hash=weights_hash(vict.model), grid=configs,
                     threads=threads)
    misinformation = ""
    if any(needs_misinformation(c) for c in configs):
        from mlflow_project.lab.oracles import load_misinformation

        misinformation = str(resolve_misinformation(preset, vict, victim_path, progress))
        spec.misinformation_hash = weights_hash(load_misinformation(misinformation))
    sweep_key = spec.sweep_key
    out_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS / (
        f"{preset.name}-{preset.dataset}-{preset.attack}-{preset.queryset}-{preset.budget}-{sweep_key[:8]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = point_seeds(preset, configs)

    parent = _find_parent(client, experiment_id, sweep_key)
    if report_only:
        if parent is None:
            raise LookupError(f"report_only: no sweep {sweep_key} in experiment {experiment!r} yet; run it first")
        done = finished_points(client, experiment_id, sweep_key)
        rows = []
        for defense, seed in todo:
            run = done.get(spec.point_key(defense, seed))
            if run is not None:
                rows.append(_reused_row(defense, seed, run, spec.point_key(defense, seed)))
        rows += other_count_rows(done, spec, todo) + stored_rows(done, spec, todo)
        if not rows:
            raise LookupError(f"report_only: sweep {sweep_key} has no finished point yet, at {threads} torch threads "
                              f"or any other (points recorded before the thread count was part of the point key "
                              f"are brought over by python -m mlflow_project.sweep.rekey)")
        recommended, artifacts = _finish(client, experiment_id, sweep_key, parent.info.run_id, rows, out_dir, preset,
                                         caps)
        return SweepResult(parent.info.run_id, sweep_key, rows, recommended, out_dir, artifacts, 0, len(rows),
                           time.perf_counter() - t_start)
    run_name = f"sweep-{preset.name}-{preset.attack}-{preset.queryset}-{preset.budget}"
    new = reused = imported = 0
    recorded = recorded_points(import_from, {spec.measurement_key(d, s) for d, s in todo})
    # under `mlflow run`: the run it created is the parent (finished points of this sweep are still reused)
    with tracking.start_or_resume(run_name, parent.info.run_id if parent else None) as parent_run:
        parent_id = parent_run.info.run_id
        mlflow.set_tags({KIND_TAG: PARENT_KIND, SWEEP_KEY_TAG: sweep_key, "stealguard.preset": preset.name})
        if parent is None or parent_id != parent.info.run_id:
            tracking.log_params({**{k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
                                    for k, v in spec.context().items()}, "preset": preset.name,
                                 "victim": victim_path, "arch": vict.arch})
        mlflow.log_dict({"preset": preset.to_dict(), "context": spec.context(), "grid": configs}, "sweep.json")
        if misinformation and not client.list_artifacts(parent_id, MISINFORMATION_ARTIFACT):
            # the model every adaptive_misinformation point used, in the store: `register --sweep-run` finds it
            # on any machine (the points' `misinformation` param is a path on the machine that ran the sweep)
            mlflow.log_artifacts(misinformation, MISINFORMATION_ARTIFACT)
        done = finished_points(client, experiment_id, sweep_key)
        jobs: list[PointJob] = []
        slots: list[dict[str, Any] | None] = []
        by_measurement: dict[str, PointJob] = {}
        for defense, seed in todo:
            key = spec.point_key(defense, seed)
            cfg = EvalConfig(dataset=preset.dataset, victim=victim_path, defense=defense, attack=preset.attack,
                             queryset=preset.queryset, budget=preset.budget, epochs=preset.epochs, seed=seed,
                             oracle=spec.oracle, lr=preset.clone_lr, batch_size=preset.clone_batch_size,
                             surrogate_seed=preset.surrogate_seed, attack_options=dict(preset.attack_options),
                             misinformation=misinformation if needs_misinformation(defense) else "")
            tags = {KIND_TAG: POINT_KIND, SWEEP_KEY_TAG: sweep_key, POINT_KEY_TAG: key,
                    MEASUREMENT_KEY_TAG: spec.measurement_key(defense, seed), THREADS_TAG: str(threads),
                    "stealguard.defense": defense["name"], "stealguard.sweep_parent": parent_id}
            if needs_misinformation(defense):
                tags[MISINFORMATION_TAG] = f"runs:/{parent_id}/{MISINFORMATION_ARTIFACT}"
            job = PointJob(len(slots), dict(defense), seed, key, describe(defense), cfg, tags, threads)
            by_measurement[tags[MEASUREMENT_KEY_TAG]] = job
            if key not in done and key in recorded:
                done[key] = import_point(client, experiment_id, parent_id, job, recorded[key])
                imported += 1
            if key in done:
                slots.append(_reused_row(defense, seed, done[key], key))
                reused += 1
                continue
            jobs.append(job)
            slots.append(None)
        for key, row in recorded.items():  # rows at another thread count: kept in the store, reported beside
            if key not in done:
                done[key] = import_point(client, experiment_id, parent_id, by_measurement[row["measurement_key"]],
                                         row)
                imported += 1
        target = TrackingTarget(mlflow.get_tracking_uri(), experiment_id, parent_id)
        share = share_queries and preset.attack in NON_ADAPTIVE and spec.oracle == "local"
        bar = tqdm(total=len(jobs), desc=f"sweep {preset.name}", unit="point", disable=not progress)

        def on_row(job: PointJob, row: dict[str, Any]) -> None:
            slots[job.index] = row
            bar.update(1)
            bar.set_postfix_str(f"{job.label} seed {job.seed} attacker soft/top-1 "
                                f"{100 * row['attacker_accuracy_soft']:.1f}/{100 * row['attacker_accuracy_top1']:.1f}%")

        if executor == "ray":
            from mlflow_project.sweep.ray_executor import run_jobs

            run_jobs(jobs, vict, target, on_row, preset=preset, victim_hash=spec.victim_hash, share=share,
                     cpus_per_point=cpus_per_point, address=ray_address, evaluate_fn=evaluate_fn)
        else:
            shared = LocalShared(out_dir / "shared", vict, preset, spec.victim_hash) if share else None
            for job in jobs:
                on_row(job, run_point(job, vict, shared.get(job.seed) if shared else None, target,
                                      evaluate_fn=evaluate_fn))
            if shared:
                shared.save()
        new = len(jobs)
        done = finished_points(client, experiment_id, sweep_key)  # again: another driver may have finished seeds
        rows = [r for r in slots if r is not None] + other_count_rows(done, spec, todo) + stored_rows(done, spec, todo)
        bar.close()

        recommended, artifacts = _finish(client, experiment_id, sweep_key, parent_id, rows, out_dir, preset, caps)
        mlflow.log_metrics({"points": len(rows), "points_new": new, "points_reused": reused,
                            "points_imported": imported, "sweep_seconds": time.perf_counter() - t_start,
                            "torch_threads": torch.get_num_threads(),
                            "loadavg_1m_end": os.getloadavg()[0]})
        if recommended:
            mlflow.log_metrics({f"recommended_{k}": float(recommended[k]) for k in
                                ("attacker_accuracy", "attacker_accuracy_strongest", "defender_accuracy",
                                 "perturbation_l1_mean") if _is_number(recommended.get(k))})
    return SweepResult(parent_id, sweep_key, rows, recommended, out_dir, artifacts, new, reused,
                       time.perf_counter() - t_start, imported)


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def point_seeds(preset: Preset, configs: Sequence[Mapping[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """(defense, seed) pairs in run order: every point at the first seed, then the extra seeds (all points, or
    those whose label is in ``preset.multi_seed_points``), so a first pass over the grid finishes early."""
    seeds = preset.all_seeds
    labels = {describe(dict(c)) for c in configs}
    unknown = [x for x in preset.multi_seed_points if x not in labels and x not in {c["name"] for c in configs}]
    if unknown:
        raise ValueError(f"multi_seed_points: {unknown} match no point of the grid; points: "
                         f"{', '.join(sorted(labels))}")
    out = [(dict(c), seeds[0]) for c in configs]
    for seed in seeds[1:]:
        for c in configs:
            if not preset.multi_seed_points or describe(dict(c)) in preset.multi_seed_points \
                    or c["name"] in preset.multi_seed_points:
                out.append((dict(c), seed))
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per defense config (in first-seen order): metric means over its seeds, ``<metric>_min`` /
    ``_max`` of the attacker and defender accuracies (over :func:`preferred_rows`), ``seeds``, ``n_seeds`` and
    ``threads`` (the distinct thread
    counts of its rows, e.g. ``1`` or ``1,2``); ``run_id`` and ``point_key``
    are the first seed's (the run the selection tags)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in preferred_rows(rows):
        groups.setdefault(r["defense_config"], []).append(r)
    out = []
    for mine in groups.values():
        row = dict(mine[0])
        for k in (*METRIC_COLUMNS, "accuracy_drop_points", "seconds"):
            vals = [float(r[k]) for r in mine if _is_number(r.get(k))]
            row[k] = sum(vals) / len(vals) if vals else math.nan
        for k in SPREAD_COLUMNS:
            vals = [float(r[k]) for r in mine if _is_number(r.get(k))]
            row[f"{k}_min"], row[f"{k}_max"] = (min(vals), max(vals)) if vals else (math.nan, math.nan)
        row["seeds"] = ",".join(str(int(float(r["seed"]))) if _is_number(r.get("seed")) else "" for r in mine)
        row["threads"] = ",".join(sorted({thread_count(r) for r in mine} - {""}, key=int))
        row["n_seeds"] = len(mine)
        row["seed"] = ""
        out.append(row)
    return out


def _finish(client, experiment_id: str, sweep_key: str, parent_id: str, rows: list[dict[str, Any]], out_dir: Path,
            preset: Preset, caps: tuple[float, float]) -> tuple[dict[str, Any] | None, dict[str, Path]]:
    """Select (on the per-point means) and tag the recommended point, write the outputs, log them to the parent."""
    means = aggregate(rows)
    recommended = select_and_tag(client, experiment_id, sweep_key, parent_id, means, caps,
                                 per_seed=preferred_rows(rows))
    for r in (*rows, *means):
        r["recommended"] = r["run_id"] == (recommended or {}).get("run_id")
    artifacts = write_outputs(rows, out_dir, preset, recommended, caps, means)
    for p in artifacts.values():
        client.log_artifact(parent_id, str(p), artifact_path="sweep")
    return recommended, artifacts


def select_and_tag(client, experiment_id: str, sweep_key: str, parent_run_id: str, rows: Sequence[Mapping],
                   caps: tuple[float, float], per_seed: Sequence[Mapping] = ()) -> dict[str, Any] | None:
    """Pick the point (see :func:`select.choose`; ``rows`` the per-point means, ``per_seed`` the rows they were
    averaged from), tag its run, print it and why; None if nothing fits."""
    max_drop, max_l1 = caps
    try:
        selection = choose(rows, max_drop, max_l1, per_seed)
    except ValueError as exc:
        print(f"selection: {exc}")
        for run in sweep_child_runs(client, experiment_id, sweep_key):
            if RECOMMENDED_TAG in run.data.tags:
                client.delete_tag(run.info.run_id, RECOMMENDED_TAG)
        return None
    best = dict(selection.point)
    best["selection_reason"] = selection.reason
    best["beats_label_only"] = selection.beats_label_only
    tag_recommended(client, experiment_id, sweep_key, best["run_id"], parent_run_id)
    client.set_tag(parent_run_id, "stealguard.selection_reason", selection.reason[:5000])
    print(f"selection: {selection.reason}")
    print(f"recommended (drop <= {max_drop:g} points, mean L1 <= {max_l1:g}): {best['label']}  "
          f"strongest attacker {100 * best['attacker_accuracy_strongest']:.2f}% (soft "
          f"{100 * best['attacker_accuracy_soft']:.2f}%, top-1 {100 * best['attacker_accuracy_top1']:.2f}%, "
          f"{best['n_seeds']} seed(s))  defender {100 * best['defender_accuracy']:.2f}% "
          f"(drop {best['accuracy_drop_points']:.2f})  L1 {best['perturbation_l1_mean']:.3f}  run {best['run_id']}")
    return best


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def write_outputs(rows: Sequence[Mapping[str, Any]], out_dir: Path, preset: Preset,
                  recommended: Mapping[str, Any] | None, caps: tuple[float, float],
                  means: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """points.csv, points_mean.csv, the trade-off plots and selection.json in ``out_dir``."""
    from mlflow_project.sweep.plots import plot_tradeoff

    out_dir.mkdir(parents=True, exist_ok=True)
    means = aggregate(rows) if means is None else means
    csv_path = _write_csv(out_dir / "points.csv", rows, CSV_COLUMNS)
    mean_path = _write_csv(out_dir / "points_mean.csv", means, MEAN_CSV_COLUMNS)
    title = (f"{preset.dataset} victim, {preset.attack} attacker\n{preset.queryset} queries, budget {preset.budget}, "
             f"clone epochs {preset.epochs}, seeds {','.join(map(str, preset.all_seeds))}")
    rec_key = recommended["point_key"] if recommended else None
    out = {"csv": csv_path, "csv_mean": mean_path}
    out["plot_accuracy"] = plot_tradeoff(means, "defender_accuracy", out_dir / "attacker_vs_defender_accuracy.png",
                                         title, y="attacker_accuracy_strongest", recommended=rec_key)
    out["plot_l1"] = plot_tradeoff(means, "perturbation_l1_mean", out_dir / "attacker_vs_l1.png", title,
                                   y="attacker_accuracy_strongest", recommended=rec_key)
    for kind in ("soft", "top1"):
        out[f"plot_l1_{kind}"] = plot_tradeoff(means, "perturbation_l1_mean", out_dir / f"attacker_{kind}_vs_l1.png",
                                               title, y=f"attacker_accuracy_{kind}", recommended=rec_key)
    sel = out_dir / "selection.json"
    sel.write_text(json.dumps({"max_drop_points": caps[0], "max_l1": caps[1],
                               "recommended": dict(recommended) if recommended else None,
                               "preset": preset.to_dict()}, indent=2, default=str) + "\n")
    out["selection"] = sel
    return out


def write_points_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """A points.csv with today's columns (``rows`` as :func:`read_points` gives them, or a sweep's rows)."""
    return _write_csv(Path(path), rows, CSV_COLUMNS)


def read_points(csv_path: str | Path, numbers: bool = True) -> list[dict[str, Any]]:
    """A sweep's points.csv back as dicts, numbers parsed (for tables such as RESULTS.md's) unless ``numbers``
    is false (the text as written, e.g. to rewrite the file)."""
    rows = []
    with Path(csv_path).open() as f:
        for r in csv.DictReader(f):
            for k in NUMERIC_COLUMNS if numbers else ():
                if r.get(k) not in (None, ""):
                    r[k] = float(r[k])
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------- command line


def split_labels(text: str) -> tuple[str, ...]:
    """Comma-separated point labels; commas inside parentheses (nested too) belong to a label, e.g.
    ``ood_gated(tau=0.9, inside=mad_argmax(epsilon=1), outside=label_only),identity``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return tuple(x.strip() for x in out if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.sweep.run", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quick", choices=list(PRESETS))
    p.add_argument("--victim", default="", help="export directory or MLflow model URI (default: the lab's saved "
                   "victim under artifacts/victims, else one trained once and cached under results/victims)")
    p.add_argument("--dataset", default="", choices=["", *data.DATASETS])
    p.add_argument("--attack", default="", help="knockoff, jbda, jbself, jbtop3, or any of them + _argmax")
    p.add_argument("--queryset", default="", choices=["", *data.QUERYSETS])
    p.add_argument("--budget", type=integer, default=0, help="attacker queries (default: the preset's)")
    p.add_argument("--epochs", type=integer, default=0, help="clone training epochs (default: the preset's)")
    p.add_argument("--seed", type=integer, default=-1)
    p.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    p.add_argument("--multi-seed-points", default="",
                   help="labels (or defense names) of the points that get every seed, e.g. "
                        "'identity,label_only,mad(epsilon=0.9)'; default: all points")
    for name in ("mad_epsilons", "mad_argmax_epsilons", "reverse_sigmoid_betas", "random_noise_epsilons",
                 "rounding_decimals", "adaptive_misinformation_taus", "gradient_redirection_epsilons",
                 "top_k_ks", "ood_gated_taus"):
        p.add_argument(f"--{name.replace('_', '-')}", default="", help="comma-separated grid, or 'none'")
    p.add_argument("--ood-gated-inside", default="", help="ood_gated points' in-distribution defenses, comma-separated "
                   "(default: the preset's: identity,mad_argmax; paper label_only)")
    p.add_argument("--ood-gated-outside", default="", help="ood_gated points' out-of-distribution defenses, "
                   "comma-separated (default: the preset's: mad,label_only; paper mad)")
    p.add_argument("--ood-gated-epsilon", type=float, default=-1.0,
                   help="the l1 budget of ood_gated points' inner MAD-family defenses, in (0, 2] (default: the "
                        "preset's: paper 2, others 1; at 2 MAD's answer is a vertex, a one-hot row)")
    p.add_argument("--ood-gated-scores", default="",
                   help="the gate scores of ood_gated points, comma-separated: max_prob (the maximum probability), "
                        "gaussian (a class-conditional Gaussian on the posterior's logits, fitted on the victim's "
                        "training posteriors when the sweep starts); each a point of its own (default: max_prob)")
    p.add_argument("--ood-gated-max-drop", type=float, default=-1.0,
                   help="> 0: each (inside, outside) pair also gets the ood_gated point at the largest tau whose "
                        "benign drop on the victim's test set is at most this many points (calibrated when the "
                        "sweep starts); 0: off; default: the preset's (paper 0.9, others 0)")
    p.add_argument("--no-label-only", action="store_true", help="leave the label-only point out of the grid")
    p.add_argument("--monitor", default="", help="a monitor config (JSON): monitored twins of --monitor-points")
    p.add_argument("--monitor-points", default="", help="labels of the points that get a monitored twin "
                   "(default: identity)")
    p.add_argument("--max-drop", type=float, default=-1.0,
                   help="largest acceptable defender-accuracy drop in points (default: the preset's, 1.0)")
    p.add_argument("--max-l1", type=float, default=-1.0,
                   help="largest acceptable mean L1 perturbation on the test set (default: the preset's, 1.0)")
    p.add_argument("--results-dir", default="", help="default: results/sweeps/<preset>-...-<sweep key>")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db")
    p.add_argument("--report-only", action="store_true",
                   help="run no new point: write the CSV, plots and selection from the finished points so far")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: the points one after another in this process; ray: each point a Ray task")
    p.add_argument("--ray-address", default="", help="executor=ray: auto, ray://host:10001, a head's host:port, "
                   "or empty for a cluster of this machine started for the sweep")
    p.add_argument("--cpus-per-point", type=integer, default=1,
                   help="executor=ray: CPUs per point task (and its torch thread count)")
    p.add_argument("--no-share-queries", action="store_true",
                   help="compute the victim's and surrogate's outputs in every point (default: once per seed for "
                        "non-adaptive attacks)")
    p.add_argument("--import-from", default="",
                   help="comma-separated points.csv files of earlier runs of this sweep (e.g. docs/results/"
                        "<sweep>.points.csv): their points are recorded in this store, not evaluated again")
    p.add_argument("--no-progress", action="store_true")
    return p


def preset_from_args(a: argparse.Namespace) -> Preset:
    """The preset the command line asks for: ``--preset`` with every given override applied."""
    overrides = {
        "dataset": a.dataset or None, "attack": a.attack or None, "queryset": a.queryset or None,
        "budget": a.budget or None, "epochs": a.epochs or None, "seed": a.seed if a.seed >= 0 else None,
        "mad_epsilons": a.mad_epsilons, "mad_argmax_epsilons": a.mad_argmax_epsilons,
        "reverse_sigmoid_betas": a.reverse_sigmoid_betas, "random_noise_epsilons": a.random_noise_epsilons,
        "rounding_decimals": a.rounding_decimals, "label_only": False if a.no_label_only else None,
        "adaptive_misinformation_taus": a.adaptive_misinformation_taus,
        "gradient_redirection_epsilons": a.gradient_redirection_epsilons, "ood_gated_taus": a.ood_gated_taus,
        "top_k_ks": a.top_k_ks,
        "ood_gated_inside": split_labels(a.ood_gated_inside) or None,
        "ood_gated_outside": split_labels(a.ood_gated_outside) or None,
        "ood_gated_scores": split_labels(a.ood_gated_scores) or None,
        "ood_gated_max_drop": a.ood_gated_max_drop if a.ood_gated_max_drop >= 0 else None,
        "ood_gated_epsilon": a.ood_gated_epsilon if a.ood_gated_epsilon > 0 else None,
        "seeds": a.seeds, "multi_seed_points": split_labels(a.multi_seed_points) or None,
        "monitor": a.monitor, "monitor_points": split_labels(a.monitor_points) or None,
    }
    if a.dataset and not a.queryset:
        overrides["queryset"] = a.dataset  # a new dataset's in-distribution query set unless told otherwise
    return get_preset(a.preset, **overrides)


def main(argv: list[str] | None = None) -> SweepResult:
    a = _parser().parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    preset = preset_from_args(a)
    result = run_sweep(preset, victim=a.victim, tracking_uri=a.tracking_uri, results_dir=a.results_dir or None,
                       max_drop=a.max_drop if a.max_drop >= 0 else None,
                       max_l1=a.max_l1 if a.max_l1 >= 0 else None, progress=not a.no_progress,
                       report_only=a.report_only, executor=a.executor, ray_address=a.ray_address,
                       cpus_per_point=a.cpus_per_point, share_queries=not a.no_share_queries,
                       import_from=[x.strip() for x in a.import_from.split(",") if x.strip()])
    imported = f", {result.imported_points} of them imported" if result.imported_points else ""
    print(f"sweep {result.sweep_key}: {len(result.points)} points ({result.new_points} new, "
          f"{result.reused_points} reused{imported}) in {result.seconds:.1f}s; parent run {result.parent_run_id}")
    print(f"outputs: {result.results_dir}")
    return result


if __name__ == "__main__":
    main()
