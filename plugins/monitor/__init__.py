"""The per-client extraction monitor (PRADA + OOD share) and the DAWN output watermark; framework-free.

The store is an interface (:class:`plugins.monitor.store.MonitorStore`); the SQLite and Redis backends live in
``handlers/monitor_stores.py`` so that plugins/ imports no client library.
"""

from plugins.monitor.config import ACTIONS, MonitorConfig, parse_monitor
from plugins.monitor.monitor import REASONS, ExtractionMonitor, Verdict
from plugins.monitor.store import FlaggedClient, MemoryStore, MonitorStore, StoreError, StoreLimits, WatermarkRecord

__all__ = [
    "ACTIONS",
    "REASONS",
    "ExtractionMonitor",
    "FlaggedClient",
    "MemoryStore",
    "MonitorConfig",
    "MonitorStore",
    "StoreError",
    "StoreLimits",
    "Verdict",
    "WatermarkRecord",
    "parse_monitor",
]
