"""The newcomer's demo (`make demo`): the whole StealGuard lifecycle on one machine, end to end, over HTTP.

Steps (each prints what it does):
1. train (or reuse) a victim and register it as an MLflow model;
2. sweep defenses against a Knockoff attacker with out-of-distribution queries (the ``quick`` preset with
   ``mnist5k``: 5,000 real MNIST digits against the Fashion-MNIST victim, at the HTTP thief's budget and clone
   epochs; :data:`DEMO_SWEEP`: ood_gated under the maximum-probability and the Gaussian gate, 3 seeds for
   identity, label_only and ood_gated), every point attacked by the soft and the top-1 clone; selection takes
   the strongest of the two within max_drop and max_l1 and never recommends a point that is not below
   label_only by more than the seeds' noise (sweep/select.py), so it may honestly be label_only or identity:
   the demo prints why it chose what it chose;
3. register that defense config as a new MLflow model version and move the ``production`` alias to it;
4. build two archives: the production one from ``models:/<name>@production``, with the per-client monitor in
   ``harden`` mode (:data:`DEMO_MONITOR`, SQLite store under the run directory), and an undefended twin
   (identity, no monitor);
5. start TorchServe with the production config (deploy/config.properties: token authorization on, no
   X-StealGuard-Defense header, loopback only) and Prometheus (deploy/alerts.yml loaded) on 127.0.0.1; a
   randomised production defense gets a secret generated now (``secrets.token_urlsafe``) through
   STEALGUARD_SECRET in TorchServe's environment only: never written to disk, never printed;
6. attack both archives over HTTP: a thief client (one X-Client-Id) sends the out-of-distribution queries and
   trains both clones (soft and top-1) on the same answers; benign clients send the test set; one table with
   the four clone accuracies and each archive's benign top-1, then what the monitor did to the thief and to
   the benign clients;
7. print where to look next and leave the servers running (pid files in .run/, so `make stop` stops them).

Everything is parameterised (dataset, query set, budgets, epochs, monitor, ports, model store, tracking URI,
run directory, whether to leave the servers running), so the end-to-end test runs the same code at tiny
settings.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlflow_project.ops.processes import running_pid
from mlflow_project.ops.prometheus import Prometheus, scrape_config
from mlflow_project.ops.torchserve import TorchServe

REPO = Path(__file__).resolve().parents[2]
PROD_CONFIG = REPO / "deploy" / "config.properties"
DEFENSE_HEADER = "X-StealGuard-Defense"

# The production archive's monitor. harden: a flagged client's later answers come from MAD at an l1 budget of
# 1.0, which moves the top-1 of the rows it is unsure about (so it hurts the top-1 clone as well as the soft one;
# label_only would not move the top-1 attacker at all); benign clients are never flagged in the measured case and
# keep the production defense. ood.share 0.15 instead of the default 0.4: on the demo's 2-epoch Fashion-MNIST
# victim 3.8 % of test images and 25.8 % of mnist5k digits have a top probability below 0.5 (measured here), so
# the default lets an MNIST-digit thief pass (RESULTS.md, issue 19) and 0.15 sits between the two. PRADA at
# delta 0.94, where RESULTS.md measured no benign false positive over 20 clients. The store URL is set per run
# (a SQLite file under the demo's run directory).
DEMO_MONITOR: dict[str, Any] = {
    "header": "X-Client-Id",
    "action": "harden",
    "harden": {"name": "mad", "epsilon": 1.0, "norm": "l1"},
    "prada": {"delta": 0.94},
    "ood": {"share": 0.15},
}


# The demo's sweep (get_preset overrides on top of the quick preset; budget and clone epochs are the HTTP thief's,
# DemoConfig.attack_budget / attack_epochs, so that the sweep measures what the thief then does): a lean grid (MAD,
# MAD-argmax, reverse sigmoid, label_only, identity) and ood_gated with label_only inside and MAD at l1 2 outside
# under both gates, the maximum probability and the Gaussian score (plugins.ood), each tau calibrated on the victim
# to a 0.9-point drop. identity, label_only and the ood_gated points get 3 seeds: with one seed a side the selection
# counts no win over label_only. Measured in process on the demo's 2-epoch victim (89.48 %), 5,000 mnist5k queries,
# 10-epoch clones, seeds 0-2 (RESULTS.md, "A better OOD score"): undefended 35.6 % [33.0-39.6], label_only 33.4,
# ood_gated max_prob 34.1, ood_gated gaussian 21.4 [19.9-23.5] at a 0.89-point drop.
DEMO_SWEEP: dict[str, Any] = {
    "mad_epsilons": (0.8,), "mad_argmax_epsilons": (1.0,), "reverse_sigmoid_betas": (0.5,),
    "random_noise_epsilons": (), "rounding_decimals": (),
    "ood_gated_inside": ("label_only",), "ood_gated_outside": ("mad",), "ood_gated_epsilon": 2.0,
    "ood_gated_max_drop": 0.9, "ood_gated_scores": ("max_prob", "gaussian"),
    "seeds": (0, 1, 2), "multi_seed_points": ("identity", "label_only", "ood_gated"),
}


@dataclass
class DemoConfig:
    dataset: str = "fashion_mnist"
    arch: str = ""  # "" = the dataset's default (lenet for Fashion-MNIST, mlp for digits)
    victim_dir: str = ""  # "" = artifacts/victims/<dataset>_<arch>; reused when it holds a trained victim
    victim_epochs: int = 2  # a fresh clone: 60 s, 89.3 % test accuracy here (the lab trains 12: 91.8 %)
    victim_name: str = ""  # registered victim model name; "" = <dataset>_<arch>
    preset: str = "quick"
    queryset: str = "mnist5k"  # the attacker's out-of-distribution queries, in the sweep and over HTTP
    # mlflow_project.sweep.presets.get_preset overrides (budget and epochs default to the HTTP thief's)
    sweep_overrides: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_SWEEP))
    # the thief over HTTP: the whole mnist5k pool, 10 clone epochs (issue 19's setting; the quick sweep's 2,000 x 4
    # clones reach ~19 % undefended, barely above chance, this one ~39 %)
    attack_budget: int = 5000
    attack_epochs: int = 10
    seed: int = 0  # the thief's query sample and clone initialisation (the same against both archives)
    monitor: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEMO_MONITOR))  # store: set per run
    thief_client: str = "thief-1"
    benign_clients: int = 10  # the test set is split over this many benign client ids
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db
    model_store: str = str(REPO / "model_store")
    run_dir: str = str(REPO / ".run")  # serve/ and prometheus/ (pid files where `make stop` looks for them)
    results_dir: str = ""  # sweep outputs (plots, CSV); "" = the sweep's default under results/sweeps/
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    worker_port: int = 9000
    prometheus_port: int = 9090
    scrape_interval_s: int = 5
    keep_running: bool = True
    threads: int = 1
    progress: bool = True


_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[demo {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# ------------------------------------------------------------------------------------------------ 1. victim


def victim(cfg: DemoConfig) -> tuple[Path, str, str, float]:
    """Train or reuse the victim; register it as an MLflow model. Returns (export dir, name, version, test acc)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from handlers.victim_export import VictimExport
    from mlflow_project.lab import data
    from mlflow_project.lab.train_victim import (
        DEFAULTS,
        TrainConfig,
        VictimResult,
        export_victim,
        load_exported,
        log_victim,
        train_victim,
    )
    from mlflow_project.lifecycle import tracking

    arch = cfg.arch or data.default_arch(cfg.dataset)
    out = Path(cfg.victim_dir) if cfg.victim_dir else REPO / "artifacts" / "victims" / f"{cfg.dataset}_{arch}"
    name = cfg.victim_name or f"{cfg.dataset}_{arch}"
    tracking.setup(cfg.tracking_uri or None)
    client = MlflowClient()
    if VictimExport.is_export(out):
        model, arch, spec = load_exported(out)
        acc = float(VictimExport.open(out).spec.get("test_accuracy", float("nan")))
        say(f"reusing the trained victim in {out} ({cfg.dataset}/{arch}, test accuracy {acc:.4f})")
        versions = client.search_model_versions(f"name = '{name}'")
        if versions:
            v = max(versions, key=lambda mv: int(mv.version))
            say(f"victim already registered in MLflow as {name} version {v.version}")
            return out, name, str(v.version), acc
        say(f"registering it in MLflow as {name}")
        # the export holds no training record: log the dataset's default settings and tag the run as a re-upload
        result = VictimResult(model=model, arch=arch, spec=spec, train_config=TrainConfig(**DEFAULTS[cfg.dataset]),
                              train_accuracy=float("nan"), test_accuracy=acc, losses=[], seconds=0.0)
    else:
        say(f"training a {cfg.dataset}/{arch} victim for {cfg.victim_epochs} epochs (export: {out})")
        result = train_victim(cfg.dataset, arch, epochs=cfg.victim_epochs, progress=cfg.progress)
        say(f"victim trained in {result.seconds:.0f}s: test accuracy {result.test_accuracy:.4f}; exporting "
            "(state dict, torch.export, TorchScript, ONNX)")
        export_victim(result.model, result.arch, result.spec, out, result.test_accuracy)
        acc = result.test_accuracy
    with tracking.start_run(f"victim-{cfg.dataset}-{arch}", cfg.tracking_uri or None):
        mlflow.set_tags({"stealguard.demo": "true", "stealguard.victim_export": str(out.resolve())})
        logged = log_victim(result, out, name)
    version = str(logged["registered_model_version"])
    say(f"victim registered as {name} version {version}")
    return out, name, version, acc


