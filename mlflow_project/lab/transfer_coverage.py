"""What a query set elicits from a victim: per class, the share of the pool the victim answers with that top-1
label, the answers' label entropy and mean confidence. A clone cannot learn a class its queries never elicit,
so this is the first thing to look at when one transfer set makes a worse clone than another (RESULTS.md,
"Paper protocol": the handwriting set, the EMNIST stand-in, against real MNIST digits and Fashion-MNIST itself).

    python -m mlflow_project.lab.transfer_coverage --querysets handwriting,mnist5k,fashion_mnist

Inference only (seconds); the victim is the paper preset's unless ``--victim`` names one.
"""

from __future__ import annotations

import argparse
from typing import Any

from mlflow_project.lab import data
from mlflow_project.lab.evaluate import answer_statistics, label_shares
from mlflow_project.lab.training import predict_probs


def coverage(victim, querysets: list[str]) -> dict[str, dict[str, Any]]:
    """Per query set: its size, each class's share of the victim's top-1 answers, and answer_statistics."""
    out = {}
    for name in querysets:
        pool = data.query_set(name, victim.spec, victim_dataset=victim.spec.dataset)
        probs = predict_probs(victim.model, pool)
        out[name] = {"size": len(pool), "share": label_shares(probs).tolist(), **answer_statistics(probs)}
    return out


def table(result: dict[str, dict[str, Any]], classes: tuple[str, ...]) -> str:
    names = list(result)
    lines = [f"{'class':14s}" + "".join(f"{n:>15s}" for n in names)]
    for c, label in enumerate(classes):
        lines.append(f"{label:14s}" + "".join(f"{100 * result[n]['share'][c]:14.1f}%" for n in names))
    lines.append(f"{'size':14s}" + "".join(f"{result[n]['size']:15d}" for n in names))
    lines.append(f"{'entropy, bits':14s}" + "".join(f"{result[n]['query_label_entropy']:15.2f}" for n in names))
    lines.append(f"{'confidence':14s}" + "".join(f"{result[n]['query_confidence_mean']:15.3f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    from mlflow_project.sweep.presets import get_preset
    from mlflow_project.sweep.run import resolve_victim

    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.transfer_coverage",
                                description=__doc__.split("\n")[0])
    p.add_argument("--victim", default="", help="export directory or model URI (default: the paper preset's victim)")
    p.add_argument("--querysets", default="handwriting,mnist5k",
                   help=f"comma-separated, of {', '.join(data.QUERYSETS)}")
    a = p.parse_args(argv)
    names = [q.strip() for q in a.querysets.split(",") if q.strip()]
    for q in names:
        data.check_queryset(q)
    victim, _ = resolve_victim(get_preset("paper"), a.victim, progress=False)
    result = coverage(victim, names)
    print(table(result, victim.spec.classes))
    return result


if __name__ == "__main__":
    main()
