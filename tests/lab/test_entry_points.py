"""The MLproject entry points: every entry point's parameters are real flags of the module it runs, received
unchanged (tests/lab/test_mlflow_run.py runs each one through the real `mlflow run` CLI)."""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path

import pytest
from mlflow.projects import _project_spec

REPO = Path(__file__).resolve().parents[2]


def command_args(entry: str, params: dict) -> list[str]:
    """The argv MLproject gives a lab entry point's main (for in-process runs of its command)."""
    ep = _project_spec.load_project(str(REPO)).get_entry_point(entry)
    argv = shlex.split(ep.compute_command(params, storage_dir=None))
    assert argv[:2] == ["python", "-m"] and argv[2] == f"mlflow_project.lab.{entry}", argv
    return argv[3:]


class _Parsed(Exception):
    """Raised in place of running a main once its argument parser has parsed the command line."""


def parse_entry_point(entry: str, params: dict, monkeypatch) -> tuple[argparse.ArgumentParser, argparse.Namespace,
                                                                      list[str]]:
    """The parser of the module an MLproject entry point runs, the namespace its command parses to, its argv."""
    ep = _project_spec.load_project(str(REPO)).get_entry_point(entry)
    argv = shlex.split(ep.compute_command(params, storage_dir=None))
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("mlflow_project."), argv
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(self, parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed) as stopped:
        importlib.import_module(argv[2]).main(argv[3:])
    monkeypatch.undo()
    parser, namespace = stopped.value.args
    return parser, namespace, argv[3:]


ENTRY_POINTS = sorted(_project_spec.load_project(str(REPO))._entry_points)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_mlproject_parameter_is_a_real_flag_and_reaches_it_unchanged(entry, monkeypatch):
    ep = _project_spec.load_project(str(REPO)).get_entry_point(entry)
    params = {name: f"{name}-value" for name, p in ep.parameters.items() if p.default is None}  # the required ones
    parser, namespace, argv = parse_entry_point(entry, params, monkeypatch)
    for name, p in ep.parameters.items():
        flag = "--" + name.replace("_", "-")
        action = parser._option_string_actions.get(flag)
        assert action is not None, f"{entry}: parameter {name!r} has no {flag} flag in {ep.command!r}"
        assert action.dest == name and flag in argv, f"{entry}: {name!r} is not passed as {flag}"
        value = params.get(name, p.default)
        if p.type == "string":  # exactly the value, whatever quoting MLflow adds ('' for an empty one)
            assert argv[argv.index(flag) + 1] == str(value), f"{entry}: {flag} receives {argv[argv.index(flag) + 1]!r}"
        else:
            assert float(getattr(namespace, name)) == float(value), f"{entry}: {name}"


def test_sweep_grids_of_the_new_defenses_are_off_by_default_and_parsed_when_given(monkeypatch):
    from mlflow_project.sweep.presets import defense_grid, get_preset

    _, a, _ = parse_entry_point("sweep", {}, monkeypatch)
    preset = get_preset(a.preset, adaptive_misinformation_taus=a.adaptive_misinformation_taus,
                        gradient_redirection_epsilons=a.gradient_redirection_epsilons)
    assert not {"adaptive_misinformation", "gradient_redirection"} & {c["name"] for c in defense_grid(preset)}
    _, a, _ = parse_entry_point("sweep", {"adaptive_misinformation_taus": "0.5,0.9",
                                          "gradient_redirection_epsilons": "none"}, monkeypatch)
    preset = get_preset(a.preset, adaptive_misinformation_taus=a.adaptive_misinformation_taus,
                        gradient_redirection_epsilons=a.gradient_redirection_epsilons)
    assert preset.adaptive_misinformation_taus == (0.5, 0.9) and preset.gradient_redirection_epsilons == ()