# ------------------------------------------------------------------------------------------ 2-3. sweep, registry


def shown(config: dict[str, Any]) -> str:
    """A defense config as the demo prints it: JSON, with a Gaussian gate's fitted statistics (K x K floats)
    summarised (the registered config and the archive hold them whole)."""
    if isinstance(config.get("gaussian"), dict):
        k = len(config["gaussian"].get("means", []))
        config = {**config, "gaussian": f"<fitted: {k} class means of the log-ratios, shared precision>"}
    return json.dumps(config, sort_keys=True)


def demo_preset(cfg: DemoConfig):
    """The demo's sweep preset: ``cfg.preset`` on ``cfg.dataset`` / ``cfg.queryset`` at the HTTP thief's budget and
    clone epochs, with ``cfg.sweep_overrides`` (default :data:`DEMO_SWEEP`) on top."""
    from mlflow_project.sweep.presets import get_preset

    return get_preset(cfg.preset, **{"dataset": cfg.dataset, "queryset": cfg.queryset, "budget": cfg.attack_budget,
                                     "epochs": cfg.attack_epochs, **cfg.sweep_overrides})


def sweep_and_promote(cfg: DemoConfig, victim_dir: Path, victim_uri: str, name: str) -> dict[str, Any]:
    from mlflow_project.lifecycle.promote import promote
    from mlflow_project.lifecycle.register import register
    from mlflow_project.sweep.run import run_sweep
    from mlflow_project.sweep.select import LABEL_ONLY
    from plugins import needs_secret

    preset = demo_preset(cfg)
    say(f"sweep '{preset.name}': {preset.attack} attacker with {preset.queryset} queries, {preset.budget} queries, "
        f"{preset.epochs} clone epochs, each point attacked by a soft and a top-1 clone trained on the same "
        "answers; defenses x budgets (points already in the store are reused)")
    res = run_sweep(preset, victim=str(victim_dir), tracking_uri=cfg.tracking_uri or None,
                    results_dir=cfg.results_dir or None, progress=cfg.progress)
    say(f"sweep done in {res.seconds:.0f}s: {len(res.points)} points ({res.new_points} new, {res.reused_points} "
        f"reused); parent run {res.parent_run_id}")
    if not res.recommended:
        raise RuntimeError(f"sweep: no recommended point (no defense kept the defender's accuracy within max_drop "
                           f"{preset.max_drop:g} points and mean L1 {preset.max_l1:g}); see the sweep's output above")
    rec = res.recommended
    label_only = next(p for p in res.points if p["defense"] == LABEL_ONLY)
    config = json.loads(rec["defense_config"])
    say(f"selection rule: the lowest strongest-attacker accuracy (max of the soft and the top-1 clone) within a "
        f"defender-accuracy drop <= {preset.max_drop:g} points and a mean L1 <= {preset.max_l1:g}, and only if "
        "below label_only's by more than the seeds' noise (outside the min-max spread, or lower on enough paired "
        "seeds for a sign test at p <= 0.05; with one seed a side no win counts); else label_only (or identity when "
        "label_only breaks the caps)")
    say(f"label_only: strongest attacker {point_line(label_only)}")
    say(f"chosen: {rec['label']}: strongest attacker {point_line(rec)}")
    say(f"why: {rec['selection_reason']}")
    secret = None
    if needs_secret(config):
        secret = secrets.token_urlsafe(32)
        say(f"'{config['name']}' is randomised: a secret generated for this run keys it (STEALGUARD_SECRET in this "
            "process while registering and packaging, then in TorchServe's environment; never written or printed, "
            "MLflow and the archive get its fingerprint only)")
    say(f"registering {shown(config)} in MLflow as {name} (victim {victim_uri})")
    with secret_in_env(secret):
        reg = register(config, victim_uri, name=name, provenance={"sweep_parent_run": res.parent_run_id,
                                                                   "sweep_key": res.sweep_key})
    promoted = promote(reg["name"], reg["version"], "production")
    say(f"{reg['name']} version {reg['version']} registered; alias production -> {reg['version']} "
        f"(was: {promoted['previous'] or 'none'})")
    return {"config": config, "registered": reg, "sweep": res, "preset": preset, "recommended": rec,
            "label_only": label_only, "secret": secret}


