"""``package --monitor`` with action harden ships a surrogate when the harden defense needs one (MAD) even if the
archive's own defense does not (label_only), so the worker can build the defense a flagged client gets; a harden
defense that needs none adds none."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle.package import main as package
from tests.support.handler import make_context
from tests.support.victims import export_digits_mlp


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim") / "digits_mlp"
    export_digits_mlp(out)
    return out


def _build(tmp_path, victim, harden):
    monitor = {"action": "harden", "harden": harden, "store": f"sqlite:///{tmp_path / 'monitor.sqlite'}"}
    mar = package(["--name", "m", "--victim", str(victim), "--defense", '{"name": "label_only"}',
                   "--export-path", str(tmp_path / "store"), "--monitor", json.dumps(monitor)])
    dest = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        z.extractall(dest)
    return dest, yaml.safe_load((dest / "model-config.yaml").read_text())["stealguard"]


def test_a_mad_harden_defense_gets_a_surrogate_and_the_worker_builds_it(tmp_path, victim):
    dest, section = _build(tmp_path, victim, {"name": "mad", "epsilon": 1.0, "norm": "l1"})
    assert section["defense"]["name"] == "label_only" and "surrogate" in section
    handler = StealGuardHandler()
    handler.initialize(make_context(dest, dest / "model-config.yaml", name="m"))
    assert handler.monitor.harden.name == "mad"


def test_a_harden_defense_without_a_surrogate_adds_none(tmp_path, victim):
    _, section = _build(tmp_path, victim, {"name": "label_only"})
    assert "surrogate" not in section
