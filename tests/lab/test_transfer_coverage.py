"""transfer_coverage: what a query set elicits from a victim, class by class."""

from __future__ import annotations

import math

import pytest

from mlflow_project.lab import transfer_coverage as tc
from mlflow_project.lab.evaluate import load_victim


def test_in_distribution_queries_cover_every_class_and_the_table_names_them(digits_victim_dir, capsys):
    result = tc.main(["--victim", str(digits_victim_dir), "--querysets", "digits"])
    digits = result["digits"]
    assert digits["size"] > 1000 and sum(digits["share"]) == pytest.approx(1.0)
    # a ~97 % victim on its own (balanced) train split answers every digit about a tenth of the time
    assert min(digits["share"]) > 0.05 and digits["query_label_entropy"] == pytest.approx(math.log2(10), abs=0.05)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["class", "digits"] and "entropy, bits" in out


def test_coverage_of_two_sets_is_reported_side_by_side(digits_victim_dir):
    victim = load_victim(digits_victim_dir)
    result = tc.coverage(victim, ["digits", "mnist5k"])  # in distribution, and real MNIST digits resized to 8x8
    assert list(result) == ["digits", "mnist5k"] and result["mnist5k"]["size"] == 5000
    assert sum(result["mnist5k"]["share"]) == pytest.approx(1.0)
    lines = tc.table(result, victim.spec.classes).splitlines()
    assert lines[0].split() == ["class", "digits", "mnist5k"] and len(lines) == 1 + 10 + 3


def test_an_unknown_query_set_is_refused_with_the_allowed_ones(digits_victim_dir):
    with pytest.raises(ValueError, match="mnist5k"):
        tc.main(["--victim", str(digits_victim_dir), "--querysets", "emnist"])
