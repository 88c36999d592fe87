"""A third-party defense, built and pip-installed as its own distribution, found by name, shipped in an archive
with ``package --extra-dist`` (through the real ``mlflow run . -e package``) and served by a real TorchServe.

The distribution is installed with ``pip install --target`` into a directory on this process's ``sys.path`` (and
on the package subprocess's PYTHONPATH), not into the shared venv: the TorchServe workers then see it only
through the archive, so a served answer proves the archive carries it, and other test sessions sharing the venv
never see a stray defense. An archive built without ``--extra-dist`` must fail to load.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
import torch

import plugins
from mlflow_project.lab.data import input_spec
from mlflow_project.lab.train_victim import export_victim
from mlflow_project.lifecycle import distributions
from mlflow_project.lifecycle import package as package_cli
from plugins import registry
from tests.support.cli import venv_env
from tests.support.torchserve import REPO, TorchServe
from tests.support.victims import make_net

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIST = "stealguard-temperature"
TEMPERATURE = 3.0
DEFENSE = {"name": "temperature", "temperature": TEMPERATURE}

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "stealguard-temperature"
version = "0.3.0"
dependencies = ["torch", "pydantic"]

[project.entry-points."stealguard.defenses"]
temperature = "sg_temperature.defense:Temperature"

[tool.setuptools]
packages = ["sg_temperature"]
"""

DEFENSE_PY = '''\
"""Temperature scaling: y~ = softmax(log(y) / T). T > 1 flattens every row; argmax is kept."""

import torch
from pydantic import Field

from plugins import Defense, DefenseConfig, DefenseOutput


class TemperatureConfig(DefenseConfig):
    temperature: float = Field(gt=0, le=100, description="softmax temperature (> 1 flattens)")


class Temperature(Defense):
    name = "temperature"
    Config = TemperatureConfig

    def perturb(self, y, inputs):
        logits = torch.log(y.clamp_min(1e-30)) / self.config.temperature
        return DefenseOutput(probs=torch.softmax(logits, dim=1))
'''


def expected(y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.log(y.clamp_min(1e-30)) / TEMPERATURE, dim=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The distribution, built from its own pyproject and pip-installed into a directory on sys.path."""
    root = tmp_path_factory.mktemp("third_party")
    src = root / "src"
    (src / "sg_temperature").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "sg_temperature" / "__init__.py").write_text('"""A third-party StealGuard defense."""\n')
    (src / "sg_temperature" / "defense.py").write_text(DEFENSE_PY)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        plugins.available_defenses()
        plugins.load_entry_points()  # this process may have loaded the registry before the install
        try:
            yield target
        finally:
            registry._REGISTRY.pop("temperature", None)  # later modules see the registry they would have seen


def fresh_python(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True)


def test_the_installed_distribution_is_a_defense_by_name(site):
    r = fresh_python(site, """
        from plugins import available_defenses, build_defense
        print(available_defenses())
        try:
            build_defense({"name": "temperature", "temperature": -1})
        except ValueError as exc:
            print(exc)
    """)
    assert r.returncode == 0, r.stderr
    names, refusal = r.stdout.splitlines()
    assert {"temperature", "mad_argmax"} <= set(ast.literal_eval(names)), names
    assert refusal.startswith("invalid config for defense 'temperature': temperature:"), refusal
    assert "greater than 0" in refusal, refusal


def test_shipping_refuses_what_cannot_be_shipped(site, tmp_path):
    with pytest.raises(ValueError, match="no installed distribution named 'no-such-dist'.*stealguard-temperature"):
        distributions.ship(["no-such-dist"], tmp_path / "pylib")
    with pytest.raises(ValueError, match="stealguard itself is always in the archive"):
        distributions.ship(["stealguard"], tmp_path / "pylib")
    shipped = distributions.ship([DIST, DIST], tmp_path / "pylib")
    assert shipped == [{"name": DIST, "version": "0.3.0", "top_level": ["sg_temperature"],
                        "defenses": ["temperature"]}]
    (info,) = (tmp_path / "pylib").glob("*.dist-info")
    assert "temperature = sg_temperature.defense:Temperature" in (info / "entry_points.txt").read_text()
    assert (tmp_path / "pylib" / "sg_temperature" / "defense.py").read_text() == DEFENSE_PY


@pytest.fixture(scope="module")
def archives(site, tmp_path_factory):
    """temp_shipped (mlflow run . -e package -P extra_dist=...) and temp_unshipped (the same without it)."""
    root = tmp_path_factory.mktemp("third_party_archives")
    net = make_net("mlp", seed=0)
    victim = root / "victim"
    export_victim(net, "mlp", input_spec("digits", "mlp"), victim, runtimes=False)
    (root / "defense.json").write_text(json.dumps(DEFENSE))
    store = root / "store"
    env = venv_env(PYTHONPATH=str(site), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "package", "--env-manager", "local",
           "-P", "name=temp_shipped", "-P", f"victim={victim}", "-P", f"defense={root / 'defense.json'}",
           "-P", f"export_path={store}", "-P", f"extra_dist={DIST}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "package: warning" not in r.stderr, r.stderr[-2000:]
    unshipped, err = root / "unshipped", io.StringIO()
    with contextlib.redirect_stderr(err):
        package_cli.main(["--name", "temp_unshipped", "--victim", str(victim), "--defense", json.dumps(DEFENSE),
                          "--export-path", str(unshipped)])
    return store, unshipped, net, err.getvalue()


def test_package_warns_when_the_defense_distribution_is_not_shipped(archives):
    err = archives[3]
    assert f"defense 'temperature' comes from distribution {DIST}, which this archive does not ship" in err, err
    assert f"--extra-dist {DIST}" in err


def test_torchserve_serves_the_shipped_third_party_defense(archives, tmp_path):
    store, unshipped, net, _ = archives
    server = TorchServe(store, tmp_path / "ts", models=["temp_shipped"], properties={"enable_model_api": "true"})
    server.start(timeout=180)
    try:
        x = torch.rand((5, 64), generator=torch.Generator().manual_seed(4))
        r = requests.post(f"{server.inference_url}/predictions/temp_shipped", json={"instances": x.tolist()},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["X-StealGuard-Defense"].startswith("temperature"), r.headers
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]], dtype=torch.float64)
        with torch.no_grad():
            y = torch.softmax(net(x).double(), dim=1)
        assert torch.allclose(got.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(got, expected(y), atol=1e-5), (got - expected(y)).abs().max()
        assert (got - y).abs().sum(dim=1).min() > 1e-2, "the temperature defense must change every row"
        assert torch.equal(got.argmax(dim=1), y.argmax(dim=1))
        served_from = server.wait_log(r"defense class from (\S+)")
        assert served_from and f"{os.sep}pylib{os.sep}sg_temperature{os.sep}defense.py" in served_from[0], served_from

        # Without --extra-dist the worker has no such defense: the archive fails to load, never serves.
        (unshipped / "temp_unshipped.mar").rename(store / "temp_unshipped.mar")
        mgmt = server.management_url
        r = requests.post(f"{mgmt}/models", params={"url": "temp_unshipped.mar", "initial_workers": 1,
                                                     "synchronous": "true"}, timeout=120)
        try:
            assert r.status_code >= 400, r.text
            why = r"StealGuard: model 'temp_unshipped' NOT loaded.*unknown defense 'temperature'"
            assert server.wait_log(why), server.model_log()[-3000:]
        finally:
            requests.delete(f"{mgmt}/models/temp_unshipped", timeout=60)
    finally:
        server.stop()
