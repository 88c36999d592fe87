"""TorchServe's metric log lines, parsed (our own reading of the format the worker writes)."""

from __future__ import annotations

import re

# One TorchServe metric log line, as the worker writes it.
LINE = re.compile(
    r"\[METRICS\](?P<name>\w+)\.(?P<unit>\w+):(?P<value>[^|]+)\|#(?P<dims>[^|]*)\|#type:(?P<type>\w+)\|#hostname:"
)


def emitted(caplog) -> list[dict]:
    """Every metric line the TorchServe sink logged (pytest's caplog), parsed: name, unit, value, dims, type
    and the dims as a ``labels`` dict."""
    out = []
    for rec in caplog.records:  # one record may carry several lines (TorchServeSink.emit_batch)
        for line in rec.getMessage().splitlines():
            m = LINE.search(line)
            if not m:
                continue
            d = m.groupdict()
            d["labels"] = dict(kv.split(":", 1) for kv in d["dims"].split(",")) if d["dims"] else {}
            out.append(d)
    return out
