"""Attack a (defended) victim and measure both sides: the defender's utility and the attacker's clone.

    python -m mlflow_project.lab.evaluate --dataset fashion_mnist --victim artifacts/victims/fashion_mnist_lenet \
        --defense '{"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"}' --attack knockoff --queryset mnist5k \
        --budget 5000 --epochs 10 --seed 0 --oracle local
    mlflow run . -e evaluate -P dataset=digits -P victim=models:/digits_mlp/1 -P attack=jbda --env-manager local

The core is :func:`evaluate` (no MLflow; the sweep calls it once per grid point); :func:`log_evaluation`
logs a result to the active MLflow run; :func:`summary_text` is the one-screen summary. Metrics (accuracies
in [0, 1]):

- ``victim_accuracy``: the undefended victim's top-1 accuracy on its test set;
- ``defender_accuracy``: top-1 accuracy of the defended (perturbed) outputs on the same test set;
- ``perturbation_l1_mean``, ``perturbation_l1_max``, ``kl_mean`` (KL(y || y~)), ``top1_flip_rate``:
  what the defense changed on the test set (plugins.measures); ``angular_deviation_mean`` for the MAD family;
- ``defender_nll``, ``defender_ece``: calibration of the returned probabilities on the test set (mean negative
  log-likelihood; expected calibration error, 15 bins); ``victim_nll``, ``victim_ece``: the undefended victim's;
- the attackers as a set (:mod:`mlflow_project.lab.attacks`): from one query pass, a clone trained on the
  returned rows (``attacker_accuracy_soft``) and its twin trained on their top-1 labels
  (``attacker_accuracy_top1``): top-1 accuracy on the victim's test set; ``attacker_accuracy_strongest`` is
  the larger, and ``attacker_accuracy`` (kept for compatibility) equals it. ``attacker_agreement_soft`` /
  ``_top1`` (how often each clone agrees with the undefended victim), ``attacker_agreement`` the strongest
  clone's;
- ``query_top1_flip_rate``: how often the answers the attacker got have another top-1 class than the undefended
  victim's on the same queries (``top1_flip_rate`` is the same on the benign test set);
- ``query_label_entropy`` (bits; log2 K when the answers' top-1 labels cover the K classes evenly, 0 when all
  are one class) and ``query_confidence_mean`` (the answers' mean top-1 probability): what the transfer set
  teaches, e.g. why one OOD query set makes a better clone than another at the same budget;
- ``queries``: rows the attack spent (exact).

With a ``monitor`` config (the server's per-client monitor, ``plugins.monitor``; actions observe and harden) the
attacker is one client (or ``attacker_clients`` ids sharing its budget, batch by batch) through
:class:`~mlflow_project.lab.oracles.MonitoredOracle`, and the benign test set is answered as ``benign_clients``
other clients through :func:`~mlflow_project.lab.oracles.serve_benign` and the same monitor, so
``defender_accuracy`` is what benign clients get. Further metrics: ``monitor_flagged`` (1 when any attacker id
was flagged), ``monitor_queries_until_flagged`` (queries answered when the first was; logged only then),
``monitor_attacker_ids_flagged``, ``monitor_benign_flagged`` (benign clients flagged). A grid point may carry its
monitor inside the defense mapping (``{"name": ..., "monitor": {...}}``, as an archive's config does); the
config splits it off.

Fixed seeds give identical runs in-process (CPU, fixed thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_project.cli import integer
from mlflow_project.lab import data
from mlflow_project.lab.attacks import ART_ATTACKS, ATTACKS, AttackConfig, run_attack
from mlflow_project.lab.models import build_model
from mlflow_project.lab.oracles import (
    HTTPOracle,
    LocalOracle,
    MonitoredOracle,
    build_victim_defense,
    lab_monitor,
    serve_benign,
)
from mlflow_project.lab.training import accuracy, predict_logits, predict_probs
from plugins import measures
from plugins.measures import expected_calibration_error, negative_log_likelihood

METRICS = (
    "victim_accuracy", "defender_accuracy", "perturbation_l1_mean", "perturbation_l1_max", "kl_mean",
    "top1_flip_rate", "angular_deviation_mean", "defender_nll", "defender_ece", "victim_nll", "victim_ece",
    "attacker_accuracy", "attacker_accuracy_soft", "attacker_accuracy_top1", "attacker_accuracy_strongest",
    "attacker_agreement", "attacker_agreement_soft", "attacker_agreement_top1", "query_top1_flip_rate", "queries",
    "query_label_entropy", "query_confidence_mean",
)
MONITOR_METRICS = ("monitor_flagged", "monitor_queries_until_flagged", "monitor_attacker_ids_flagged",
                   "monitor_benign_flagged")
MONITOR_ACTIONS = ("observe", "harden")  # block stops the thief mid-attack; the lab's attacks cannot stop early
ORACLES = ("local", "http")
DEFENSE_ARTIFACT = "defense.json"  # an evaluate run's defense config (register.config_from_run reads it)
# AttackConfig fields an EvalConfig may set through attack_options (the rest are EvalConfig's own)
ATTACK_OPTIONS = {f.name for f in fields(AttackConfig)} - {"name", "budget", "epochs", "lr", "batch_size", "seed",
                                                            "pixel_mean", "pixel_std"}


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "fashion_mnist"
    victim: str = ""  # export directory, or an MLflow model URI (models:/..., runs:/...)
    defense: Mapping[str, Any] = field(default_factory=lambda: {"name": "identity"})
    attack: str = "knockoff"
    queryset: str = ""  # default: the victim's dataset (its train part)
    budget: int = 1000
    epochs: int = 10
    seed: int = 0
    oracle: str = "local"
    url: str = ""  # the prediction URL when oracle=http
    http_send: str = "normalised"
    clone_arch: str = ""  # default: the victim's architecture
    lr: float = 0.05
    batch_size: int = 128
    surrogate_seed: int = 0
    misinformation: str = ""  # train_misinformation export dir, for defenses that need one (adaptive_misinformation)
    attack_options: Mapping[str, Any] = field(default_factory=dict)  # further AttackConfig fields (e.g. momentum)
    monitor: Mapping[str, Any] | None = None  # the per-client monitor's config (plugins.monitor); None: no monitor
    attacker_clients: int = 1  # with a monitor: client ids the thief splits its budget over
    benign_clients: int = 20  # with a monitor: clients the benign test set is replayed by
    track_epochs: bool = False  # score both clones on the test set after every epoch (epoch_accuracy, *_best_epoch)

    def __post_init__(self) -> None:
        if "monitor" in self.defense:  # a sweep point: {"name": ..., "monitor": {...}}
            if self.monitor is not None:
                raise ValueError("monitor: given both in the defense config and on its own; give it once")
            defense = dict(self.defense)
            object.__setattr__(self, "monitor", defense.pop("monitor"))
            object.__setattr__(self, "defense", defense)
        if self.monitor is not None:
            from plugins.monitor import parse_monitor

            action = parse_monitor(self.monitor).action  # ValueError names monitor.<field>
            if action not in MONITOR_ACTIONS:
                raise ValueError(f"monitor.action: evaluate measures {' and '.join(MONITOR_ACTIONS)}; got {action!r} "
                                 "(a blocked thief stops mid-attack, which the lab's attacks do not model)")
            if self.oracle != "local":
                raise ValueError("monitor: the lab runs the monitor with oracle=local; over HTTP the served "
                                 "archive's own monitor: section applies (send the client id with HTTPOracle)")
        if self.attacker_clients < 1 or self.benign_clients < 1:
            raise ValueError(f"attacker_clients / benign_clients: must be >= 1; got {self.attacker_clients} / "
                             f"{self.benign_clients}")
        data.check_dataset(self.dataset)
        if self.queryset:
            data.check_queryset(self.queryset)
        bad = sorted(set(self.attack_options) - ATTACK_OPTIONS)
        if bad:
            raise ValueError(f"attack_options: {bad} are not attack settings; allowed: "
                             f"{', '.join(sorted(ATTACK_OPTIONS))}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack: unknown {self.attack!r}; allowed: {', '.join(ATTACKS)}")
        if self.oracle not in ORACLES:
            raise ValueError(f"oracle: unknown {self.oracle!r}; allowed: {', '.join(ORACLES)}")
        if self.oracle == "http" and not self.url:
            raise ValueError("url: oracle=http needs the prediction URL (e.g. http://127.0.0.1:8080/predictions/m)")
        if self.budget < 1:
            raise ValueError(f"budget: must be >= 1; got {self.budget}")
        if self.track_epochs and self.attack in ART_ATTACKS:
            raise ValueError(f"track_epochs: {self.attack} trains its clone inside ART, which reports no epochs; "
                             f"allowed with: {', '.join(a for a in ATTACKS if a not in ART_ATTACKS)}")

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["defense"] = json.dumps(dict(self.defense), sort_keys=True)
        d["defense_name"] = self.defense.get("name", "")
        d["attack_options"] = json.dumps(dict(self.attack_options), sort_keys=True)
        d["monitor"] = "" if self.monitor is None else json.dumps(dict(self.monitor), sort_keys=True)
        d["queryset"] = self.queryset or self.dataset
        return d


@dataclass
class Victim:
    model: nn.Module
    arch: str
    spec: data.InputSpec
    source: str


@dataclass
class EvalResult:
    config: EvalConfig
    metrics: dict[str, float]
    seconds: dict[str, float]
    victim: Victim
    clone: nn.Module  # the strongest of the two attackers' clones
    per_row: dict[str, torch.Tensor]  # the defense's per-row measures on the test set
    history: list[dict]
    per_class: list[dict] = field(default_factory=list)  # see class_breakdown (logged as per_class.json)
    # with track_epochs: each clone's test accuracy after every epoch of its (last stage of) training
    epoch_accuracy: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- loading


def load_victim(ref: str | Path) -> Victim:
    """A victim from an export directory (or a file in it), or an MLflow model URI."""
    ref = str(ref)
    if not ref:
        raise ValueError("victim: empty; give an export directory written by train_victim "
                         "(e.g. artifacts/victims/fashion_mnist_lenet) or an MLflow model URI (models:/name/1)")
    if "://" not in ref and ":/" not in ref:
        from mlflow_project.lab.train_victim import load_exported

        if not Path(ref).exists():
            raise FileNotFoundError(f"victim: {ref} does not exist; expected an export directory or a model URI")
        model, arch, spec = load_exported(ref)
        return Victim(model, arch, spec, str(Path(ref).parent if Path(ref).is_file() else Path(ref)))
    import mlflow

    info = mlflow.models.get_model_info(ref)
    doc = (info.metadata or {}).get("stealguard")
    if not doc:
        raise ValueError(f"victim: {ref} has no 'stealguard' metadata; log victims with train_victim")
    spec = data.InputSpec.from_json(doc)
    loaded = mlflow.pytorch.load_model(ref, map_location="cpu")
    model = build_model(doc["arch"], num_classes=spec.num_classes)  # eager module whatever the MLflow format
    model.load_state_dict(loaded.state_dict())
    return Victim(model.eval(), doc["arch"], spec, ref)


def parse_defense(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A defense config from a mapping, an inline JSON object, a .json/.yaml file path, or a bare defense name
    (``identity``: that defense with its defaults; what MLproject passes by default)."""
    if value is None or value == "":
        return {"name": "identity"}
    if isinstance(value, Mapping):
        return dict(value)
    text = value.strip()
    if not text.startswith("{"):
        from plugins import available_defenses

        if not Path(text).exists() and text in available_defenses():
            return {"name": text}
        if not Path(text).exists():
            raise ValueError(f"defense: {text!r} is neither an inline JSON object, an existing config file nor a "
                             f"defense name ({', '.join(available_defenses())})")
    return load_mapping(text, "defense", '{"name": "top_k", "k": 1}')