@contextlib.contextmanager
def secret_in_env(secret: str | None):
    """STEALGUARD_SECRET set to ``secret`` in this process for the block (register and package find the deploy
    secret there, and record its fingerprint), then restored; nothing when ``secret`` is None."""
    from handlers.deployment import ENV_SECRET

    if secret is None:
        yield
        return
    before = os.environ.get(ENV_SECRET)
    os.environ[ENV_SECRET] = secret
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_SECRET, None)
        else:
            os.environ[ENV_SECRET] = before


def point_line(p: dict[str, Any]) -> str:
    return (f"{p['attacker_accuracy_strongest']:.4f} (soft {p['attacker_accuracy_soft']:.4f}, top-1 "
            f"{p['attacker_accuracy_top1']:.4f}), defender accuracy {p['defender_accuracy']:.4f} (drop "
            f"{p['accuracy_drop_points']:.2f} points), mean L1 {p['perturbation_l1_mean']:.4f}")


# ------------------------------------------------------------------------------------------------ 4. archives


def build_archives(cfg: DemoConfig, defense_name: str, victim_dir: Path, prefix: str,
                   monitor: dict[str, Any]) -> tuple[str, str]:
    from mlflow_project.lifecycle import package

    store = Path(cfg.model_store)
    store.mkdir(parents=True, exist_ok=True)
    defended, twin = f"{prefix}_defended", f"{prefix}_undefended"
    uri = f"models:/{defense_name}@production"
    from mlflow_project.lifecycle import tracking

    say(f"building the production archive {store / (defended + '.mar')} from {uri}, per-client monitor "
        f"{json.dumps(monitor)}")
    package.main(["--name", defended, "--defense", uri, "--export-path", str(store), "--monitor", json.dumps(monitor),
                  "--tracking-uri", tracking.resolve_tracking_uri(cfg.tracking_uri or None)])
    say(f"building the undefended twin {store / (twin + '.mar')} (same victim, identity defense)")
    package.main(["--name", twin, "--victim", str(victim_dir), "--defense", '{"name": "identity"}',
                  "--export-path", str(store), "--version-name", "demo-twin", "--version", "identity"])
    return defended, twin


