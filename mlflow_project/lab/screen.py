"""Screen defense configs before sweeping them: what each costs benign users and how many of a Knockoff
attacker's answers it flips, without training a clone (seconds per config; a paper-protocol point is 30-60 min).

    python -m mlflow_project.lab.screen --queryset handwriting --gate-taus 0.5,0.58,0.7,0.9 \\
        --defense '{"name": "ood_gated", "tau": 0.58, "inside": {"name": "mad_argmax", "epsilon": 1},
                    "outside": {"name": "mad", "epsilon": 1}}' --defense label_only

Per config, on the victim's test set: the defender's accuracy and its drop (points), the mean L1 perturbation,
the share of benign answers whose top-1 moved, calibration; on the attacker's queries (Knockoff's draw for
``--seed``, exactly the rows a sweep point at that seed asks): the share of answers whose top-1 moved and their
mean L1; and whether the config is within the selection's caps (``--max-drop``, ``--max-l1``).

Why the attacker-side flip rate is the figure to screen on: a defense that keeps the top-1 of every answer hands
the top-1 attacker exactly label_only's labels, so its top-1 twin is label_only's clone (same queries, same
initialisation) and its strongest attacker is at least label_only's on every seed: it cannot pass the
selection, whatever its soft clone does (RESULTS.md, "Paper protocol on the session-7 victim"). The row says so
(``bound``). Only flips move the top-1 clone, and the benign drop is what they cost where the test set has rows
the defense flips.

``--gate-taus``: for the max-probability gate (adaptive_misinformation's and ood_gated's, ``max p < tau``), the
share of test rows, of correctly answered test rows and of the attacker's queries it fires on. The correct
share bounds the drop of any composition that flips every gated row (MAD at l1 1 does, on this victim).

``--gate-fractions 0.005,0.01,0.02``: per gate score (ood_gated's ``max_prob`` and ``gaussian``), the tau that
takes that share of the test set and the share of the attacker's queries it takes there (:func:`score_rates`):
which score separates the thief's queries from benign traffic on this victim.

:func:`calibrate_tau`: the largest tau at which an (inside, outside) pair stays within a benign drop (the sweep's
``--ood-gated-max-drop``), for the max-probability gate or, given :func:`fit_gaussian`'s statistics, the Gaussian
score's (plugins.ood.PosteriorGaussian; ``--fit-gaussian PATH`` writes them, an ood_gated config's ``gaussian``).

The victim is the paper preset's unless ``--victim`` names one; defenses that need a misinformation model get
the sweep's (trained once and cached beside the victim).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_project.cli import integer
from mlflow_project.lab import data
from mlflow_project.lab.attacks import AttackConfig, knockoff_queries
from mlflow_project.lab.evaluate import defender_metrics, parse_defense
from mlflow_project.lab.oracles import build_victim_defense
from mlflow_project.lab.training import predict_probs
from plugins.measures import measures
from plugins.ood import PosteriorGaussian, fit_posterior_gaussian, in_distribution_score


def gate_rates(probs_test: torch.Tensor, test_y: torch.Tensor, probs_queries: torch.Tensor,
               taus: Sequence[float]) -> list[dict[str, float]]:
    """Per tau: the shares of test rows, correctly answered test rows (of all test rows) and attacker queries
    whose undefended max probability is below tau."""
    out = []
    conf_t, conf_q = probs_test.max(1).values, probs_queries.max(1).values
    correct = probs_test.argmax(1) == test_y
    for tau in taus:
        gated = conf_t < tau
        out.append({"tau": float(tau), "test": gated.double().mean().item(),
                    "test_correct": (gated & correct).double().mean().item(),
                    "queries": (conf_q < tau).double().mean().item()})
    return out


def score_rates(scores_test: torch.Tensor, test_correct: torch.Tensor, scores_queries: torch.Tensor,
                fractions: Sequence[float]) -> list[dict[str, float]]:
    """Per share f of the test set: the tau at which the gate ``score < tau`` takes f of the test rows (the
    f-quantile of the test scores), and the shares of test rows, correctly answered test rows (of all test rows)
    and attacker queries it takes there: how well a gate score tells the thief's queries from benign traffic."""
    out = []
    for f in fractions:
        tau = torch.quantile(scores_test.double(), float(f)).item()
        gated, asked = scores_test < tau, scores_queries < tau
        out.append({"fraction": float(f), "tau": tau, "test": gated.double().mean().item(),
                    "test_correct": (gated & test_correct).double().mean().item(),
                    "queries": asked.double().mean().item()})
    return out


