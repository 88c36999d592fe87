"""The sweep's speed, side by side in one run: (a) shared query work on vs off, (b) the Ray executor with 2
points in parallel x 1 thread vs the local executor with 2 threads.

    .venv/bin/python bench/bench_sweep.py [--preset quick] [--points 11] [--budget 0] [--epochs 0] [--parts ab]

(a) runs the preset's Knockoff sweep twice with the local executor (``--threads``, default 1), once with
``share_queries`` (the victim's and surrogate's outputs computed once per seed, mlflow_project.sweep.shared) and
once without, each into its own fresh SQLite store (nothing reused), and prints the wall-time ratio (target
>= 1.3x). (b) runs the same sweep (shared work on) with the local executor at 2 torch threads and with the ray
executor on a private 2-CPU Ray head (tests/support/ray_cluster.py) at ``cpus_per_point=1``, and prints that
ratio. ``--points`` keeps the first N grid points (a reduced grid on a loaded machine); ``--budget`` /
``--epochs`` override the preset's. The victim is the lab's (trained once and cached, see sweep.resolve_victim;
``--victim-epochs`` for a quicker one). Prints the 1-minute load average before and after. Not a test: nothing
here asserts; it prints what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mlflow_project.sweep import run as sw  # noqa: E402
from mlflow_project.sweep.presets import defense_grid, get_preset  # noqa: E402


def timed_sweep(preset, grid, victim: str, root: Path, name: str, **kw) -> tuple[float, sw.SweepResult]:
    t0 = time.perf_counter()
    result = sw.run_sweep(preset, victim=victim, tracking_uri=f"sqlite:///{(root / name / 'mlflow.db').resolve()}",
                          results_dir=root / name / "out", progress=False, grid=grid, **kw)
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--points", type=int, default=0, help="keep the first N grid points (0: all)")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--victim-epochs", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="(a)'s torch threads")
    p.add_argument("--parts", default="ab")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("budget", a.budget), ("epochs", a.epochs), ("victim_epochs", a.victim_epochs))
                 if v}
    preset = get_preset(a.preset, **overrides)
    vict, victim = sw.resolve_victim(preset, progress=False)
    gaussian = sw.fit_ood_gaussian(preset, vict)
    calibrated = sw.calibrate_ood_gated(preset, vict, victim, False, gaussian) \
        if preset.ood_gated_max_drop > 0 else None
    grid = defense_grid(preset, calibrated, gaussian)[: a.points or None]
    print(f"preset {preset.name}: {preset.dataset} {preset.attack} on {preset.queryset}, budget {preset.budget}, "
          f"clone epochs {preset.epochs}, {len(grid)} points; victim {victim}")
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_sweep") as tmp:
        root = Path(tmp)
        if "a" in a.parts:
            torch.set_num_threads(a.threads)
            off, r_off = timed_sweep(preset, grid, victim, root, "unshared", share_queries=False)
            on, r_on = timed_sweep(preset, grid, victim, root, "shared", share_queries=True)
            same = all(x["attacker_accuracy_soft"] == y["attacker_accuracy_soft"]
                       and x["perturbation_l1_mean"] == y["perturbation_l1_mean"]
                       for x, y in zip(r_off.points, r_on.points, strict=True))
            print(f"(a) {a.threads} thread(s): without shared query work {off:.1f}s, with {on:.1f}s: "
                  f"{off / on:.2f}x (target >= 1.3x); per point {off / len(grid):.1f}s vs {on / len(grid):.1f}s; "
                  f"same metrics: {same}")
        if "b" in a.parts:
            from tests.support.ray_cluster import RayHead

            torch.set_num_threads(2)
            local, _ = timed_sweep(preset, grid, victim, root, "local2")
            with RayHead(num_cpus=2) as head:
                os.environ.update(head.client_env)  # the head's token (tests/support/ray_cluster.py)
                ray_s, _ = timed_sweep(preset, grid, victim, root, "ray2x1", executor="ray",
                                       ray_address=head.address, cpus_per_point=1)
            print(f"(b) local executor, 2 threads: {local:.1f}s; ray executor, 2 points x 1 thread: {ray_s:.1f}s: "
                  f"{local / ray_s:.2f}x")
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
