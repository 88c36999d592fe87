"""Defense versions end to end: a real `mlflow server` on 127.0.0.1 (SQLite + proxied artifacts in a temp dir)
and a real TorchServe. Register, package from the alias, serve: the header, the defense_info metric and the
start log name the version; promote, rebuild and restart (unregister + register the rebuilt .mar through the
management API): the new version; roll back: the old one, with byte-identical answers; the answers equal the
pyfunc's predict(x). resolve_at_start picks up a promotion without a rebuild, and when the server is down
falls back to the embedded version (fallback: embedded) or does not load (fallback: fail)."""

from __future__ import annotations

import os
import time

import mlflow
import numpy as np
import pytest
import requests
import torch

from handlers import registry
from handlers.registry import ResolveError
from mlflow_project.lifecycle import tracking
from mlflow_project.lifecycle.package import main as package
from mlflow_project.lifecycle.promote import promote
from mlflow_project.lifecycle.register import register
from tests.support.mlflow_server import MlflowServer
from tests.support.torchserve import TorchServe
from tests.support.victims import export_digits_mlp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
NAME = "digits_mlp-defense"
HEADER = "X-StealGuard-Defense"
X = np.random.default_rng(0).random((8, 64), dtype=np.float32)


class Lab:
    def __init__(self, root, mlflow_server, store, versions):
        self.root, self.mlflow, self.store, self.versions = root, mlflow_server, store, versions
        self.ts: TorchServe | None = None

    def package(self, name: str, *extra: str) -> None:
        # the pyfunc runs the registered (eager) surrogate: ship it eager so the answers agree to 1e-12
        package(["--name", name, "--defense", f"models:/{NAME}@production", "--export-path", str(self.store),
                 "--surrogate-runtime", "eager", *extra])

    def ask(self, model: str) -> tuple[str, np.ndarray]:
        r = requests.post(f"{self.ts.inference_url}/predictions/{model}", json={"instances": X.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers[HEADER], np.array([p["probabilities"] for p in r.json()["predictions"]])

    def load(self, model: str, wait: bool = False) -> requests.Response:
        params = {"url": f"{model}.mar", "initial_workers": "1", "synchronous": "true" if wait else "false"}
        r = requests.post(f"{self.ts.management_url}/models", params=params, timeout=180)
        assert r.status_code in (200, 202), f"{r.text}\n{self.ts.tail()}"
        self.ts.models = sorted({*self.ts.models, model})
        return r

    def restart(self, model: str, expect_ready: bool = True) -> requests.Response:
        """Unregister ``model`` and register its (rebuilt) .mar again: a fresh worker runs initialize()."""
        r = requests.delete(f"{self.ts.management_url}/models/{model}", timeout=60)
        assert r.status_code == 200, r.text
        return self.load(model, wait=expect_ready)

    def pyfunc(self) -> np.ndarray:
        return mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(X)

    def info_versions(self, model: str) -> set[str]:
        text = requests.get(f"{self.ts.metrics_url}/metrics", timeout=10).text
        return {line.split('defense_version="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("stealguard_defense_info{") and f'model_name="{model}"' in line}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    server = MlflowServer(root / "mlflow").launch()  # boots while TorchServe starts
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url  # for this process and the TorchServe workers it starts
    lab = Lab(root, server, root / "store", {})
    lab.store.mkdir()
    try:
        lab.ts = TorchServe(lab.store, root / "ts", models=[], properties={"enable_model_api": "true"})
        lab.ts.start(timeout=240)
        victim = root / "digits_mlp"
        export_digits_mlp(victim)
        server.wait_ready()
        tracking.setup(server.url)
        lab.versions["1"] = register(MAD, str(victim), alias="production")
        lab.versions["2"] = register({**MAD, "epsilon": 1.0}, str(victim))
        lab.package("dv")
        lab.package("dv_rs", "--resolve-at-start", "--fallback", "embedded")
        lab.package("dv_fail", "--resolve-at-start", "--fallback", "fail")
        for model in ("dv", "dv_rs", "dv_fail"):
            lab.load(model)
        lab.ts.wait_ready(timeout=180)
        yield lab
    finally:
        if lab.ts is not None:
            lab.ts.stop()
        server.stop()
        mlflow.set_tracking_uri(None)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def test_register_package_serve_promote_rebuild_restart_and_roll_back(lab):
    torch.set_num_threads(1)
    header, v1 = lab.ask("dv")
    assert header == f"mad_argmax@{NAME}/1"
    np.testing.assert_allclose(v1, lab.pyfunc(), rtol=0, atol=1e-12)
    assert lab.info_versions("dv") == {f"{NAME}/1"}
    run1 = lab.versions["1"]["run_id"]
    assert lab.ts.wait_log(rf"serving 'dv' with mad_argmax@{NAME}/1 \[version: embedded; run_id {run1}, "
                           r"alias production\]")

    assert promote(NAME, 2)["previous"] == "1"
    lab.package("dv")
    lab.restart("dv")
    header, v2 = lab.ask("dv")
    assert header == f"mad_argmax@{NAME}/2"
    np.testing.assert_allclose(v2, lab.pyfunc(), rtol=0, atol=1e-12)
    assert np.abs(v2 - v1).sum(1).max() > 1e-3  # epsilon 1.0 is not epsilon 0.5
    assert f"{NAME}/2" in lab.info_versions("dv")
    run2 = lab.versions["2"]["run_id"]
    assert lab.ts.wait_log(rf"serving 'dv' with mad_argmax@{NAME}/2 \[version: embedded; run_id {run2}")

    assert promote(NAME, 1)["previous"] == "2"  # rollback
    lab.package("dv")
    lab.restart("dv")
    header, back = lab.ask("dv")
    assert header == f"mad_argmax@{NAME}/1"
    np.testing.assert_array_equal(back, v1)


def test_resolve_at_start_follows_the_alias_without_a_rebuild_and_falls_back_when_mlflow_is_down(lab):
    # dv_rs and dv_fail embed version 1 (production when they were built)
    promote(NAME, 1)
    assert lab.ask("dv_rs")[0] == f"mad_argmax@{NAME}/1"
    promote(NAME, 2)
    lab.restart("dv_rs")
    header, got = lab.ask("dv_rs")
    assert header == f"mad_argmax@{NAME}/2"
    np.testing.assert_allclose(got, lab.pyfunc(), rtol=0, atol=1e-12)
    assert lab.ts.wait_log(rf"serving 'dv_rs' with mad_argmax@{NAME}/2 \[version: resolved at start: "
                           rf"{NAME}@production -> version 2 \(embedded version 1 not used\)")
    assert f"{NAME}/2" in lab.info_versions("dv_rs")

    with pytest.raises(ResolveError, match=r"alias candidate not found"):  # the REST client, on the real server
        registry.Client(lab.mlflow.url).alias_version(NAME, "candidate")
    with pytest.raises(ResolveError, match=r"HTTP 404.*no-such-defense"):
        registry.Client(lab.mlflow.url).alias_version("no-such-defense", "production")

    lab.mlflow.stop()  # MLflow is down from here on
    lab.restart("dv_rs")
    assert lab.ask("dv_rs")[0] == f"mad_argmax@{NAME}/1"  # the embedded version, still defended
    assert lab.ts.wait_log(r"resolving digits_mlp-defense@production failed; fallback 'embedded' serves "
                           r"embedded version 1: .*cannot be reached")

    r = lab.restart("dv_fail", expect_ready=False)
    assert r.status_code in (200, 202), r.text
    assert lab.ts.wait_log(r"NOT loaded, so it is never served undefended: stealguard\.version\.fallback is "
                           r"'fail' and resolving digits_mlp-defense@production failed", timeout=60)
    time.sleep(1)
    assert not lab.ts.model_ready("dv_fail")
    try:  # no worker: TorchServe queues the request or refuses it; either way no probabilities come back
        answer = requests.post(f"{lab.ts.inference_url}/predictions/dv_fail", json={"instances": X.tolist()},
                               timeout=5)
        assert answer.status_code >= 500 and "probabilities" not in answer.text
    except requests.Timeout:
        pass
    requests.delete(f"{lab.ts.management_url}/models/dv_fail", timeout=60)
