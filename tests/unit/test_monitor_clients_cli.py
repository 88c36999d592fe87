"""python -m mlflow_project.ops.monitor_clients lists the flagged clients of a store; package --monitor embeds the
validated section (and refuses a key in it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from handlers.monitor_stores import open_store
from mlflow_project.lifecycle.package import read_monitor_file
from plugins.monitor import ExtractionMonitor, StoreLimits, parse_monitor

ROOT = Path(__file__).resolve().parents[2]


def test_cli_lists_flagged_clients(tmp_path):
    url = f"sqlite:///{tmp_path}/m.sqlite"
    store = open_store(url, "fmnist", StoreLimits())
    cfg = parse_monitor({"ood": {"min_queries": 4}, "prada": {"min_distances": 1000}})
    unsure = torch.full((4, 10), 0.1, dtype=torch.float64)
    ExtractionMonitor(cfg, store).observe(["thief-7"] * 4 + ["benign-1"] * 2, torch.rand(6, 3),
                                          torch.cat([unsure, unsure[:2]]))
    store.close()
    run = [sys.executable, "-m", "mlflow_project.ops.monitor_clients", "--store", url, "--model", "fmnist"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.splitlines()[0] == f"1 flagged client(s) for model 'fmnist' in {url}"
    assert out.splitlines()[1].startswith("thief-7\tood_share\tflagged ")
    doc = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    assert [(d["client"], d["reason"], d["queries"]) for d in doc] == [("thief-7", "ood_share", 4)]
    other = subprocess.run([*run[:-1], "other"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert other.startswith("0 flagged client(s)")
    bad = subprocess.run([*run[:4], "redis://127.0.0.1:1/0", "--model", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "cannot read the store 'redis://127.0.0.1:1/0'" in bad.stderr


def test_package_monitor_file_is_validated(tmp_path):
    f = tmp_path / "monitor.yaml"
    f.write_text(yaml.safe_dump({"monitor": {"action": "harden", "harden": {"name": "top_k", "k": 1}}}))
    assert read_monitor_file(str(f)) == {"action": "harden", "harden": {"name": "top_k", "k": 1}}
    assert read_monitor_file('{"action": "block"}') == {"action": "block"}
    with pytest.raises(ValueError, match=r"--monitor\.watermark\.key: unknown key"):
        read_monitor_file('{"watermark": {"enabled": true, "key": "s3cret"}}')


def test_shipped_example_monitor_config_is_valid():
    cfg = parse_monitor(read_monitor_file(str(ROOT / "deploy" / "monitor.yaml")))
    assert cfg.action == "harden" and cfg.harden == {"name": "label_only"} and cfg.header == "X-Client-Id"
