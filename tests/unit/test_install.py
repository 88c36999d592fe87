"""The project is installable: its wheel holds plugins, handlers and mlflow_project with every subpackage and
depends on the server's pins, and `make setup`'s editable install (pip install --no-deps --no-build-isolation -e .)
works offline with the pinned setuptools. Both build from a copy of the sources in tmp_path (the build writes
build/ and *.egg-info next to pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("plugins", "handlers", "mlflow_project")

pytestmark = pytest.mark.slow


@pytest.fixture
def sources(tmp_path) -> Path:
    src = tmp_path / "src"
    for name in (*PACKAGES, "requirements"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
    return src


def subpackages(root: Path) -> set[str]:
    return {p.parent.relative_to(root).as_posix() for name in PACKAGES for p in (root / name).rglob("__init__.py")}


def test_the_wheel_holds_every_package_and_depends_on_the_serve_pins(sources, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(sources)], check=True)
    (wheel,) = (tmp_path / "dist").glob("stealguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = {line.split(": ", 1)[1] for line in z.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist: ")}
    packaged = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert packaged == subpackages(REPO), packaged ^ subpackages(REPO)
    serve = {line for line in (REPO / "requirements" / "serve.txt").read_text().splitlines()
             if line and not line.startswith("#")}
    assert requires == serve, requires ^ serve
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_the_editable_install_of_make_setup_works_offline(sources, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's pip and setuptools
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
                    str(sources)], check=True, cwd=tmp_path)
    probe = ("import importlib.metadata as md, plugins, handlers.config, mlflow_project.lifecycle.package as p; "
             "print(plugins.__file__); print(p.__file__); print(md.distribution('stealguard').version)")
    out = subprocess.run([python, "-c", probe], check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    plugins_file, package_file, version = out.split()
    assert Path(plugins_file) == sources / "plugins" / "__init__.py"
    assert Path(package_file) == sources / "mlflow_project" / "lifecycle" / "package.py"
    assert version == "0.1.0"