def victim_test_set(victim) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The victim's test set as it sees it (adapted inputs), its labels and the victim's probabilities on it."""
    test_x, test_y = data.load_raw(victim.spec.dataset, "test")
    test_x = data.adapt(test_x, victim.spec)
    return test_x, test_y, predict_probs(victim.model, test_x)


# The taus calibrate_tau considers: 0.1 to 0.995 in steps of 0.005. A 10-class victim's top probability is at least
# 0.1, so below it the gate takes no row, and at 1 it takes every row. The low end matters for a less confident
# victim: on the demo's 2-epoch one (89.48 %) even tau 0.5 gates 1.67 % of the test set's correct rows, tau 0.45
# 0.83 %, and the largest tau within a 0.9-point drop is under 0.5 (measured 2026-12-07, lab.screen).
CALIBRATION_TAUS = tuple(round(0.1 + 0.005 * i, 3) for i in range(180))
# The Gaussian score's typicality is a chi-square tail probability: an in-distribution row is rarely below 1e-3
# and an out-of-distribution one can be below 1e-30, so its taus are log-spaced, 10^-0.3 (0.501) down to 1e-15
# (20 per decade).
GAUSSIAN_CALIBRATION_TAUS = tuple(float(f"{10 ** (-e / 20):.3g}") for e in range(6, 301))


def fit_gaussian(victim) -> PosteriorGaussian:
    """The Gaussian score's statistics (plugins.ood.fit_posterior_gaussian) on the victim's posteriors over its
    own training set, each row's class its top-1 (what a deployment can recompute from the model alone)."""
    train_x, _ = data.load_raw(victim.spec.dataset, "train")
    return fit_posterior_gaussian(predict_probs(victim.model, data.adapt(train_x, victim.spec)))


def gate_fields(gaussian: PosteriorGaussian | None) -> dict[str, Any]:
    """The ood_gated config fields that select the gate's score: none for max_prob (the default)."""
    return {} if gaussian is None else {"score": "gaussian", "gaussian": gaussian.model_dump()}


def calibrate_tau(victim, inside: Mapping[str, Any], outside: Mapping[str, Any], max_drop: float,
                  surrogate_seed: int = 0, misinformation: Path | None = None,
                  taus: Sequence[float] | None = None, gaussian: PosteriorGaussian | None = None) -> dict[str, Any]:
    """The largest tau of ``taus`` at which ``ood_gated(tau, inside, outside)`` (hard gate) costs at most
    ``max_drop`` points of top-1 accuracy on the victim's test set: ``{"tau", "drop", "gated"}`` (drop in points,
    gated the share of test rows under the gate). The gate's score is the maximum probability, or with
    ``gaussian`` the Gaussian typicality; ``taus`` default to :data:`CALIBRATION_TAUS` and
    :data:`GAUSSIAN_CALIBRATION_TAUS` respectively.

    Both inner defenses answer every test row once and each tau is a row-wise choice between the two answers
    (the hard gate's: ``s < tau`` gets ``outside``); the tau found is then checked with the real ood_gated
    defense, and the next lower one taken until that check holds too (an inner defense whose answer depends on
    its batch, such as random_noise, can differ between the two). The drop is calibrated on the test set it is
    measured on, so the sweep meets it by construction: calibrate a deployment's tau on its own benign traffic.
    Raises ValueError when no tau of ``taus`` is within ``max_drop``."""
    from mlflow_project.sweep.select import accuracy_drop_points

    if taus is None:
        taus = CALIBRATION_TAUS if gaussian is None else GAUSSIAN_CALIBRATION_TAUS
    spec = victim.spec
    test_x, test_y, probs = victim_test_set(victim)
    answers = [build_victim_defense(victim.model, dict(c), spec.num_classes, surrogate_seed=surrogate_seed,
                                    misinformation=misinformation)(probs, test_x).probs for c in (inside, outside)]
    top1_in, top1_out = (a.argmax(1) == test_y for a in answers)
    conf = probs.max(1).values if gaussian is None else in_distribution_score(probs, gaussian)
    victim_acc = (probs.argmax(1) == test_y).double().mean().item()
    for tau in sorted(taus, reverse=True):
        gated = conf < tau
        if 100 * (victim_acc - torch.where(gated, top1_out, top1_in).double().mean().item()) > max_drop:
            continue
        config = {"name": "ood_gated", "tau": float(tau), "inside": dict(inside), "outside": dict(outside),
                  **gate_fields(gaussian)}
        defense = build_victim_defense(victim.model, config, spec.num_classes, surrogate_seed=surrogate_seed,
                                       misinformation=misinformation)
        metrics, _ = defender_metrics(probs, defense(probs, test_x).probs, test_y)
        drop = accuracy_drop_points(metrics)
        if drop <= max_drop:
            return {"tau": float(tau), "drop": drop, "gated": gated.double().mean().item()}
    raise ValueError(f"ood_gated_max_drop: no tau in [{min(taus)}, {max(taus)}] keeps ood_gated(inside="
                     f"{dict(inside)}, outside={dict(outside)}) within {max_drop} points on {spec.dataset}'s test "
                     f"set; allow a larger drop or choose other inner defenses")