# ------------------------------------------------------------------------------------------------ 5. servers


class Servers:
    """TorchServe and Prometheus, each in its own process group; pid files where `make stop` looks."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.run = Path(cfg.run_dir).resolve()
        self.serve_dir = self.run / "serve"
        self.prom_dir = self.run / "prometheus"
        self.ts_pid_file = self.serve_dir / "torchserve.pid"
        self.prom_pid_file = self.run / "prometheus.pid"
        self.ts: TorchServe | None = None
        self.prom: Prometheus | None = None
        h = cfg.host
        self.inference_url = f"http://{h}:{cfg.inference_port}"
        self.management_url = f"http://{h}:{cfg.management_port}"
        self.metrics_url = f"http://{h}:{cfg.metrics_port}"
        self.prometheus_url = f"http://{h}:{cfg.prometheus_port}"

    def _check_free(self) -> None:
        for pid_file, what in ((self.ts_pid_file, "TorchServe"), (self.prom_pid_file, "Prometheus")):
            pid = running_pid(pid_file)  # not a pid, or a dead group: nothing to stop
            if pid is not None:
                raise RuntimeError(f"{what} from an earlier demo is still running (pid {pid}, {pid_file}): "
                                   "run `make stop` first")
        c = self.cfg
        for port in (c.inference_port, c.management_port, c.metrics_port, c.grpc_inference_port,
                     c.grpc_management_port, c.prometheus_port):
            if _port_busy(c.host, port):
                raise RuntimeError(f"port {c.host}:{port} is already in use: stop what uses it or choose other ports "
                                   "(--inference-port, --management-port, --metrics-port, --grpc-ports, "
                                   "--prometheus-port)")

    def start_torchserve(self, models: list[str], secret: str | None = None, timeout: float = 240.0) -> None:
        """``secret``: the randomised defenses' deploy-time secret, handed to TorchServe (and so to its workers)
        in the STEALGUARD_SECRET environment variable only."""
        self._check_free()
        c = self.cfg
        env = {"OMP_NUM_THREADS": "1"}
        if secret is not None:
            from handlers.deployment import ENV_SECRET

            env[ENV_SECRET] = secret
        self.ts = TorchServe(
            c.model_store, self.serve_dir, models, base_config=PROD_CONFIG, host=c.host,
            ports={"inference": c.inference_port, "management": c.management_port, "metrics": c.metrics_port,
                   "grpc_inference": c.grpc_inference_port, "grpc_management": c.grpc_management_port},
            worker_port=c.worker_port, jvm_args="-Xmx1g -XX:+UseSerialGC", env=env, pid_file=self.ts_pid_file)
        say(f"starting TorchServe on {self.inference_url} (config {self.serve_dir / 'config.properties'}, from the "
            "production deploy/config.properties: token authorization on, no defense header, loopback only; logs "
            f"{self.ts.log_dir})")
        self.ts.start(timeout)
        say(f"TorchServe ready (pid {self.ts.proc.pid}): {', '.join(models)}")

    def auth(self) -> dict[str, str]:
        """The inference API's Authorization header (TorchServe's key_file.json in the serve directory)."""
        header = self.ts.token_header("inference") if self.ts is not None else {}
        if self.ts is not None and self.ts.token_auth and not header:
            raise RuntimeError(f"token authorization is on but {self.serve_dir / 'key_file.json'} has no inference "
                               "key")
        return header

    def start_prometheus(self, timeout: float = 60.0) -> None:
        c = self.cfg
        conf = scrape_config([f"{c.host}:{c.metrics_port}"], c.scrape_interval_s, labels={"environment": "dev"})
        self.prom = Prometheus(self.prom_dir, conf, listen=f"{c.host}:{c.prometheus_port}", pid_file=self.prom_pid_file)
        say(f"starting Prometheus on {self.prometheus_url} (scraping {self.metrics_url}/metrics every "
            f"{c.scrape_interval_s}s, alert rules deploy/alerts.yml)")
        self.prom.start(timeout)
        say(f"Prometheus ready (pid {self.prom.proc.pid})")

    def query(self, promql: str) -> float | None:
        return self.prom.scalar(promql)

    def stop(self) -> None:
        """Stop what this object started, by process group (its own pid: start_new_session)."""
        if self.prom is not None and self.prom.proc is not None:
            pid = self.prom.proc.pid
            self.prom.stop()
            say(f"Prometheus (pid {pid}) stopped")
        if self.ts is not None and self.ts.proc is not None:
            pid = self.ts.proc.pid
            self.ts.stop()
            say(f"TorchServe (pid {pid}) stopped")
        self.ts = self.prom = None


# -------------------------------------------------------------------------------------------------- 6. attack


@dataclass
class Theft:
    """One Knockoff thief's run against one archive over HTTP."""

    metrics: dict[str, float]  # attacker_accuracy_soft / _top1 / _strongest, attacker_agreement_*
    queries: torch.Tensor  # what the thief sent, in order
    answers: torch.Tensor  # what it got back (the soft clone's training rows)
    headers: dict[str, str]  # the last response's headers


