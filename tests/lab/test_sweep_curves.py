"""Sweep tables and plots split gradient redirection by target and order adaptive misinformation by tau, from
synthetic points.csv files (the current columns, and an older CSV without the tau and target columns)."""

from __future__ import annotations

import csv
import json

import pytest

from mlflow_project.sweep import plots as sweep_plots
from mlflow_project.sweep import report as sweep_report
from mlflow_project.sweep.run import CSV_COLUMNS, read_points

VICTIM = 0.90


def point(config: dict, defender: float, attacker: float, l1: float) -> dict:
    from mlflow_project.sweep.presets import describe

    row = {"label": describe(config), "defense": config["name"], "defense_config": json.dumps(config, sort_keys=True),
           "victim_accuracy": VICTIM, "defender_accuracy": defender, "attacker_accuracy": attacker,
           "perturbation_l1_mean": l1, "accuracy_drop_points": 100 * (VICTIM - defender), "status": "new",
           "point_key": describe(config), "run_id": describe(config)}
    for key in ("epsilon", "beta", "gamma", "decimals", "norm", "tau", "target"):
        row[key] = config.get(key, "")
    return row


POINTS = [
    point({"name": "identity"}, 0.90, 0.80, 0.0),
    point({"name": "gradient_redirection", "epsilon": 0.5, "target": "reverse"}, 0.897, 0.60, 0.5),
    point({"name": "gradient_redirection", "epsilon": 0.5, "target": "shift"}, 0.899, 0.70, 0.5),
    point({"name": "gradient_redirection", "epsilon": 1.0, "target": "reverse"}, 0.80, 0.20, 1.0),
    point({"name": "gradient_redirection", "epsilon": 1.0, "target": "shift"}, 0.895, 0.50, 1.0),
    # taus out of order: the curve must be drawn along tau, not in CSV order
    point({"name": "adaptive_misinformation", "tau": 0.9}, 0.70, 0.30, 0.9),
    point({"name": "adaptive_misinformation", "tau": 0.5}, 0.899, 0.75, 0.1),
    point({"name": "adaptive_misinformation", "tau": 0.7}, 0.85, 0.55, 0.4),
    point({"name": "mad", "epsilon": 0.5, "norm": "l1"}, 0.898, 0.65, 0.5),
    point({"name": "label_only"}, 0.90, 0.78, 0.6),
]