def screen_config(victim, config: Mapping[str, Any], test_x: torch.Tensor, test_y: torch.Tensor,
                  probs_test: torch.Tensor, queries: torch.Tensor, probs_queries: torch.Tensor,
                  max_drop: float, max_l1: float, misinformation: Path | None = None) -> dict[str, Any]:
    from mlflow_project.sweep.presets import describe
    from mlflow_project.sweep.select import accuracy_drop_points, within_caps

    defense = build_victim_defense(victim.model, config, victim.spec.num_classes, misinformation=misinformation)
    tilde = defense(probs_test, test_x).probs
    metrics, _ = defender_metrics(probs_test, tilde, test_y)
    asked = measures(probs_queries, defense(probs_queries, queries).probs)
    query_flips = asked["top1_flip"].mean().item()
    row = {"label": describe(dict(config)), "defense_config": json.dumps(dict(config), sort_keys=True), **metrics,
           "accuracy_drop_points": accuracy_drop_points(metrics),
           "query_top1_flip_rate": query_flips,
           "query_l1_mean": asked["l1"].mean().item(),
           "queries": len(queries)}
    row["within_caps"] = within_caps(row, max_drop, max_l1)
    row["bound"] = "strongest >= label_only (no query flips)" if query_flips == 0.0 else ""
    return row


def screen(victim, configs: Sequence[Mapping[str, Any]], queryset: str, budget: int, seed: int,
           taus: Sequence[float] = (), max_drop: float = 1.0, max_l1: float = 1.0,
           misinformation: Path | None = None, fractions: Sequence[float] = ()) -> dict[str, Any]:
    """Screen ``configs`` on ``victim``: {"rows": one per config, "gate": gate_rates, "scores": per gate score
    (max_prob, gaussian) its :func:`score_rates` at the test-set shares ``fractions``, "queries": n}."""
    spec = victim.spec
    test_x, test_y, probs_test = victim_test_set(victim)
    pool = data.query_set(queryset, spec, victim_dataset=spec.dataset)
    queries = knockoff_queries(pool, AttackConfig(name="knockoff", budget=budget, seed=seed))
    probs_queries = predict_probs(victim.model, queries)
    rows = [screen_config(victim, c, test_x, test_y, probs_test, queries, probs_queries, max_drop, max_l1,
                          misinformation) for c in configs]
    scores: dict[str, list[dict[str, float]]] = {}
    if fractions:
        gaussian = fit_gaussian(victim)
        correct = probs_test.argmax(1) == test_y
        for name, stats in (("max_prob", None), ("gaussian", gaussian)):
            scores[name] = score_rates(in_distribution_score(probs_test, stats), correct,
                                       in_distribution_score(probs_queries, stats), fractions)
    return {"rows": rows, "gate": gate_rates(probs_test, test_y, probs_queries, taus), "scores": scores,
            "queries": len(queries), "victim_accuracy": (probs_test.argmax(1) == test_y).double().mean().item()}