def steal(cfg: DemoConfig, url: str, headers: dict[str, str], pool: torch.Tensor, arch: str, spec,
          test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Theft:
    """Knockoff over HTTP with ``cfg.attack_budget`` queries from ``pool``; both clones (soft and top-1) trained on
    the same answers and scored on the victim's test set ``test`` = (x, y, the undefended victim's top-1)."""
    from mlflow_project.lab.attacks import AttackConfig, run_attack
    from mlflow_project.lab.evaluate import attacker_metrics
    from mlflow_project.lab.models import build_model
    from mlflow_project.lab.oracles import HTTPOracle

    oracle = HTTPOracle(url, budget=cfg.attack_budget, headers=headers)
    acfg = AttackConfig(name="knockoff", budget=cfg.attack_budget, epochs=cfg.attack_epochs, seed=cfg.seed,
                        pixel_mean=spec.mean, pixel_std=spec.std)
    res = run_attack(oracle, pool, lambda: build_model(arch, num_classes=spec.num_classes), acfg,
                     progress=cfg.progress)
    metrics = attacker_metrics(res, *test)
    metrics["queries"] = float(res.queries)
    return Theft(metrics, res.transfer_x, res.transfer_y, dict(oracle.last_headers))


def serve_test_set(url: str, headers: dict[str, str], x: torch.Tensor, clients: int, client_header: str,
                   ) -> tuple[torch.Tensor, dict[str, str]]:
    """The test set ``x`` as ``clients`` benign clients (``benign-0`` ...), each sending its contiguous share.
    Returns the answers in ``x``'s order and the last response's headers."""
    from mlflow_project.lab.oracles import HTTPOracle

    out = []
    last: dict[str, str] = {}
    for c, share in enumerate(x.tensor_split(clients)):
        oracle = HTTPOracle(url, headers={**headers, client_header: f"benign-{c}"})
        out.append(oracle(share))
        last = dict(oracle.last_headers)
    return torch.cat(out), last


def flagged_clients(store_url: str, namespace: str) -> dict[str, Any]:
    """What the operator sees in the monitor's store (as `python -m mlflow_project.ops.monitor_clients`)."""
    from handlers.monitor_stores import open_store
    from plugins.monitor.store import StoreLimits

    store = open_store(store_url, namespace, StoreLimits(), timeout_ms=5000)
    try:
        return {f.client: f for f in store.flagged()}
    finally:
        store.close()


COLUMNS = (("benign top-1", "benign_top1"), ("clone soft", "attacker_accuracy_soft"),
           ("clone top-1", "attacker_accuracy_top1"), ("strongest", "attacker_accuracy_strongest"))


def table(rows: list[tuple[str, dict[str, float]]], header: str) -> str:
    """The demo's one table: per archive, benign top-1 and the soft, top-1 and strongest clone accuracies."""
    w0 = max(len(name) for name, _ in rows) + 2
    lines = [header, "  " + "archive".ljust(w0) + "".join(c.rjust(14) for c, _ in COLUMNS)]
    for name, m in rows:
        lines.append("  " + name.ljust(w0) + "".join(f"{m[key]:.4f}".rjust(14) for _, key in COLUMNS))
    return "\n".join(lines)


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).double().mean().item()


