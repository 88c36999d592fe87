"""Ownership verification with the DAWN watermark: does a suspect model agree with the watermark's wrong labels
more than an independent model would?

    python -m mlflow_project.lifecycle.verify --suspect artifacts/clone \
        --watermarks sqlite:///var/tmp/stealguard/monitor.sqlite --model fmnist
    mlflow run . -e verify -P suspect=models:/clone/1 -P watermarks=redis://127.0.0.1:6379/0 -P model=fmnist \
        --env-manager local

``--suspect``: a train_victim-style export directory (or its state_dict.pt), an MLflow model URI (models:/...,
runs:/...), or an HTTP(S) prediction URL (``POST {"instances": [...]}``, StealGuard's request shape).
``--watermarks``: the serving store (sqlite:///..., redis://...; ``--model`` is its namespace, the served model's
name) or a JSON file holding a list of records (``WatermarkRecord.to_json``).

The test. Each recorded query x has the victim's top-1 c and a watermark label w, drawn by a keyed PRF
uniformly among the K - 1 classes other than c and independently of any model that never saw the key. For a
model independent of the watermarked answers, P(pred(x) = w) = P(pred(x) != c) / (K - 1) (w is uniform over the
other classes whatever the model predicts), so the number of agreements is Binomial(n, p0) with
p0 = P(pred != c) / (K - 1). ``--null-rate estimated`` (the default) estimates P(pred != c) by the suspect's own
disagreement with c on the recorded queries; a clone's agreements with w are disagreements with c, so the
estimate only grows with them (conservative). ``--null-rate conservative`` takes p0 = 1 / (K - 1), the bound for a
model that is never right. The p-value is ``scipy.stats.binomtest(k, n, p0, alternative="greater")``.
Logged to MLflow: agreement, p-value, null rate, counts (tag ``stealguard.kind=verification``); the store URL is
logged without credentials.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from scipy.stats import binomtest

from plugins.monitor.store import StoreLimits, WatermarkRecord

NULL_RATES = ("estimated", "conservative")


def read_records(source: str, namespace: str) -> list[WatermarkRecord]:
    if source.startswith(("sqlite:///", "redis://", "rediss://")):
        from handlers.monitor_stores import open_store

        if not namespace:
            raise ValueError("model: the store namespace (the served model's name) is needed with a store URL")
        store = open_store(source, namespace, StoreLimits(), timeout_ms=10_000)
        try:
            return store.watermarks()
        finally:
            store.close()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"watermarks: {source!r} is neither a store URL (sqlite:///, redis://) nor a JSON file")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, list):
        raise ValueError(f"watermarks: {source} must hold a JSON list of records; got {type(doc).__name__}")
    return [WatermarkRecord.from_json(d) for d in doc]


def suspect_labels(suspect: str, x: torch.Tensor, batch_size: int = 64, send: str = "normalised") -> torch.Tensor:
    """The suspect's top-1 on ``x`` (the queries as the victim saw them)."""
    if suspect.startswith(("http://", "https://")):
        from mlflow_project.lab.oracles import HTTPOracle

        return HTTPOracle(suspect, batch_size=batch_size, send=send)(x).argmax(dim=1)
    from mlflow_project.lab.evaluate import load_victim

    model = load_victim(suspect).model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])


def verify(labels: np.ndarray, victim_labels: np.ndarray, predictions: np.ndarray, num_classes: int,
           null_rate: str = "estimated") -> dict[str, float]:
    """Agreement with the watermark labels and its p-value under the null of an independent model."""
    if null_rate not in NULL_RATES:
        raise ValueError(f"null_rate: unknown {null_rate!r}; allowed: {', '.join(NULL_RATES)}")
    n = int(len(labels))
    if n == 0:
        raise ValueError("watermarks: no records; the server records them only with monitor.watermark.enabled")
    if num_classes < 3:
        raise ValueError(f"num_classes: the test needs K >= 3 (one wrong label is no choice); got {num_classes}")
    agreed = int((predictions == labels).sum())
    known = victim_labels >= 0
    disagree = float((predictions[known] != victim_labels[known]).mean()) if known.any() else 1.0
    p0 = 1.0 / (num_classes - 1) if null_rate == "conservative" or not known.any() else disagree / (num_classes - 1)
    p_value = float(binomtest(agreed, n, p0, alternative="greater").pvalue) if p0 > 0 else float(agreed == 0)
    return {
        "watermarks": n,
        "agreed": agreed,
        "watermark_agreement": agreed / n,
        "victim_agreement": 1.0 - disagree if known.any() else float("nan"),
        "null_rate": p0,
        "p_value": p_value,
        "log10_p_value": math.log10(p_value) if p_value > 0 else -math.inf,
    }


def _public(url: str) -> str:
    """A store URL without credentials (redis://user:pass@host -> redis://host)."""
    parts = urlsplit(url)
    if parts.scheme.startswith("redis") and parts.hostname:
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
    return url


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--suspect", required=True, help="export directory, MLflow model URI or HTTP prediction URL")
    p.add_argument("--watermarks", required=True, help="store URL (sqlite:///, redis://) or a JSON records file")
    p.add_argument("--model", default="", help="the store namespace: the served model's name")
    p.add_argument("--null-rate", dest="null_rate", default="estimated", choices=NULL_RATES)
    p.add_argument("--send", default="normalised", choices=("normalised", "pixels"), help="HTTP suspects only")
    p.add_argument("--batch-size", dest="batch_size", type=lambda v: int(float(v)), default=64)
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: as mlflow)")
    args = p.parse_args(argv)
    records = read_records(args.watermarks, args.model)
    if not records:
        raise ValueError(f"watermarks: no records in {_public(args.watermarks)} (namespace {args.model!r})")
    x = torch.from_numpy(np.stack([r.query for r in records])).to(torch.float32)
    num_classes = len(records[0].probs)
    preds = suspect_labels(args.suspect, x, args.batch_size, args.send).cpu().numpy()
    result = verify(np.array([r.label for r in records]), np.array([r.victim_label for r in records]), preds,
                    num_classes, args.null_rate)
    import mlflow

    from mlflow_project.lifecycle import tracking

    with tracking.start_run("verify", args.tracking_uri or None):
        mlflow.set_tags({"stealguard.kind": "verification"})
        mlflow.log_params({"suspect": args.suspect, "watermarks": _public(args.watermarks), "model": args.model,
                           "null_rate": args.null_rate, "num_classes": num_classes})
        mlflow.log_metrics({k: v for k, v in result.items() if math.isfinite(v)})
    print(json.dumps({"suspect": args.suspect, **result}))
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
