"""`make archive` and `python -m mlflow_project.lifecycle.package` in a fresh clone (no victim trained yet) say
what is missing and how to make it, not that a runtime cannot be told from an extension."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_project.lifecycle.package import missing_victim

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]


def test_make_archive_without_a_trained_victim_says_how_to_train_one(tmp_path):
    victim = tmp_path / "artifacts" / "victims" / "fashion_mnist_lenet"
    # -o: the venv is set up already; do not let make re-install it
    proc = subprocess.run(["make", "-o", str(VENV / ".stealguard-requirements"), "archive", f"VENV={VENV}",
                           f"ARCHIVE_VICTIM={victim}", f"MODEL_STORE={tmp_path / 'store'}"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    err = proc.stderr
    assert f"--victim: {victim} does not exist: no victim has been trained there yet" in err, err
    assert "`make demo`" in err and "cannot tell the runtime" not in err
    assert (f"`python -m mlflow_project.lab.train_victim --dataset fashion_mnist --arch lenet --output-dir {victim}`"
            in err)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_package_names_the_train_victim_command_for_the_missing_victim(tmp_path):
    victim = tmp_path / "digits_mlp"
    proc = subprocess.run([sys.executable, "-m", "mlflow_project.lifecycle.package", "--name", "m", "--victim",
                           str(victim), "--defense", '{"name": "identity"}', "--export-path", str(tmp_path / "s")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("package: --victim: "), proc.stderr
    assert f"--dataset digits --arch mlp --output-dir {victim}`" in proc.stderr


@pytest.mark.parametrize("name", ["victim.pt2", "my_model", "digits_resnet"])
def test_other_missing_names_get_the_default_command(tmp_path, name):
    text = missing_victim(str(tmp_path / name))
    assert "`make demo`" in text and "--dataset fashion_mnist --arch lenet" in text


def test_existing_paths_and_uris_are_not_missing(tmp_path):
    assert missing_victim(str(tmp_path)) is None
    assert missing_victim("models:/digits_mlp@production") is None and missing_victim("runs:/abc/exports") is None