def monitor_lines(cfg: DemoConfig, flagged: dict[str, Any], thief: tuple[Theft, Theft],
                  benign: tuple[torch.Tensor, torch.Tensor], test_y: torch.Tensor) -> tuple[str, dict[str, Any]]:
    """What the thief and the benign clients each got from the monitored production archive vs the twin."""
    from mlflow_project.sweep.presets import describe

    (prod, twin), (b_prod, b_twin) = thief, benign
    if not torch.equal(prod.queries, twin.queries):
        raise RuntimeError("the thief sent different queries to the two archives (same seed and pool expected)")
    t = flagged.get(cfg.thief_client)
    benign_ids = [f"benign-{c}" for c in range(cfg.benign_clients)]
    benign_flagged = sorted(c for c in benign_ids if c in flagged)
    thief_agree = top1_agreement(prod.answers, twin.answers)
    benign_agree = top1_agreement(b_prod, b_twin)
    acc_prod = (b_prod.argmax(1) == test_y).double().mean().item()
    acc_twin = (b_twin.argmax(1) == test_y).double().mean().item()
    s_prod, s_twin = prod.metrics["attacker_accuracy_strongest"], twin.metrics["attacker_accuracy_strongest"]
    seen = f"flagged (reason {t.reason}; {t.queries} queries seen)" if t is not None else "NOT flagged"
    harden = describe(cfg.monitor.get("harden", {"name": "label_only"}))
    which = f" ({', '.join(benign_flagged)})" if benign_flagged else ""
    lines = [
        f"monitor (action {cfg.monitor.get('action', 'observe')}, a flagged client's later answers: {harden}):",
        f"  thief  ({cfg.monitor.get('header', 'X-Client-Id')}: {cfg.thief_client}, {int(prod.metrics['queries'])} "
        f"{cfg.queryset} queries): {seen}; top-1 agreement with the undefended twin's answers {thief_agree:.4f}; "
        f"strongest clone {s_prod:.4f} vs {s_twin:.4f} against the twin ({100 * (s_prod - s_twin):+.2f} points)",
        f"  benign ({cfg.benign_clients} clients benign-0..{cfg.benign_clients - 1}, {len(b_prod)} test images): "
        f"{len(benign_flagged)}/{cfg.benign_clients} flagged{which}; "
        f"top-1 agreement with the undefended twin's answers {benign_agree:.4f}; benign top-1 {acc_prod:.4f} vs "
        f"{acc_twin:.4f} ({100 * (acc_prod - acc_twin):+.2f} points)",
    ]
    summary = {"thief_flagged": t is not None, "thief_reason": t.reason if t is not None else None,
               "thief_top1_agreement": thief_agree, "benign_flagged": benign_flagged,
               "benign_top1_agreement": benign_agree, "benign_top1": (acc_prod, acc_twin)}
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------------------------------- driver


