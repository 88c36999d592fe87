"""Tables for RESULTS.md, computed from sweep CSVs (never typed by hand).

    python -m mlflow_project.sweep.report results/sweeps/quick-*/points.csv --plots-dir docs/results \
        --link-prefix docs/results/ --into RESULTS.md

For each sweep CSV: the undefended victim and attacker accuracies, and per defense the lowest strongest-attacker
accuracy (the better of the soft-label clone and its top-1 twin) reachable with a defender-accuracy drop of at
most 0.5, 1 and 5 points within the sweep's mean-L1 cap (``--max-l1``; default the sweep's own, 1.0 unless told:
:func:`select.attacker_accuracy_at_drops`; the undefended point counts for every defense; per point the mean over
its seeds). Then every point with its seeds: mean and min-max of the strongest,
soft and top-1 attackers' accuracies, benign utility (defender accuracy, mean L1, NLL, ECE) and whether its
difference from the undefended point and from label_only is outside the seed spread (the min-max ranges do
not overlap) or inside it, and its difference from label_only seed by seed on the seeds both share. A row is a
curve of the plots (:func:`plots.curve_name`): gradient redirection gets one row per target, e.g.
``gradient_redirection[reverse]``. With ``--plots-dir``, the sweep's two plots are copied there under names
that say which sweep they belong to.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from mlflow_project.sweep.plots import curve_name
from mlflow_project.sweep.run import aggregate, preferred_rows, read_points
from mlflow_project.sweep.select import (
    DEFAULT_MAX_L1,
    attacker_accuracy_at_drops,
    paired_note,
    strongest,
    within_caps,
)

DROPS = (0.5, 1.0, 5.0)
ORDER = ("identity", "mad", "mad_argmax", "reverse_sigmoid", "random_noise", "rounding", "top_k", "label_only",
         "adaptive_misinformation", "gradient_redirection", "ood_gated")


def _rank(defense: str) -> int:
    return ORDER.index(defense) if defense in ORDER else len(ORDER)


COMMITTED_SUFFIX = ".points.csv"  # a sweep's points.csv as committed under docs/results: <sweep>.points.csv


def sweep_name(csv_path: Path) -> str:
    """The sweep's name: its results folder, e.g. ``quick-fashion_mnist-knockoff-mnist5k-2000-1a2b3c4d``, or for a
    committed copy ``docs/results/<sweep>.points.csv`` the ``<sweep>`` part."""
    if csv_path.name.endswith(COMMITTED_SUFFIX):
        return csv_path.name[: -len(COMMITTED_SUFFIX)]
    return csv_path.parent.name


def selection_doc(csv_path: Path) -> dict:
    """The sweep's selection.json (caps and preset), or {} if there is none: beside its points.csv, or for a
    committed copy ``<sweep>.points.csv`` the ``<sweep>.selection.json`` beside it."""
    if csv_path.name.endswith(COMMITTED_SUFFIX):
        sel = csv_path.with_name(sweep_name(csv_path) + ".selection.json")
    else:
        sel = csv_path.parent / "selection.json"
    return json.loads(sel.read_text()) if sel.exists() else {}


def describe_sweep(csv_path: Path) -> dict:
    return selection_doc(csv_path).get("preset", {})


def table(csv_path: str | Path, drops: Sequence[float] = DROPS, max_l1: float | None = None) -> str:
    """The sweep's tables. ``max_l1``: the mean-L1 cap a point must respect to count in the drop columns and as
    the best point (default: the sweep's own cap from its selection.json, else the selection's default)."""
    csv_path = Path(csv_path)
    per_seed = preferred_rows(read_points(csv_path))
    if not per_seed:
        raise ValueError(f"{csv_path}: no points")
    points = [{**p, "curve": curve_name(p)} for p in aggregate(per_seed)]
    selection = selection_doc(csv_path)
    preset = selection.get("preset", {})
    if max_l1 is None:
        max_l1 = float(selection.get("max_l1", DEFAULT_MAX_L1))
    und = next((p for p in points if p["defense"] == "identity"), None)
    at = attacker_accuracy_at_drops(points, drops, by="curve", max_l1=max_l1)
    head = (f"**{preset.get('attack', '?')}** attacker, query set **{preset.get('queryset', '?')}**, "
            f"budget {preset.get('budget', '?')}, clone epochs {preset.get('epochs', '?')} "
            f"(sweep `{sweep_name(csv_path)}`, {len(points)} points)")
    lines = [head, ""]
    if und:
        lines.append(f"Undefended: victim {100 * und['victim_accuracy']:.1f}%, strongest attacker "
                     f"{100 * strongest(und):.1f}%.")
        lines.append("")
    cols = " | ".join(f"drop <= {d:g}" for d in drops)
    lines += [f"| defense | {cols} | best point within 1 point |", "|---" * (len(drops) + 2) + "|"]
    curves = {name: [p for p in points if p["curve"] == name] for name in at}
    for name in sorted(at, key=lambda n: _rank(curves[n][0]["defense"])):  # stable: grid order within a rank
        cells = " | ".join("n/a" if at[name][d] is None else f"{100 * at[name][d]:.1f}" for d in drops)
        mine = [p for p in curves[name] if within_caps(p, 1.0, max_l1)]
        best = min(mine, key=strongest)["label"] if mine else "(none within the caps: undefended)"
        lines.append(f"| {name} | {cells} | {best} |")
    lines.append("")
    lines.append("Strongest attacker's clone test accuracy in %, the lowest reachable with at most that drop in "
                 f"defender accuracy (points) and a mean L1 perturbation of at most {max_l1:g} on the test set "
                 "(a defense none of whose points fits reads as the undefended point).")
    lines += ["", seed_table(points, per_seed)]
    return "\n".join(lines)


def _range(p: dict, key: str) -> tuple[float, float]:
    lo, hi = p.get(f"{key}_min"), p.get(f"{key}_max")
    if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
        return lo, hi
    v = strongest(p) if key == "attacker_accuracy_strongest" else float(p.get(key, math.nan))
    return v, v


def _cell(p: dict, key: str) -> str:
    mean = strongest(p) if key == "attacker_accuracy_strongest" else p.get(key)
    if not isinstance(mean, float) or not math.isfinite(mean):
        return "-"
    lo, hi = _range(p, key)
    return f"{100 * mean:.1f}" + (f" [{100 * lo:.1f}-{100 * hi:.1f}]" if hi > lo else "")


def spread_note(p: dict, ref: dict | None, name: str) -> str:
    """Whether ``p``'s strongest-attacker accuracy differs from ``ref``'s beyond the seed spread."""
    if ref is None or ref is p:
        return ""
    multi, ref_multi = int(p.get("n_seeds", 1) or 1) > 1, int(ref.get("n_seeds", 1) or 1) > 1
    if not (multi or ref_multi):
        return f"vs {name}: 1 seed each, spread unknown"
    (lo, hi), (rlo, rhi) = _range(p, "attacker_accuracy_strongest"), _range(ref, "attacker_accuracy_strongest")
    diff = 100 * (strongest(p) - strongest(ref))
    inside = lo <= rhi and rlo <= hi  # a one-seed point's range is its value (as the selection compares)
    where = "the seed spread" if multi and ref_multi else f"{'its' if multi else name + chr(39) + 's'} seed spread"
    return f"vs {name}: {diff:+.1f} ({'inside' if inside else 'outside'} {where})"


def seed_table(points: Sequence[dict], per_seed: Sequence[dict] = ()) -> str:
    """Every point: attacker accuracies as mean [min-max] over its seeds, benign utility, spread notes, and with
    ``per_seed`` (the sweep's rows, one per point and seed) the difference from label_only paired by seed."""
    und = next((p for p in points if p["defense"] == "identity"), None)
    lab = next((p for p in points if p["defense"] == "label_only"), None)
    lines = ["| point | seeds | threads | strongest | soft | top-1 | defender (drop) | L1 | NLL | ECE | difference |",
             "|---" * 11 + "|"]
    for p in sorted(points, key=lambda q: _rank(q["defense"])):
        notes = "; ".join(n for n in (spread_note(p, und, "undefended"), spread_note(p, lab, "label_only"),
                                       paired_note(p, lab, per_seed, "label_only")) if n)

        def num(k: str, fmt: str = "{:.3f}", p: dict = p) -> str:
            v = p.get(k)
            return fmt.format(v) if isinstance(v, float) and math.isfinite(v) else "-"

        lines.append(f"| {p['label']} | {int(p.get('n_seeds', 1) or 1)} | {p.get('threads') or '-'} | "
                     f"{_cell(p, 'attacker_accuracy_strongest')} | "
                     f"{_cell(p, 'attacker_accuracy_soft')} | {_cell(p, 'attacker_accuracy_top1')} | "
                     f"{100 * p['defender_accuracy']:.1f} ({p['accuracy_drop_points']:+.1f}) | "
                     f"{num('perturbation_l1_mean', '{:.2f}')} | {num('defender_nll')} | {num('defender_ece')} | "
                     f"{notes} |")
    lines += ["", "Clone accuracies in %, mean over the point's seeds [min-max]; strongest = the better of the "
              "soft-label clone and its top-1 twin per seed. A difference is 'inside the seed spread' when the "
              "two min-max ranges overlap. 'Paired by seed': the difference seed by seed on the seeds both points "
              "share (same queries, same clone initialisation) at the same torch thread count, its mean, and a "
              "one-sided exact sign test of 'lower'. The selection counts a win over label_only outside the seed "
              "spread, or inside it when the sign test gives p <= 0.05 (5 of 5 paired seeds lower); anything "
              "else is noise (sweep/select.py). Threads: the "
              "torch thread counts the point's clones were trained at ('-': not recorded); a clone trained at "
              "another count is another sample, not the same clone."]
    return "\n".join(lines)


def across_table(csv_paths: Sequence[str | Path], defenses: Sequence[str]) -> str:
    """One row per point of ``defenses`` (plus the undefended and label-only points): its defender accuracy and
    drop, mean L1 and top-1 flip rate (measured on the test set, the same in every sweep of one victim), and
    the attacker accuracy in each sweep (one column per sweep: attack / query set / queries / clone epochs /
    seed)."""
    sweeps = []
    for c in csv_paths:
        path = Path(c)
        preset = describe_sweep(path)
        head = (f"{preset.get('attack', '?')} / {preset.get('queryset', '?')} / {preset.get('budget', '?')} q / "
                f"{preset.get('epochs', '?')} ep / seed {preset.get('seed', '?')}")
        sweeps.append((head, {p["label"]: p for p in aggregate(read_points(path))}))
    keep = ("identity", "label_only", *defenses)
    labels: list[str] = []
    for _, by_label in sweeps:
        for label, p in by_label.items():
            if p["defense"] in keep and label not in labels:
                labels.append(label)
    rank = {lab: i for i, lab in enumerate(labels)}
    first = {}
    for _, by_label in sweeps:
        for label, p in by_label.items():
            first.setdefault(label, p)
    labels.sort(key=lambda lab: (keep.index(first[lab]["defense"]), curve_name(first[lab]), rank[lab]))
    cols = " | ".join(f"attacker: {h}" for h, _ in sweeps)
    lines = [f"| point | defender accuracy (drop) | mean L1 | top-1 flips | {cols} |",
             "|---" * (4 + len(sweeps)) + "|"]
    for label in labels:
        p = first[label]
        cells = " | ".join(f"{100 * strongest(s[label]):.1f}" if label in s else "-" for _, s in sweeps)
        flips = p.get("top1_flip_rate")
        flips = f"{100 * flips:.1f}%" if isinstance(flips, float) and math.isfinite(flips) else "-"
        lines.append(f"| {label} | {100 * p['defender_accuracy']:.1f} ({p['accuracy_drop_points']:+.1f}) | "
                     f"{p['perturbation_l1_mean']:.2f} | {flips} | {cells} |")
    lines += ["", "Accuracies in %; drop in points (victim minus defender accuracy); '-': not in that sweep."]
    return "\n".join(lines)


def copy_plots(csv_path: Path, plots_dir: Path) -> list[Path]:
    plots_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("attacker_vs_defender_accuracy.png", "attacker_vs_l1.png", "attacker_soft_vs_l1.png",
                 "attacker_top1_vs_l1.png"):
        src = csv_path.parent / name
        if src.exists():
            dst = plots_dir / f"{sweep_name(csv_path).rsplit('-', 1)[0]}-{name}"
            shutil.copyfile(src, dst)
            out.append(dst)
    return out


BEGIN = "<!-- sweep_report:begin -->"
END = "<!-- sweep_report:end -->"


def fill_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the BEGIN and END markers of ``path`` with ``text``."""
    doc = path.read_text()
    i, j = doc.find(BEGIN), doc.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path}: needs the markers {BEGIN} and {END} (in that order) around the generated part")
    path.write_text(doc[: i + len(BEGIN)] + "\n" + text.strip() + "\n" + doc[j:])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.sweep.report", description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+", help="points.csv files written by mlflow_project.sweep.run")
    p.add_argument("--out", default="", help="write the markdown here (default: print it)")
    p.add_argument("--plots-dir", default="", help="copy each sweep's plots here")
    p.add_argument("--into", default="", help=f"replace the text between {BEGIN!r} and {END!r} in this file")
    p.add_argument("--link-prefix", default="", help="prefix of the plot links (e.g. docs/results/)")
    p.add_argument("--across", action="append", default=[], metavar="CSV[,CSV...]",
                   help="also write one table of every point of --across-defenses across these sweeps "
                   "(repeat for several tables)")
    p.add_argument("--across-defenses", default="mad,mad_argmax,adaptive_misinformation,gradient_redirection",
                   help="comma-separated defenses for the --across table")
    p.add_argument("--max-l1", type=float, default=None,
                   help="mean-L1 cap of the drop columns (default: each sweep's own, else "
                        f"{DEFAULT_MAX_L1:g})")
    a = p.parse_args(argv)
    parts = []
    names = [d for d in a.across_defenses.split(",") if d]
    for group in a.across:
        csvs = group.split(",")
        parts += ["Every point of " + ", ".join(f"`{n}`" for n in names) + " across the sweeps "
                  + ", ".join(f"`{sweep_name(Path(c))}`" for c in csvs) + ":", across_table(csvs, names), ""]
    for c in a.csv:
        path = Path(c)
        parts.append(table(path, max_l1=a.max_l1))
        if a.plots_dir:
            for dst in copy_plots(path, Path(a.plots_dir)):
                parts.append(f"![{dst.stem}]({a.link_prefix}{dst.name})")
        parts.append("")
    text = "\n\n".join(parts)
    if a.into:
        fill_between_markers(Path(a.into), text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