def table(result: Mapping[str, Any]) -> str:
    lines = []
    if result["gate"]:
        lines += ["gate max p < tau fires on:   tau     test  test, correct  attacker queries"]
        lines += [f"{'':29s}{g['tau']:5.3g}  {100 * g['test']:6.2f}%  {100 * g['test_correct']:12.2f}%  "
                  f"{100 * g['queries']:15.2f}%" for g in result["gate"]]
        lines.append("")
    for name, rates in result.get("scores", {}).items():
        lines += [f"gate score {name} < tau takes:  test share  tau        test, correct  attacker queries"]
        lines += [f"{'':31s}{100 * g['fraction']:8.2f}%  {g['tau']:9.3g}  {100 * g['test_correct']:12.2f}%  "
                  f"{100 * g['queries']:15.2f}%" for g in rates]
        lines.append("")
    lines.append(f"victim accuracy {100 * result['victim_accuracy']:.2f}%, {result['queries']} attacker queries")
    head = f"{'defense':70s} {'drop':>6s} {'L1':>6s} {'flips':>7s} {'q flips':>8s} {'q L1':>6s} {'NLL':>6s}  caps"
    lines.append(head)
    for r in result["rows"]:
        lines.append(f"{r['label'][:70]:70s} {r['accuracy_drop_points']:6.2f} {r['perturbation_l1_mean']:6.3f} "
                     f"{100 * r['top1_flip_rate']:6.2f}% {100 * r['query_top1_flip_rate']:7.2f}% "
                     f"{r['query_l1_mean']:6.3f} {r['defender_nll']:6.3f}  "
                     f"{'within' if r['within_caps'] else 'outside'}{'; ' + r['bound'] if r['bound'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mlflow_project.sweep.presets import get_preset, parse_grid
    from mlflow_project.sweep.run import needs_misinformation, resolve_misinformation, resolve_victim

    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.screen", description=__doc__.split("\n")[0])
    p.add_argument("--victim", default="", help="export directory or model URI (default: the paper preset's victim)")
    p.add_argument("--defense", action="append", default=[],
                   help="a defense config (inline JSON, a .json/.yaml file or a bare name); repeat for more")
    p.add_argument("--queryset", default="handwriting", help=f"the attacker's pool, of {', '.join(data.QUERYSETS)}")
    p.add_argument("--budget", type=integer, default=0, help="attacker queries (default: the paper preset's)")
    p.add_argument("--seed", type=integer, default=0, help="the Knockoff draw (a sweep point's seed)")
    p.add_argument("--gate-taus", default="", help="comma-separated taus of the max-probability gate to report")
    p.add_argument("--max-drop", type=float, default=1.0, help="the selection's cap on the drop, points")
    p.add_argument("--max-l1", type=float, default=1.0, help="the selection's cap on the mean L1")
    p.add_argument("--out", default="", help="also write the result as JSON to this path")
    p.add_argument("--gate-fractions", default="",
                   help="comma-separated shares of the test set (e.g. 0.005,0.01,0.02): per gate score (max_prob, "
                        "gaussian) the tau that gates that share and the share of attacker queries it takes")
    p.add_argument("--fit-gaussian", default="", metavar="PATH",
                   help="write the Gaussian gate's statistics fitted on the victim's training posteriors to PATH "
                        "(JSON: an ood_gated config's 'gaussian', with score 'gaussian')")
    a = p.parse_args(argv)
    data.check_queryset(a.queryset)
    taus = parse_grid("gate-taus", a.gate_taus)
    fractions = parse_grid("gate-fractions", a.gate_fractions)
    if any(not 0 < f < 1 for f in fractions):
        p.error(f"--gate-fractions: each share must be in (0, 1); got {list(fractions)}")
    configs = [parse_defense(d) for d in a.defense]
    if not configs and not taus and not fractions and not a.fit_gaussian:
        p.error("nothing to screen: give --defense (repeatable), --gate-taus, --gate-fractions and/or --fit-gaussian")
    preset = get_preset("paper")
    victim, path = resolve_victim(preset, a.victim, progress=False)
    if a.fit_gaussian:
        Path(a.fit_gaussian).write_text(json.dumps(fit_gaussian(victim).model_dump()) + "\n")
        print(f"the Gaussian gate's statistics on {path}'s training posteriors: {a.fit_gaussian}")
        if not configs and not taus and not fractions:
            return {"gaussian": a.fit_gaussian}
    misinformation = None
    if any(needs_misinformation(c) for c in configs):
        misinformation = resolve_misinformation(preset, victim, str(path), progress=False)
    result = screen(victim, configs, a.queryset, a.budget or preset.budget, a.seed, taus, a.max_drop, a.max_l1,
                    misinformation, fractions)
    print(table(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