def run(cfg: DemoConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    from mlflow_project.lab import data
    from mlflow_project.lab.train_victim import load_exported
    from mlflow_project.lab.training import predict_probs
    from mlflow_project.lifecycle import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking_uri or None)
    cfg.tracking_uri = uri
    say(f"MLflow tracking store: {uri}")
    say("step 1/6: victim")
    victim_dir, victim_name, victim_version, victim_acc = victim(cfg)
    say(f"step 2/6: sweep ({cfg.queryset} queries: out of distribution), select, register, promote")
    tuned = sweep_and_promote(cfg, victim_dir, f"models:/{victim_name}/{victim_version}", f"{victim_name}-defense")
    reg = tuned["registered"]
    say("step 3/6: archives")
    run_dir = Path(cfg.run_dir).resolve()
    store_path = run_dir / "monitor" / "monitor.sqlite"
    store_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in store_path.parent.glob("monitor.sqlite*"):  # a new demo starts with no client history
        stale.unlink()
    monitor = {**cfg.monitor, "store": f"sqlite:///{store_path}"}
    secret = tuned.pop("secret")
    with secret_in_env(secret):
        defended, twin = build_archives(cfg, reg["name"], victim_dir, f"{cfg.dataset}_demo", monitor)
    servers = Servers(cfg)
    result: dict[str, Any] = {}
    try:
        say("step 4/6: servers")
        servers.start_torchserve([defended, twin], secret=secret)
        del secret
        servers.start_prometheus()
        auth = servers.auth()
        say(f"step 5/6: over HTTP: a Knockoff thief with {cfg.queryset} queries, and benign clients with the test set")
        model, arch, spec = load_exported(victim_dir)
        test_x, test_y = data.load_raw(cfg.dataset, "test")
        test_x = data.adapt(test_x, spec)
        test = (test_x, test_y, predict_probs(model, test_x).argmax(1))
        pool = data.query_set(cfg.queryset, spec, victim_dataset=cfg.dataset)
        urls = {n: f"{servers.inference_url}/predictions/{n}" for n in (defended, twin)}
        client_header = cfg.monitor.get("header", "X-Client-Id")
        thefts, benign, headers = {}, {}, {}
        for n, u in urls.items():
            say(f"thief {cfg.thief_client} -> {u}: {cfg.attack_budget} {cfg.queryset} queries; soft and top-1 clones "
                f"trained {cfg.attack_epochs} epochs on the same answers")
            thefts[n] = steal(cfg, u, {**auth, client_header: cfg.thief_client}, pool, arch, spec, test)
            say(f"benign clients -> {u}: {len(test_x)} test images over {cfg.benign_clients} client ids")
            benign[n], last = serve_test_set(u, auth, test_x, cfg.benign_clients, client_header)
            headers[n] = {"thief": thefts[n].headers.get(DEFENSE_HEADER), "benign": last.get(DEFENSE_HEADER)}
        metrics = {n: {**thefts[n].metrics, "benign_top1": (benign[n].argmax(1) == test_y).double().mean().item()}
                   for n in urls}
        flagged = flagged_clients(monitor["store"], defended)
        lines, watch = monitor_lines(cfg, flagged, (thefts[defended], thefts[twin]), (benign[defended], benign[twin]),
                                     test_y)
        say("step 6/6: Prometheus")
        rows_seen = None
        deadline = time.monotonic() + 6 * cfg.scrape_interval_s + 10
        while time.monotonic() < deadline:
            rows_seen = servers.query("sum(stealguard_rows_total)")
            if rows_seen:
                break
            time.sleep(1)
        rec = tuned["recommended"]
        header = (f"Knockoff over HTTP with out-of-distribution queries ({cfg.queryset}, {cfg.attack_budget} queries, "
                  f"clones trained {cfg.attack_epochs} epochs: soft = on the returned probabilities, top-1 = on their "
                  f"top-1 labels, same answers), {cfg.dataset} victim {victim_name} v{victim_version} (test accuracy "
                  f"{victim_acc:.4f})\n"
                  f"production = {reg['name']} version {reg['version']} @production: {json.dumps(tuned['config'])} "
                  f"(chosen: {rec['selection_reason']}) + per-client monitor (action {monitor.get('action')})")
        text = table([(f"production ({defended})", metrics[defended]), (f"undefended twin ({twin})", metrics[twin])],
                     header)
        print("\n" + text + "\n" + lines + "\n", flush=True)
        sweep = tuned["sweep"]
        plots = sorted(str(p) for p in Path(sweep.results_dir).glob("*.png"))
        key_file = servers.serve_dir / "key_file.json"
        print("Where to look next:")
        print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  (then http://127.0.0.1:5000)")
        print(f"  Prometheus:  {servers.prometheus_url}/graph?g0.expr=stealguard_rows_total  "
              f"(rows scraped so far: {rows_seen:.0f})" if rows_seen else f"  Prometheus:  {servers.prometheus_url}")
        print(f"  metrics:     {servers.metrics_url}/metrics")
        print(f"  predictions: curl -X POST {urls[defended]} -H 'Content-Type: application/json' -H 'X-Client-Id: me' "
              f"-H \"Authorization: Bearer $(jq -r .inference.key {key_file})\" -d '{{\"instances\": [...]}}'")
        print(f"  flagged:     .venv/bin/python -m mlflow_project.ops.monitor_clients --store {monitor['store']} "
              f"--model {defended}")
        print(f"  sweep plots: {', '.join(plots) if plots else sweep.results_dir}")
        print("  docs:        docs/concepts.md, docs/configuration.md, docs/operations.md")
        result = {"metrics": metrics, "headers": headers, "registered": reg, "victim": (victim_name, victim_version),
                  "victim_accuracy": victim_acc,
                  "defended": defended, "twin": twin, "rows_seen": rows_seen, "table": text, "monitor_lines": lines,
                  "monitor": watch, "monitor_store": monitor["store"], "sweep": sweep, "config": tuned["config"],
                  "recommended": rec, "label_only": tuned["label_only"], "preset": tuned["preset"], "urls": urls,
                  "seconds": time.perf_counter() - t0}
    except BaseException:
        servers.stop()
        raise
    if cfg.keep_running:
        say(f"servers LEFT RUNNING (TorchServe pid {servers.ts.proc.pid}, Prometheus pid {servers.prom.proc.pid}): "
            "stop them with `make stop`")
    else:
        servers.stop()
    say(f"demo done in {time.perf_counter() - t0:.0f}s")
    return result


def parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m mlflow_project.ops.demo", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--victim-dir", default=d.victim_dir, help="reused when it holds a trained victim")
    p.add_argument("--victim-epochs", type=int, default=d.victim_epochs, help="when the victim must be trained")
    p.add_argument("--preset", default=d.preset, help="sweep preset: tiny, quick, paper")
    p.add_argument("--queryset", default=d.queryset, help="the attacker's queries (sweep and HTTP thief)")
    p.add_argument("--sweep-budget", type=int, default=0, help="the sweep's attacker budget (default: --attack-budget)")
    p.add_argument("--sweep-epochs", type=int, default=0, help="the sweep's clone epochs (default: --attack-epochs)")
    p.add_argument("--attack-budget", type=int, default=d.attack_budget, help="queries of the HTTP attack")
    p.add_argument("--attack-epochs", type=int, default=d.attack_epochs)
    p.add_argument("--seed", type=int, default=d.seed, help="the HTTP thief's query sample and clone init")
    p.add_argument("--benign-clients", type=int, default=d.benign_clients, help="client ids the test set is split over")
    p.add_argument("--monitor", default="", help="the production archive's monitor: section (inline JSON or a file; "
                   "default DEMO_MONITOR in mlflow_project/ops/demo.py); its store is always the run directory's")
    p.add_argument("--tracking-uri", default=d.tracking_uri)
    p.add_argument("--model-store", default=d.model_store)
    p.add_argument("--run-dir", default=d.run_dir, help="TorchServe/Prometheus work dirs and pid files")
    p.add_argument("--results-dir", default=d.results_dir)
    p.add_argument("--inference-port", type=int, default=d.inference_port)
    p.add_argument("--management-port", type=int, default=d.management_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--grpc-ports", default=f"{d.grpc_inference_port},{d.grpc_management_port}")
    p.add_argument("--worker-port", type=int, default=d.worker_port)
    p.add_argument("--prometheus-port", type=int, default=d.prometheus_port)
    p.add_argument("--stop-servers", action="store_true", help="stop the servers at the end instead of leaving them")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(argv: list[str] | None = None) -> DemoConfig:
    """The DemoConfig a command line asks for (``--sweep-budget`` / ``--sweep-epochs`` on top of DEMO_SWEEP)."""
    from mlflow_project.lifecycle.package import read_monitor_file

    a = parser().parse_args(argv)
    gi, gm = (int(v) for v in a.grpc_ports.split(","))
    overrides = {k: v for k, v in (("budget", a.sweep_budget), ("epochs", a.sweep_epochs)) if v}
    return DemoConfig(
        dataset=a.dataset, arch=a.arch, victim_dir=a.victim_dir, victim_epochs=a.victim_epochs, preset=a.preset,
        queryset=a.queryset, sweep_overrides={**DEMO_SWEEP, **overrides}, attack_budget=a.attack_budget,
        attack_epochs=a.attack_epochs,
        seed=a.seed, benign_clients=a.benign_clients,
        monitor=read_monitor_file(a.monitor) if a.monitor else copy.deepcopy(DEMO_MONITOR),
        tracking_uri=a.tracking_uri, model_store=a.model_store, run_dir=a.run_dir, results_dir=a.results_dir,
        inference_port=a.inference_port, management_port=a.management_port, metrics_port=a.metrics_port,
        grpc_inference_port=gi, grpc_management_port=gm, worker_port=a.worker_port,
        prometheus_port=a.prometheus_port, keep_running=not a.stop_servers, threads=a.threads,
        progress=not a.no_progress,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(config_from_args(argv))


if __name__ == "__main__":
    main()