def write_csv(path, rows, columns=CSV_COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


@pytest.fixture(params=["current", "without_tau_and_target"])
def points_csv(request, tmp_path):
    columns = CSV_COLUMNS if request.param == "current" else [c for c in CSV_COLUMNS if c not in ("tau", "target")]
    return write_csv(tmp_path / "s-1234abcd" / "points.csv", POINTS, columns)


def rows_of(text: str) -> dict[str, list[str]]:
    """The rows of the report's first table (per defense; the per-point seed table follows it)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] == "point":
            break
        if line.startswith("| ") and cells[0] not in ("defense",):
            out[cells[0]] = cells[1:]
    return out


def test_curve_names_split_gradient_redirection_by_target_from_column_or_config(points_csv):
    names = [sweep_plots.curve_name(p) for p in read_points(points_csv)]
    assert names[:5] == ["identity", "gradient_redirection[reverse]", "gradient_redirection[shift]",
                         "gradient_redirection[reverse]", "gradient_redirection[shift]"]
    assert names[5:] == ["adaptive_misinformation"] * 3 + ["mad", "label_only"]
    assert [sweep_plots.curve_value(p) for p in read_points(points_csv)][5:8] == [0.9, 0.5, 0.7]


def test_report_has_one_row_per_gradient_redirection_target_in_order(points_csv):
    text = sweep_report.table(points_csv)
    rows = rows_of(text)
    assert "gradient_redirection" not in rows  # never the merged curve
    # reverse: 0.5 -> drop 0.3 (attacker 60%); 1.0 -> drop 10 (20%). shift: drops 0.1 and 0.5 (70%, 50%)
    assert rows["gradient_redirection[reverse]"] == ["60.0", "60.0", "60.0", "gradient_redirection(epsilon=0.5, "
                                                                              "target=reverse)"]
    assert rows["gradient_redirection[shift]"] == ["50.0", "50.0", "50.0", "gradient_redirection(epsilon=1, "
                                                                          "target=shift)"]
    # adaptive misinformation: tau 0.5 drop 0.1 (75%), tau 0.7 drop 5 (55%), tau 0.9 drop 20
    assert rows["adaptive_misinformation"] == ["75.0", "75.0", "55.0", "adaptive_misinformation(tau=0.5)"]
    order = list(rows)
    assert order == ["identity", "mad", "label_only", "adaptive_misinformation", "gradient_redirection[reverse]",
                     "gradient_redirection[shift]"]


def test_report_puts_unknown_defenses_last(tmp_path):
    extra = point({"name": "third_party", "epsilon": 0.1}, 0.90, 0.79, 0.1)
    csv_path = write_csv(tmp_path / "s-0000" / "points.csv", [extra, *POINTS])
    assert list(rows_of(sweep_report.table(csv_path)))[-1] == "third_party"


def test_plots_draw_one_curve_per_target_and_am_along_tau(points_csv, tmp_path, monkeypatch):
    figures = []
    close = sweep_plots.plt.close
    monkeypatch.setattr(sweep_plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    points = read_points(points_csv)
    names = {}
    for x, file in (("defender_accuracy", "attacker_vs_defender_accuracy.png"),
                    ("perturbation_l1_mean", "attacker_vs_l1.png")):
        out = sweep_plots.plot_tradeoff(points, x, tmp_path / file)
        assert out.is_file() and out.stat().st_size > 0
        lines = {line.get_label(): line for line in figures[-1].axes[0].get_lines()}
        names[x] = lines
        assert "gradient_redirection" not in lines
        for target, eps_attacker in (("reverse", [60.0, 20.0]), ("shift", [70.0, 50.0])):
            assert list(lines[f"gradient_redirection[{target}]"].get_ydata()) == pytest.approx(eps_attacker)
        # along tau 0.5, 0.7, 0.9 whatever the CSV order
        assert list(lines["adaptive_misinformation"].get_ydata()) == pytest.approx([75.0, 55.0, 30.0])
    assert list(names["perturbation_l1_mean"]["adaptive_misinformation"].get_xdata()) == pytest.approx([0.1, 0.4, 0.9])
    assert names["defender_accuracy"]["gradient_redirection[reverse]"].get_color() != \
        names["defender_accuracy"]["gradient_redirection[shift]"].get_color()


def test_across_table_lines_up_each_point_over_the_sweeps(tmp_path):
    ood = [{**p, "attacker_accuracy": p["attacker_accuracy"] / 4} for p in POINTS if p["defense"] != "mad"]
    a = write_csv(tmp_path / "in-aaaa" / "points.csv", POINTS)
    b = write_csv(tmp_path / "ood-bbbb" / "points.csv", ood)
    for path, queryset in ((a, "fashion_mnist"), (b, "mnist5k")):
        (path.parent / "selection.json").write_text(json.dumps(
            {"preset": {"attack": "knockoff", "queryset": queryset, "budget": 2000, "epochs": 4, "seed": 0}}))
    text = sweep_report.across_table([a, b], ["mad", "adaptive_misinformation", "gradient_redirection"])
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0].endswith("| attacker: knockoff / fashion_mnist / 2000 q / 4 ep / seed 0 "
                             "| attacker: knockoff / mnist5k / 2000 q / 4 ep / seed 0 |")
    body = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ") for ln in lines[1:]}
    assert list(body)[:3] == ["identity", "label_only", "mad(epsilon=0.5)"]
    assert body["mad(epsilon=0.5)"][1:] == ["89.8 (+0.2)", "0.50", "-", "65.0", "-"]  # no flip rate in these rows
    assert body["adaptive_misinformation(tau=0.9)"][-2:] == ["30.0", "7.5"]
    gr = [k for k in body if k.startswith("gradient_redirection")]  # grouped by target, in grid order within
    assert gr == [f"gradient_redirection(epsilon={e}, target={t})" for t in ("reverse", "shift") for e in (0.5, 1)]
    assert "reverse_sigmoid" not in text


def test_the_cli_writes_one_across_table_per_flag(tmp_path, capsys):
    a = write_csv(tmp_path / "in-aaaa" / "points.csv", POINTS)
    b = write_csv(tmp_path / "in-bbbb" / "points.csv", POINTS)
    text = sweep_report.main([str(a), "--across", f"{a},{b}", "--across", str(b),
                              "--across-defenses", "adaptive_misinformation"])
    assert text.count("| point | defender accuracy (drop) |") == 2
    assert "`in-aaaa`, `in-bbbb`:" in text and "across the sweeps `in-bbbb`:" in text
    assert "gradient_redirection(" not in text.split("**")[0]  # only the asked defenses in the across tables


def test_the_seed_table_pairs_each_point_with_label_only_seed_by_seed(tmp_path):
    """mad is lower than label_only on every seed (paired), yet the two min-max ranges overlap: the range rule
    still says 'inside the seed spread' and the paired note gives the per-seed differences; a one-seed point
    shares one seed with label_only and gets no paired note."""
    mad = {"name": "mad", "epsilon": 0.7, "norm": "l1"}

    def at(config, defender, attacker, l1, seed):
        return {**point(config, defender, attacker, l1), "attacker_accuracy_strongest": attacker, "seed": seed}

    rows = []
    for seed, (lab, m) in enumerate(((0.70, 0.68), (0.80, 0.795), (0.75, 0.744))):
        rows += [at({"name": "label_only"}, 0.90, lab, 0.6, seed), at(mad, 0.897, m, 0.7, seed)]
    rows.append(at({"name": "identity"}, 0.90, 0.82, 0.0, 0))
    csv_path = write_csv(tmp_path / "s-5678" / "points.csv", rows)
    seed_rows = {ln.split(" | ")[0][2:]: ln for ln in sweep_report.table(csv_path).splitlines()
                 if ln.startswith("| ") and " | 3 | " in ln or ln.startswith("| identity | 1 |")}
    mad_row = seed_rows["mad(epsilon=0.7)"]
    assert "vs label_only: -1.0 (inside the seed spread)" in mad_row
    assert ("paired by seed vs label_only: -1.0 (-2.0 / -0.5 / -0.6 on seeds 0,1,2; lower on 3 of 3, "
            "sign test p = 0.125)") in mad_row
    assert "paired" not in seed_rows["identity"] and "paired" not in seed_rows["label_only"]


def test_the_seed_table_says_when_the_paired_sign_test_counts_a_win_inside_the_spread(tmp_path):
    """Lower than label_only on 5 of 5 paired seeds while the ranges overlap (session 13's case): the range note
    says 'inside', and the paired note says the sign test counts it, as the selection does; 4 of 5 does not."""
    mad = {"name": "mad", "epsilon": 0.7, "norm": "l1"}

    def at(config, attacker, seed, defender=0.897):
        return {**point(config, defender, attacker, 0.7), "attacker_accuracy_strongest": attacker, "seed": seed}

    def mad_row(sweep, mine):
        lab = (0.438, 0.374, 0.433, 0.407, 0.419)
        rows = [at({"name": "label_only"}, a, s, 0.90) for s, a in enumerate(lab)]
        rows += [at(mad, a, s) for s, a in enumerate(mine)] + [at({"name": "identity"}, 0.55, 0, 0.90)]
        path = write_csv(tmp_path / sweep / "points.csv", rows)
        return next(ln for ln in sweep_report.table(path).splitlines() if ln.startswith("| mad(epsilon=0.7) | 5 |"))

    row = mad_row("s-0005", (0.380, 0.352, 0.345, 0.315, 0.340))
    assert "vs label_only: -6.8 (inside the seed spread)" in row
    assert "lower on 5 of 5, sign test p = 0.0312 <= 0.05: a win beyond noise)" in row
    row = mad_row("s-0004", (0.380, 0.380, 0.345, 0.315, 0.340))  # seed 1 above label_only's 37.4: 4 of 5, p = 0.1875
    assert "lower on 4 of 5, sign test p = 0.188)" in row and "beyond noise" not in row