def load_mapping(text: str, what: str, example: str) -> dict[str, Any]:
    """A mapping from inline JSON or an existing .json/.yaml file; errors name ``what`` and show ``example``."""
    text = text.strip()
    if not text.startswith("{"):
        p = Path(text)
        if not p.exists():
            raise ValueError(f"{what}: {text!r} is neither an inline JSON object nor an existing config file")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
            if not isinstance(doc, Mapping):
                raise ValueError(f"{what}: {p} must hold a mapping, e.g. {example}")
            return dict(doc)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc}); e.g. '{example}'") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{what}: must be a JSON object, e.g. {example}")
    return dict(doc)


# --------------------------------------------------------------------------------------------------- the core


def evaluate(cfg: EvalConfig, victim: Victim | None = None, progress: bool = True,
             observers: Sequence[Callable[[str, dict], None]] = (), shared=None) -> EvalResult:
    """Run one evaluation (no MLflow).

    ``observers(stage, payload)`` is the hook a metrics exporter attaches to. Stages: ``defense_batch`` for
    every batch the in-process defense answers (payload: ``probs``, ``perturbed``, ``angular_deviation``,
    ``latency_s``; the test-set pass and the attacker's queries alike), then ``defender`` and ``attacker``
    with the metrics known so far (a dict of floats). ``shared``: a sweep's precomputed victim and surrogate
    outputs (:class:`mlflow_project.sweep.shared.SharedWork`; the answers are bit-identical with or without)."""
    t_all = time.perf_counter()
    victim = victim or load_victim(cfg.victim)
    if victim.spec.dataset != cfg.dataset:
        raise ValueError(f"dataset: the victim was trained on {victim.spec.dataset!r}, not {cfg.dataset!r}")
    spec = victim.spec
    test_x, test_y = data.load_raw(cfg.dataset, "test")
    test_x = data.adapt(test_x, spec)
    defense = build_victim_defense(victim.model, cfg.defense, spec.num_classes, cfg.surrogate_seed,
                                   misinformation=cfg.misinformation or None, surrogate=shared and
                                   shared.surrogate_for(victim.model, cfg.defense, cfg.surrogate_seed))
    model = shared.victim_model(victim.model) if shared else victim.model  # the victim's forward passes
    seconds: dict[str, float] = {}

    # the defender's side: what the defense costs on the victim's test set
    t0 = time.perf_counter()
    probs = predict_probs(model, test_x)

    def on_batch(payload: dict) -> None:
        for obs in observers:
            obs("defense_batch", payload)

    monitor = None
    if cfg.monitor is not None:
        monitor = lab_monitor(victim.model, cfg.monitor, spec.num_classes, cfg.surrogate_seed)
        t_def = time.perf_counter()
        tilde, benign_flagged = serve_benign(victim.model, defense, monitor, test_x, clients=cfg.benign_clients)
        blocked = torch.isnan(tilde).any(dim=1)
        tilde = tilde.double().nan_to_num(1.0 / spec.num_classes)  # never happens under observe / harden
        deviation = None
        on_batch({"probs": probs, "perturbed": tilde, "angular_deviation": None,
                  "latency_s": time.perf_counter() - t_def})
    elif cfg.oracle == "local":
        t_def = time.perf_counter()
        out = defense(probs, test_x)
        tilde, deviation = out.probs, out.angular_deviation
        on_batch({"probs": probs, "perturbed": tilde, "angular_deviation": deviation,
                  "latency_s": time.perf_counter() - t_def})
    else:
        tilde = HTTPOracle(cfg.url, None, send=cfg.http_send, mean=spec.mean, std=spec.std)(test_x).double()
        deviation = None
    victim_top1 = probs.argmax(1)
    metrics, per_row = defender_metrics(probs, tilde, test_y, blocked if monitor is not None else None)
    if deviation is not None:
        metrics["angular_deviation_mean"] = deviation.double().mean().item()
    seconds["defender"] = time.perf_counter() - t0
    for obs in observers:
        obs("defender", dict(metrics))

    # the attacker's side
    t0 = time.perf_counter()
    queryset = cfg.queryset or cfg.dataset
    pool = data.query_set(queryset, spec, victim_dataset=cfg.dataset)
    if monitor is not None:
        oracle = MonitoredOracle(model, defense, monitor, budget=cfg.budget, clients=cfg.attacker_clients)
    elif cfg.oracle == "local":
        oracle = LocalOracle(model, defense, budget=cfg.budget, on_batch=on_batch if observers else None)
    else:
        oracle = HTTPOracle(cfg.url, budget=cfg.budget, send=cfg.http_send, mean=spec.mean, std=spec.std)
    acfg = AttackConfig(name=cfg.attack, budget=cfg.budget, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                        seed=cfg.seed, pixel_mean=spec.mean, pixel_std=spec.std, **dict(cfg.attack_options))
    clone_arch = cfg.clone_arch or victim.arch

    def make_clone() -> nn.Module:
        return build_model(clone_arch, num_classes=spec.num_classes)

    curves: dict[str, list[float]] = {"soft": [], "top1": []}

    def watch(kind: str, _epoch: int, clone: nn.Module) -> None:
        curves[kind].append(accuracy(clone, test_x, test_y))

    res = run_attack(oracle, pool, make_clone, acfg, progress=progress, watch=watch if cfg.track_epochs else None)
    preds = clone_predictions(res, test_x)
    metrics.update(attacker_metrics(res, test_x, test_y, victim_top1, preds))
    if cfg.track_epochs:
        if res.top1_clone is res.clone:  # the twin is the clone itself (one-hot answers): one training, one curve
            curves["top1"] = list(curves["soft"])
        metrics.update(best_epoch_metrics(curves))
    if len(res.transfer_x):
        undefended = predict_probs(model, res.transfer_x).argmax(1)
        metrics["query_top1_flip_rate"] = (res.transfer_y.argmax(1) != undefended).double().mean().item()
        metrics.update(answer_statistics(res.transfer_y))
    metrics["queries"] = float(res.queries)
    if monitor is not None:
        metrics.update(monitor_metrics(oracle, benign_flagged))
    seconds["attacker"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    for obs in observers:
        obs("attacker", dict(metrics))
    best = strongest_kind(metrics)
    strongest = res.clone if best == "soft" else res.top1_clone
    per_class = class_breakdown(res.transfer_y, preds[best], victim_top1, test_y) if len(res.transfer_x) else []
    return EvalResult(cfg, metrics, seconds, victim, strongest, per_row, res.history, per_class,
                      curves if cfg.track_epochs else {})


def defender_metrics(probs: torch.Tensor, tilde: torch.Tensor, test_y: torch.Tensor,
                     blocked: torch.Tensor | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The defender's side on the test set: the undefended ``probs`` against the returned ``tilde`` (rows
    ``blocked`` by a monitor count as wrong). Returns (metrics, per-row measures)."""
    per_row = measures(probs, tilde.to(probs.dtype))
    if blocked is None:
        blocked = torch.zeros(len(test_y), dtype=torch.bool)
    metrics = {
        "victim_accuracy": (probs.argmax(1) == test_y).double().mean().item(),
        "defender_accuracy": ((tilde.argmax(1) == test_y) & ~blocked).double().mean().item(),
        "perturbation_l1_mean": per_row["l1"].mean().item(),
        "perturbation_l1_max": per_row["l1"].max().item(),
        "kl_mean": per_row["kl"].mean().item(),
        "top1_flip_rate": per_row["top1_flip"].mean().item(),
        "defender_nll": negative_log_likelihood(tilde, test_y),
        "defender_ece": expected_calibration_error(tilde, test_y),
        "victim_nll": negative_log_likelihood(probs, test_y),
        "victim_ece": expected_calibration_error(probs, test_y),
    }
    return metrics, per_row


def monitor_metrics(oracle: MonitoredOracle, benign_flagged: set[str]) -> dict[str, float]:
    """What the monitor saw: the attacker flagged (1/0), after how many queries (only when it was), how many of
    its ids, and how many benign clients it flagged."""
    out = {"monitor_flagged": float(oracle.flagged_at is not None),
           "monitor_attacker_ids_flagged": float(len(oracle.flagged_ids)),
           "monitor_benign_flagged": float(len(benign_flagged))}
    if oracle.flagged_at is not None:
        out["monitor_queries_until_flagged"] = float(oracle.flagged_at)
    return out


def clone_predictions(res, test_x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The test-set top-1 (logit argmax, as :func:`training.accuracy` takes it) of both clones of an attack:
    ``{"soft": ..., "top1": ...}``, predicted once for every measure that needs it."""
    return {kind: predict_logits(clone, test_x).argmax(1) for kind, clone in (("soft", res.clone),
                                                                              ("top1", res.top1_clone))}


def best_epoch_metrics(curves: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """From each clone's per-epoch test accuracy: its best epoch's accuracy and which epoch (1-based), and the
    stronger of the two best (``attacker_accuracy_strongest_best_epoch``). This is the checkpoint a trainer
    that keeps the epoch of best test accuracy reports (the authors' release does, knockoffnets'
    ``train_model``): selected on the test set itself, so an upper bound, not a measurement of the last clone."""
    out: dict[str, float] = {}
    for kind in ("soft", "top1"):
        curve = list(curves[kind])
        if not curve:
            raise ValueError(f"best_epoch_metrics: no epochs recorded for the {kind} clone")
        best = max(range(len(curve)), key=curve.__getitem__)
        out[f"attacker_accuracy_{kind}_best_epoch"] = curve[best]
        out[f"attacker_best_epoch_{kind}"] = float(best + 1)
    out["attacker_accuracy_strongest_best_epoch"] = max(out["attacker_accuracy_soft_best_epoch"],
                                                        out["attacker_accuracy_top1_best_epoch"])
    return out


def strongest_kind(metrics: Mapping[str, float]) -> str:
    """``soft`` or ``top1``: the clone with the higher test accuracy (soft on a tie)."""
    return "soft" if metrics["attacker_accuracy_soft"] >= metrics["attacker_accuracy_top1"] else "top1"


def attacker_metrics(res, test_x: torch.Tensor, test_y: torch.Tensor, victim_top1: torch.Tensor,
                     preds: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Accuracy and agreement with the undefended victim of both clones of an attack (the soft one and its top-1
    twin), the strongest (max accuracy), and ``attacker_accuracy`` / ``attacker_agreement`` = the strongest's.
    ``preds``: the clones' :func:`clone_predictions` on ``test_x``, if already computed."""
    if len(test_y) == 0:
        raise ValueError("attacker_metrics: the test set is empty; clone accuracy is undefined")
    preds = clone_predictions(res, test_x) if preds is None else preds
    out: dict[str, float] = {}
    for kind in ("soft", "top1"):
        out[f"attacker_accuracy_{kind}"] = (preds[kind] == test_y).float().mean().item()  # as training.accuracy
        out[f"attacker_agreement_{kind}"] = (preds[kind] == victim_top1).double().mean().item()
    best = strongest_kind(out)
    out["attacker_accuracy_strongest"] = out[f"attacker_accuracy_{best}"]
    out["attacker_accuracy"] = out["attacker_accuracy_strongest"]
    out["attacker_agreement"] = out[f"attacker_agreement_{best}"]
    return out


# --------------------------------------------------------------------------------------------------- reporting


def summary_text(r: EvalResult) -> str:
    c, m = r.config, r.metrics

    def pct(k: str) -> str:
        return f"{100 * m[k]:6.2f}%" if k in m else "    n/a"

    def num(k: str) -> str:
        return f"{m[k]:.4f}" if k in m else "n/a"

    lines = [
        f"StealGuard evaluation  dataset={c.dataset}  victim={r.victim.source} ({r.victim.arch})",
        f"defense  {json.dumps(dict(c.defense), sort_keys=True)}   oracle={c.oracle}",
        f"attack   {c.attack}  queryset={c.queryset or c.dataset}  budget={c.budget}  epochs={c.epochs}  "
        f"seed={c.seed}",
        *([f"monitor  {json.dumps(dict(c.monitor), sort_keys=True)}  attacker ids={c.attacker_clients}  "
           f"benign clients={c.benign_clients}"] if c.monitor is not None else []),
        "-" * 78,
        f"victim accuracy (undefended)   {pct('victim_accuracy')}",
        f"defender accuracy (perturbed)  {pct('defender_accuracy')}   top-1 flips {pct('top1_flip_rate')}",
        f"perturbation L1 mean / max     {num('perturbation_l1_mean')} / {num('perturbation_l1_max')}   "
        f"KL mean {num('kl_mean')}",
        f"angular deviation mean (rad)   {num('angular_deviation_mean')}",
        f"calibration NLL / ECE          defended {num('defender_nll')} / {num('defender_ece')}   "
        f"undefended {num('victim_nll')} / {num('victim_ece')}",
        f"attacker accuracy soft / top-1 {pct('attacker_accuracy_soft')} / {pct('attacker_accuracy_top1')}   "
        f"strongest {pct('attacker_accuracy_strongest')}",
        f"agreement soft / top-1         {pct('attacker_agreement_soft')} / {pct('attacker_agreement_top1')}   "
        f"attacker-query top-1 flips {pct('query_top1_flip_rate')}",
        f"queries spent                  {int(m['queries'])}",
        *([monitor_line(c, m)] if "monitor_flagged" in m else []),
        f"wall time                      defender {r.seconds['defender']:.1f}s  attacker {r.seconds['attacker']:.1f}s"
        f"  total {r.seconds['total']:.1f}s",
    ]
    return "\n".join(lines)


def class_breakdown(answers: torch.Tensor, clone_pred: torch.Tensor, victim_top1: torch.Tensor,
                    test_y: torch.Tensor) -> list[dict[str, float]]:
    """Per class c: ``answer_share`` (the share of the attacker's answers whose top-1 is c: how much of c the
    transfer set elicited), and the test-set recall of the victim and of the (strongest) clone on c, from their
    test-set top-1 ``victim_top1`` and ``clone_pred``. A clone cannot learn a class its queries never elicit:
    low shares and low clone recall line up."""
    share = label_shares(answers)
    out = []
    for c in range(answers.shape[1]):
        mask = test_y == c
        n = int(mask.sum())
        out.append({"class": c, "answer_share": share[c].item(),
                    "victim_recall": (victim_top1[mask] == c).double().mean().item() if n else math.nan,
                    "clone_recall": (clone_pred[mask] == c).double().mean().item() if n else math.nan})
    return out


def label_shares(answers: torch.Tensor) -> torch.Tensor:
    """Per class, the share of the rows whose top-1 label it is (K values summing to 1)."""
    return torch.bincount(answers.argmax(1), minlength=answers.shape[1]).double() / len(answers)


def answer_statistics(answers: torch.Tensor) -> dict[str, float]:
    """The entropy (bits) of the answers' top-1 label histogram and their mean top-1 probability."""
    share = label_shares(answers)
    share = share[share > 0]
    return {"query_label_entropy": float(-(share * share.log2()).sum()),
            "query_confidence_mean": answers.max(1).values.double().mean().item()}


def monitor_line(c: EvalConfig, m: Mapping[str, float]) -> str:
    when = f" after {int(m['monitor_queries_until_flagged'])} queries" if m["monitor_flagged"] else ""
    return (f"monitor: attacker flagged      {'yes' if m['monitor_flagged'] else 'no'}{when}  (ids "
            f"{int(m['monitor_attacker_ids_flagged'])}/{c.attacker_clients}); benign clients flagged "
            f"{int(m['monitor_benign_flagged'])}/{c.benign_clients}")


def summary_figure(r: EvalResult):
    """Accuracies side by side and the histogram of per-row L1 perturbation on the test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = ["victim_accuracy", "defender_accuracy", "attacker_accuracy_soft", "attacker_accuracy_top1"]
    vals = [100 * r.metrics[k] for k in keys]
    bars = a1.bar(["victim", "defender", "attacker\nsoft", "attacker\ntop-1"], vals,
                  color=["#4c72b0", "#55a868", "#c44e52", "#dd8452"])
    a1.bar_label(bars, fmt="%.1f")
    a1.set_ylim(0, 105)
    a1.set_ylabel("test accuracy (%)")
    a1.set_title(f"{r.config.attack} / {r.config.defense.get('name')}, {int(r.metrics['queries'])} queries")
    a2.hist(r.per_row["l1"].numpy(), bins=40, color="#8172b2")
    a2.set_xlabel("||y~ - y||_1 per test image")
    a2.set_ylabel("images")
    a2.set_title("perturbation on the victim's test set")
    fig.tight_layout()
    return fig


def log_evaluation(r: EvalResult) -> None:
    """Log params, metrics, the summary, the defense config and the figure to the active MLflow run."""
    import matplotlib.pyplot as plt
    import mlflow

    from mlflow_project.lifecycle import tracking

    tracking.log_params(r.config.params())
    mlflow.log_metrics(r.metrics)
    mlflow.log_metrics({f"seconds_{k}": v for k, v in r.seconds.items()})
    for h in r.history:
        mlflow.log_metric("attack_transfer_size", h["transfer_size"], step=h["round"])
    for kind, curve in r.epoch_accuracy.items():
        for epoch, acc in enumerate(curve, start=1):
            mlflow.log_metric(f"attacker_epoch_accuracy_{kind}", acc, step=epoch)
    mlflow.log_dict(dict(r.config.defense), DEFENSE_ARTIFACT)
    if r.per_class:
        mlflow.log_dict({"classes": r.per_class}, "per_class.json")
    if r.config.monitor is not None:
        mlflow.log_dict(dict(r.config.monitor), "monitor.json")
    mlflow.log_text(summary_text(r), "summary.txt")
    fig = summary_figure(r)
    mlflow.log_figure(fig, "evaluation.png")
    plt.close(fig)
    mlflow.set_tags({"stealguard.kind": "evaluation", "stealguard.defense": r.config.defense.get("name", "")})


def parse_monitor_arg(value: str) -> dict[str, Any] | None:
    """``--monitor``: empty -> None; else inline JSON or a .json/.yaml file holding the monitor mapping."""
    if not value or not value.strip():
        return None
    return load_mapping(value, "monitor", '{"action": "harden", "harden": {"name": "label_only"}}')


def metrics_observer(port: int, cfg: EvalConfig) -> Callable[[str, dict], None]:
    """The ``--metrics-port`` hook: an observer (see :func:`evaluate`) that exposes the run's metrics with
    prometheus-client on 127.0.0.1:``port`` (:func:`mlflow_project.ops.metrics_exporter.evaluation_observer`)."""
    from mlflow_project.ops.metrics_exporter import evaluation_observer

    return evaluation_observer(port, cfg)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
    p.add_argument("--victim", required=True, help="export directory of train_victim, or an MLflow model URI")
    p.add_argument("--defense", default="identity",
                   help="inline JSON, a .json/.yaml config file, or a defense name (its defaults)")
    p.add_argument("--attack", default="knockoff", choices=ATTACKS)
    p.add_argument("--queryset", default="", choices=["", *data.QUERYSETS],
                   help="fashion_mnist, mnist5k, digits or handwriting (default: the dataset)")
    p.add_argument("--budget", type=integer, default=1000)
    p.add_argument("--epochs", type=integer, default=10, help="clone training epochs")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--misinformation", default="",
                   help="train_misinformation export directory (for adaptive_misinformation)")
    p.add_argument("--monitor", default="",
                   help="the per-client monitor: inline JSON or a .json/.yaml file (e.g. '{\"action\": \"harden\", "
                        "\"harden\": {\"name\": \"label_only\"}}'); empty: none")
    p.add_argument("--attacker-clients", type=integer, default=1, help="with --monitor: ids the thief splits over")
    p.add_argument("--benign-clients", type=integer, default=20, help="with --monitor: benign test-set clients")
    p.add_argument("--oracle", default="local", choices=ORACLES)
    p.add_argument("--url", default="", help="prediction URL for --oracle http")
    p.add_argument("--http-send", default="normalised", choices=["normalised", "pixels"])
    p.add_argument("--clone-arch", default="")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=integer, default=128)
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db")
    p.add_argument("--metrics-port", type=integer, default=0,
                   help="expose the run's Prometheus metrics on 127.0.0.1:PORT")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=integer, default=0,
                   help="torch threads (0: torch's default; 1 is fastest on a busy 2-core machine)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = EvalConfig(
        dataset=a.dataset, victim=a.victim, defense=parse_defense(a.defense), attack=a.attack, queryset=a.queryset,
        budget=a.budget, epochs=a.epochs, seed=a.seed, oracle=a.oracle, url=a.url, http_send=a.http_send,
        clone_arch=a.clone_arch, lr=a.lr, batch_size=a.batch_size, misinformation=a.misinformation,
        monitor=parse_monitor_arg(a.monitor), attacker_clients=a.attacker_clients, benign_clients=a.benign_clients,
    )
    observers = [metrics_observer(a.metrics_port, cfg)] if a.metrics_port else []

    from mlflow_project.lifecycle import tracking

    name = f"eval-{cfg.defense.get('name')}-{cfg.attack}-{cfg.queryset or cfg.dataset}-{cfg.budget}"
    with tracking.start_run(name, a.tracking_uri):
        result = evaluate(cfg, progress=not a.no_progress, observers=observers)
        log_evaluation(result)
    print(summary_text(result))
    return result.metrics


if __name__ == "__main__":
    main()
