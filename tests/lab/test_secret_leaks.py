"""No secret in anything the project writes: register a randomised defense version and package archives with a
known secret in the deployment (STEALGUARD_SECRET and a --secret-file), then scan every member of the .mar files,
their model-config.yaml, the MLflow run's params, tags and artifacts, the model version's tags, the whole
tracking store on disk and every captured log and output line for the secret's bytes: none. Its fingerprint
is where an operator looks for it (archive, version tag, run tag)."""

from __future__ import annotations

import json
import logging
import secrets
import zipfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from mlflow_project.lifecycle import tracking
from mlflow_project.lifecycle.package import main as package
from mlflow_project.lifecycle.register import FINGERPRINT_TAG, register
from plugins.seeding import fingerprint
from tests.support.victims import export_digits_mlp

NOISE = {"name": "random_noise", "epsilon": 2.0, "norm": "l2"}


def forms(secret: str) -> list[bytes]:
    """The secret as it could appear in a file: UTF-8, UTF-16 (e.g. Java), JSON-escaped, hex, base64."""
    import base64

    raw = secret.encode()
    return [raw, secret.encode("utf-16-le"), raw.hex().encode(), base64.b64encode(raw)]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_secret_in_archives_mlflow_or_logs(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    secret = "canary-" + secrets.token_urlsafe(24)
    file_secret = "canary-file-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("STEALGUARD_SECRET", secret)
    secret_file = tmp_path / "outside" / "secret"
    secret_file.parent.mkdir()
    secret_file.write_text(file_secret + "\n")

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(uri)
    victim = tmp_path / "digits_mlp"
    export_digits_mlp(victim)
    try:
        with pytest.raises(ValueError, match="'secret' is not allowed"):
            register({**NOISE, "secret": secret}, str(victim))
        result = register(NOISE, str(victim), alias="production")
        out = tmp_path / "mars"
        registered = package(["--name", "noise_reg", "--defense", f"models:/{result['name']}@production",
                              "--export-path", str(out)])
        monkeypatch.delenv("STEALGUARD_SECRET")
        from_file = package(["--name", "noise_file", "--victim", str(victim), "--arch", "mlp", "--defense",
                             '{"name": "random_noise", "epsilon": 1.0}', "--secret-file", str(secret_file),
                             "--export-path", str(out)])
        with pytest.raises(ValueError, match="'secret' is not allowed"):
            package(["--name", "bad", "--victim", str(victim), "--arch", "mlp", "--export-path", str(out),
                     "--defense", json.dumps({"name": "random_noise", "secret": secret})])

        client = MlflowClient()
        run = client.get_run(result["run_id"])
        version = client.get_model_version(result["name"], result["version"])
        artifacts = Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], dst_path=str(tmp_path / "a")))
    finally:
        mlflow.set_tracking_uri(None)

    # where the fingerprint is
    assert version.tags[FINGERPRINT_TAG] == fingerprint(secret) == run.data.tags[FINGERPRINT_TAG]
    configs = {}
    blobs: list[tuple[str, bytes]] = []
    for mar in (registered, from_file):
        with zipfile.ZipFile(mar) as z:
            for member in z.namelist():
                blobs.append((f"{mar.name}:{member}", z.read(member)))
            configs[mar.name] = yaml.safe_load(z.read("model-config.yaml"))["stealguard"]
    assert configs["noise_reg.mar"]["secret"] == {"fingerprint": fingerprint(secret)}
    assert configs["noise_file.mar"]["secret"] == {"file": str(secret_file), "fingerprint": fingerprint(file_secret)}
    # where the secret must not be: archives, MLflow (params, tags, artifacts, the store on disk), logs, output
    texts = [("params", repr(run.data.params)), ("run tags", repr(run.data.tags)),
             ("version tags", repr(version.tags)), ("logs", caplog.text)]
    captured = capsys.readouterr()
    texts += [("stdout", captured.out), ("stderr", captured.err)]
    blobs += [(str(p), p.read_bytes()) for p in files_under(artifacts) + files_under(store)]
    blobs += [(name, text.encode()) for name, text in texts]
    assert len(blobs) > 30
    for value in (secret, file_secret):
        leaks = [name for name, blob in blobs for form in forms(value) if form in blob]
        assert not leaks, f"the secret appears in {leaks}"
    assert any(fingerprint(secret).encode() in blob for _, blob in blobs)
