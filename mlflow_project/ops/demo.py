"""The newcomer's demo (`make demo`): the whole StealGuard lifecycle on one machine, end to end, over HTTP.

Steps (each prints what it does):
1. train (or reuse) a victim and register it as an MLflow model;
2. sweep defenses against a Knockoff attacker (the ``quick`` preset by default) and pick the recommended point;
3. register that defense config as a new MLflow model version and move the ``production`` alias to it;
4. build two archives: the defended one from ``models:/<name>@production`` and an undefended twin (identity);
5. start TorchServe (config from deploy/config.dev.properties: TOKEN AUTHORIZATION OFF, loopback only) and
   Prometheus (deploy/alerts.yml loaded) on 127.0.0.1;
6. run a short Knockoff attack over HTTP against both archives and print a side-by-side table;
7. print where to look next and leave the servers running (pid files in .run/, so `make stop` stops them).

Everything is parameterised (dataset, budgets, epochs, ports, model store, tracking URI, run directory, whether
to leave the servers running), so the end-to-end test runs the same code at tiny settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import torch

from mlflow_project.ops.processes import group_alive, stop_group
from mlflow_project.ops.torchserve import TorchServe, read_pid

REPO = Path(__file__).resolve().parents[2]
DEV_CONFIG = REPO / "deploy" / "config.dev.properties"
ALERTS = REPO / "deploy" / "alerts.yml"


@dataclass
class DemoConfig:
    dataset: str = "fashion_mnist"
    arch: str = ""  # "" = the dataset's default (lenet for Fashion-MNIST, mlp for digits)
    victim_dir: str = ""  # "" = artifacts/victims/<dataset>_<arch>; reused when it holds a trained victim
    victim_epochs: int = 2  # a fresh clone: 60 s, 89.3 % test accuracy here (the lab trains 12: 91.8 %)
    victim_name: str = ""  # registered victim model name; "" = <dataset>_<arch>
    preset: str = "quick"
    sweep_overrides: dict[str, Any] = field(default_factory=dict)  # mlflow_project.sweep.presets.get_preset overrides
    attack_budget: int = 1000
    attack_epochs: int = 4
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


def sweep_and_promote(cfg: DemoConfig, victim_dir: Path, victim_uri: str, name: str) -> dict[str, Any]:
    from mlflow_project.lifecycle.promote import promote
    from mlflow_project.lifecycle.register import register
    from mlflow_project.sweep.presets import get_preset
    from mlflow_project.sweep.run import run_sweep

    preset = get_preset(cfg.preset, **{"dataset": cfg.dataset, "queryset": cfg.dataset, **cfg.sweep_overrides})
    say(f"sweep '{preset.name}': {preset.attack} attacker, {preset.budget} queries, {preset.epochs} clone epochs, "
        "defenses x budgets (points already in the store are reused)")
    res = run_sweep(preset, victim=str(victim_dir), tracking_uri=cfg.tracking_uri or None,
                    results_dir=cfg.results_dir or None, progress=cfg.progress)
    say(f"sweep done in {res.seconds:.0f}s: {len(res.points)} points ({res.new_points} new, {res.reused_points} "
        f"reused); parent run {res.parent_run_id}")
    if not res.recommended:
        raise RuntimeError("sweep: no recommended point (no defense kept the defender's accuracy within max_drop)")
    config = json.loads(res.recommended["defense_config"])
    say(f"recommended: {res.recommended['label']} (defender accuracy {res.recommended['defender_accuracy']:.4f}, "
        f"attacker accuracy {res.recommended['attacker_accuracy']:.4f})")
    say(f"registering {json.dumps(config)} in MLflow as {name} (victim {victim_uri})")
    reg = register(config, victim_uri, name=name, provenance={"sweep_parent_run": res.parent_run_id,
                                                               "sweep_key": res.sweep_key})
    promoted = promote(reg["name"], reg["version"], "production")
    say(f"{reg['name']} version {reg['version']} registered; alias production -> {reg['version']} "
        f"(was: {promoted['previous'] or 'none'})")
    return {"config": config, "registered": reg, "sweep": res}


# ------------------------------------------------------------------------------------------------ 4. archives


def build_archives(cfg: DemoConfig, defense_name: str, victim_dir: Path, prefix: str) -> tuple[str, str]:
    from mlflow_project.lifecycle import package

    store = Path(cfg.model_store)
    store.mkdir(parents=True, exist_ok=True)
    defended, twin = f"{prefix}_defended", f"{prefix}_undefended"
    uri = f"models:/{defense_name}@production"
    from mlflow_project.lifecycle import tracking

    say(f"building {store / (defended + '.mar')} from {uri}")
    package.main(["--name", defended, "--defense", uri, "--export-path", str(store),
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
        self.prom: subprocess.Popen | None = None
        h = cfg.host
        self.inference_url = f"http://{h}:{cfg.inference_port}"
        self.management_url = f"http://{h}:{cfg.management_port}"
        self.metrics_url = f"http://{h}:{cfg.metrics_port}"
        self.prometheus_url = f"http://{h}:{cfg.prometheus_port}"

    def _check_free(self) -> None:
        for pid_file, what in ((self.ts_pid_file, "TorchServe"), (self.prom_pid_file, "Prometheus")):
            try:
                pid = read_pid(pid_file)
            except ValueError:
                pid = None  # not a pid: nothing to stop
            if pid is not None and group_alive(pid):
                raise RuntimeError(f"{what} from an earlier demo is still running (pid {pid}, {pid_file}): "
                                   "run `make stop` first")
        c = self.cfg
        for port in (c.inference_port, c.management_port, c.metrics_port, c.grpc_inference_port,
                     c.grpc_management_port, c.prometheus_port):
            if _port_busy(c.host, port):
                raise RuntimeError(f"port {c.host}:{port} is already in use: stop what uses it or choose other ports "
                                   "(--inference-port, --management-port, --metrics-port, --grpc-ports, "
                                   "--prometheus-port)")

    def start_torchserve(self, models: list[str], timeout: float = 240.0) -> None:
        self._check_free()
        c = self.cfg
        self.ts = TorchServe(
            c.model_store, self.serve_dir, models, base_config=DEV_CONFIG, host=c.host,
            ports={"inference": c.inference_port, "management": c.management_port, "metrics": c.metrics_port,
                   "grpc_inference": c.grpc_inference_port, "grpc_management": c.grpc_management_port},
            worker_port=c.worker_port, jvm_args="-Xmx1g -XX:+UseSerialGC", env={"OMP_NUM_THREADS": "1"},
            pid_file=self.ts_pid_file)
        say(f"starting TorchServe on {self.inference_url} (config {self.serve_dir / 'config.properties'}, from "
            f"deploy/config.dev.properties: TOKEN AUTHORIZATION OFF, loopback only; logs {self.ts.log_dir})")
        self.ts.start(timeout)
        say(f"TorchServe ready (pid {self.ts.proc.pid}): {', '.join(models)}")

    def start_prometheus(self, timeout: float = 60.0) -> None:
        import yaml

        prom = shutil.which("prometheus")
        if prom is None:
            raise RuntimeError("prometheus not found: `make setup` installs the Debian package")
        self.prom_dir.mkdir(parents=True, exist_ok=True)
        conf = {
            "global": {"scrape_interval": f"{self.cfg.scrape_interval_s}s",
                       "evaluation_interval": f"{self.cfg.scrape_interval_s}s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "torchserve", "metrics_path": "/metrics", "static_configs": [
                {"targets": [f"{self.cfg.host}:{self.cfg.metrics_port}"], "labels": {"environment": "dev"}}]}],
        }
        path = self.prom_dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(conf))
        say(f"starting Prometheus on {self.prometheus_url} (scraping {self.metrics_url}/metrics every "
            f"{self.cfg.scrape_interval_s}s, alert rules deploy/alerts.yml)")
        with open(self.prom_dir / "prometheus.log", "wb") as log:
            self.prom = subprocess.Popen(
                [prom, f"--config.file={path}", f"--storage.tsdb.path={self.prom_dir / 'data'}",
                 f"--web.listen-address={self.cfg.host}:{self.cfg.prometheus_port}",
                 "--storage.tsdb.retention.time=2d"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.prom_pid_file.write_text(f"{self.prom.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.prom.poll() is not None:
                raise RuntimeError(f"Prometheus exited: see {self.prom_dir / 'prometheus.log'}")
            try:
                if requests.get(f"{self.prometheus_url}/-/ready", timeout=2).status_code == 200:
                    say(f"Prometheus ready (pid {self.prom.pid})")
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError("Prometheus not ready after 60s")

    def query(self, promql: str) -> float | None:
        r = requests.get(f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        res = r.json()["data"]["result"]
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        """Stop what this object started, by process group (its own pid: start_new_session)."""
        if self.prom is not None:
            stop_group(self.prom.pid, 30.0, self.prom)
            self.prom_pid_file.unlink(missing_ok=True)
            say(f"Prometheus (pid {self.prom.pid}) stopped")
        if self.ts is not None and self.ts.proc is not None:
            pid = self.ts.proc.pid
            self.ts.stop()
            say(f"TorchServe (pid {pid}) stopped")
        self.ts = self.prom = None


# -------------------------------------------------------------------------------------------------- 6. attack


def attack(cfg: DemoConfig, victim_dir: Path, url: str) -> dict[str, float]:
    from mlflow_project.lab.evaluate import EvalConfig, evaluate

    r = evaluate(EvalConfig(dataset=cfg.dataset, victim=str(victim_dir), attack="knockoff", queryset=cfg.dataset,
                            budget=cfg.attack_budget, epochs=cfg.attack_epochs, oracle="http", url=url),
                 progress=cfg.progress)
    return r.metrics


def probe(url: str, x: torch.Tensor) -> tuple[list[list[float]], str]:
    """One request: the returned probabilities and the X-StealGuard-Defense header."""
    r = requests.post(url, data=json.dumps({"instances": x.tolist()}),
                      headers={"Content-Type": "application/json"}, timeout=60)
    r.raise_for_status()
    return [p["probabilities"] for p in r.json()["predictions"]], r.headers.get("X-StealGuard-Defense", "")


def table(rows: list[tuple[str, dict[str, float]]], header: str) -> str:
    cols = [("defender accuracy", "defender_accuracy", "{:.4f}"), ("attacker accuracy", "attacker_accuracy",
            "{:.4f}"), ("mean L1", "perturbation_l1_mean", "{:.4f}"), ("top-1 flips", "top1_flip_rate", "{:.4f}")]
    w0 = max(len(name) for name, _ in rows) + 2
    lines = [header, "  " + "".ljust(w0) + "".join(c[0].rjust(20) for c in cols)]
    for name, m in rows:
        lines.append("  " + name.ljust(w0) + "".join(fmt.format(m[key]).rjust(20) for _, key, fmt in cols))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- driver


def run(cfg: DemoConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    from mlflow_project.lab import data
    from mlflow_project.lab.train_victim import load_exported
    from mlflow_project.lifecycle import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking_uri or None)
    cfg.tracking_uri = uri
    say(f"MLflow tracking store: {uri}")
    say("step 1/6: victim")
    victim_dir, victim_name, victim_version, victim_acc = victim(cfg)
    say("step 2/6: sweep, register, promote")
    tuned = sweep_and_promote(cfg, victim_dir, f"models:/{victim_name}/{victim_version}", f"{victim_name}-defense")
    reg = tuned["registered"]
    say("step 3/6: archives")
    defended, twin = build_archives(cfg, reg["name"], victim_dir, prefix=f"{cfg.dataset}_demo")
    servers = Servers(cfg)
    result: dict[str, Any] = {}
    try:
        say("step 4/6: servers")
        servers.start_torchserve([defended, twin])
        servers.start_prometheus()
        say("step 5/6: Knockoff attack over HTTP against both archives")
        spec = load_exported(victim_dir)[2]
        sample = data.adapt(data.load_raw(cfg.dataset, "test")[0][:8], spec)
        urls = {n: f"{servers.inference_url}/predictions/{n}" for n in (defended, twin)}
        answers = {n: probe(u, sample) for n, u in urls.items()}
        metrics = {}
        for n, u in urls.items():
            say(f"attacking {u}: {cfg.attack_budget} queries, clone trained {cfg.attack_epochs} epochs "
                f"(and the defender's accuracy over the test set through the same endpoint)")
            metrics[n] = attack(cfg, victim_dir, u)
        say("step 6/6: Prometheus")
        rows_seen = None
        deadline = time.monotonic() + 6 * cfg.scrape_interval_s + 10
        while time.monotonic() < deadline:
            rows_seen = servers.query("sum(stealguard_rows_total)")
            if rows_seen:
                break
            time.sleep(1)
        header = (f"Knockoff over HTTP, {cfg.attack_budget} queries, {cfg.dataset} (victim {victim_name} "
                  f"v{victim_version}, test accuracy {victim_acc:.4f}); defended = {reg['name']} version "
                  f"{reg['version']} @production: {json.dumps(tuned['config'])}, header "
                  f"X-StealGuard-Defense: {answers[defended][1]}")
        text = table([(f"defended ({defended})", metrics[defended]), (f"undefended twin ({twin})", metrics[twin])],
                     header)
        print("\n" + text + "\n", flush=True)
        sweep = tuned["sweep"]
        plots = sorted(str(p) for p in Path(sweep.results_dir).glob("*.png"))
        print("Where to look next:")
        print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  (then http://127.0.0.1:5000)")
        print(f"  Prometheus:  {servers.prometheus_url}/graph?g0.expr=stealguard_rows_total  "
              f"(rows scraped so far: {rows_seen:.0f})" if rows_seen else f"  Prometheus:  {servers.prometheus_url}")
        print(f"  metrics:     {servers.metrics_url}/metrics")
        print(f"  predictions: curl -X POST {urls[defended]} -H 'Content-Type: application/json' "
              "-d '{\"instances\": [...]}'")
        print(f"  sweep plots: {', '.join(plots) if plots else sweep.results_dir}")
        print("  docs:        docs/concepts.md, docs/configuration.md, docs/operations.md")
        result = {"metrics": metrics, "answers": answers, "registered": reg, "victim": (victim_name, victim_version),
                  "defended": defended, "twin": twin, "rows_seen": rows_seen, "table": text, "sweep": sweep,
                  "urls": urls, "seconds": time.perf_counter() - t0}
    except BaseException:
        servers.stop()
        raise
    if cfg.keep_running:
        say(f"servers LEFT RUNNING (TorchServe pid {servers.ts.proc.pid}, Prometheus pid {servers.prom.pid}): "
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
    p.add_argument("--sweep-budget", type=int, default=0, help="override the preset's attacker budget")
    p.add_argument("--sweep-epochs", type=int, default=0, help="override the preset's clone epochs")
    p.add_argument("--attack-budget", type=int, default=d.attack_budget, help="queries of the HTTP attack")
    p.add_argument("--attack-epochs", type=int, default=d.attack_epochs)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    gi, gm = (int(v) for v in a.grpc_ports.split(","))
    overrides = {k: v for k, v in (("budget", a.sweep_budget), ("epochs", a.sweep_epochs)) if v}
    cfg = DemoConfig(
        dataset=a.dataset, arch=a.arch, victim_dir=a.victim_dir, victim_epochs=a.victim_epochs, preset=a.preset,
        sweep_overrides=overrides, attack_budget=a.attack_budget, attack_epochs=a.attack_epochs,
        tracking_uri=a.tracking_uri, model_store=a.model_store, run_dir=a.run_dir, results_dir=a.results_dir,
        inference_port=a.inference_port, management_port=a.management_port, metrics_port=a.metrics_port,
        grpc_inference_port=gi, grpc_management_port=gm, worker_port=a.worker_port,
        prometheus_port=a.prometheus_port, keep_running=not a.stop_servers, threads=a.threads,
        progress=not a.no_progress,
    )
    return run(cfg)


if __name__ == "__main__":
    main()
