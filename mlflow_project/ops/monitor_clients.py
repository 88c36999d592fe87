"""List the clients the per-client extraction monitor flags, from its store (what the SRE runs when
StealGuardExtractionSuspected fires; docs/operations.md).

    python -m mlflow_project.ops.monitor_clients --store sqlite:///var/tmp/stealguard/monitor.sqlite --model fmnist
    python -m mlflow_project.ops.monitor_clients --store redis://127.0.0.1:6379/0 --model fmnist --json

``--model`` is the store namespace: the archive's ``monitor.namespace``, by default the served model's name.
Prints one line per live flagged client (most recent first): id, reason, when, queries seen, PRADA's W.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from handlers.monitor_stores import open_store
from plugins.monitor.config import DEFAULT_STORE
from plugins.monitor.store import StoreLimits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monitor_clients", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=DEFAULT_STORE, help=f"sqlite:///<path> or redis://host:port/db ({DEFAULT_STORE})")
    p.add_argument("--model", required=True, help="the store namespace: monitor.namespace or the model's name")
    p.add_argument("--ttl-seconds", type=float, default=86400.0, help="the archive's monitor.ttl_seconds")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    args = p.parse_args(argv)
    try:
        store = open_store(args.store, args.model, StoreLimits(ttl_seconds=args.ttl_seconds), timeout_ms=5000)
        flagged = store.flagged()
        store.close()
    except Exception as exc:
        print(f"monitor_clients: cannot read the store {args.store!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([f.__dict__ for f in flagged], indent=2))
        return 0
    print(f"{len(flagged)} flagged client(s) for model {args.model!r} in {args.store}")
    for f in flagged:
        when = dt.datetime.fromtimestamp(f.flagged_at, dt.UTC).isoformat(timespec="seconds")
        w = "-" if f.statistic is None else f"{f.statistic:.4f}"
        print(f"{f.client}\t{f.reason}\tflagged {when}\tqueries {f.queries}\tW {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
