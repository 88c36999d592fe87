"""The MAD family's per-K cached tables and fused paths: built right, never mutated by calls, and the fused
paths give exactly (bitwise) what the plain per-vector code gives."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from plugins.mad import candidates, mixing
from plugins.mad.geometry import Geometry, Reference
from tests.dev_secret import build_defense

pytestmark = pytest.mark.usefixtures("one_thread")


def case(k: int, b: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, k))
    x = torch.randn(b, 4, generator=gen)
    y = torch.softmax(3 * torch.randn(b, k, generator=gen, dtype=torch.float64), dim=1)
    return net, x, y


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_exhaustive_tables_enumerate_every_subset_containing_the_top_class(k):
    tables = candidates.exhaustive_tables(k)
    n = 2 ** (k - 1)
    assert tables.table.shape == (n, k - 1) and tables.targets.shape == (k, n, k)
    for c in range(k):
        others = [j for j in range(k) if j != c]
        assert tables.others[c].tolist() == others
        expected = []
        for code in range(n):
            members = [c] + [others[j] for j in range(k - 1) if code >> j & 1]
            row = torch.zeros(k, dtype=torch.float64)
            row[members] = 1.0 / len(members)
            expected.append(row)
        assert torch.equal(tables.targets[c], torch.stack(expected))
    assert torch.equal(tables.size, 1.0 + tables.table.sum(1))
    assert torch.equal(tables.inv_size, 1.0 / tables.size)


def test_tables_are_built_once_and_never_mutated_by_calls():
    k = 6
    tables = candidates.exhaustive_tables(k)
    assert candidates.exhaustive_tables(k) is tables  # cached per K
    snapshot = {name: getattr(tables, name).clone() for name in ("others", "table", "size", "inv_size", "targets")}
    net, x, y = case(k)
    for config in (
        {"name": "mad_argmax", "norm": "l1"},
        {"name": "mad_argmax", "norm": "kl", "epsilon": 0.05},
        {"name": "mad_argmax", "jacobian": "all"},
        {"name": "mad", "norm": "l2"},
    ):
        out = build_defense(config, surrogate=net)(y, x)
        # callers may modify what they get back; that must not reach the shared tables
        out.extras["target"].zero_()
        out.probs.zero_()
    for name, before in snapshot.items():
        assert torch.equal(getattr(tables, name), before), name
    eye = candidates._eye(k)
    out = build_defense({"name": "mad"}, surrogate=net)(y, x)
    out.extras["target"].fill_(7.0)
    assert torch.equal(candidates._eye(k), torch.eye(k, dtype=torch.float64))
    assert candidates._eye(k) is eye


@pytest.mark.parametrize("gram", [False, True])
def test_stacked_cosines_equal_one_cosine_per_vector_bitwise(gram):
    gen = torch.Generator().manual_seed(3)
    b, k = 9, 7
    y = torch.softmax(torch.randn(b, k, generator=gen, dtype=torch.float64), 1)
    p = torch.softmax(torch.randn(b, k, generator=gen, dtype=torch.float64), 1)
    v = torch.softmax(torch.randn(b, k, generator=gen, dtype=torch.float64), 1)
    w = torch.eye(k, dtype=torch.float64)[torch.randint(k, (b,), generator=gen)]
    m = None
    if gram:
        j = torch.randn(b, k, 5, generator=gen, dtype=torch.float64)
        m = j @ j.transpose(1, 2)
    ref = Reference.of(Geometry(centre=p, gram=m), y)
    both = ref.cosines((v, w))
    assert torch.equal(both[:, 0], ref.cosine(v)) and torch.equal(both[:, 1], ref.cosine(w))


@pytest.mark.parametrize("name,norm", list(itertools.product(["mad", "mad_argmax"], ["l1", "l2", "kl"])))
def test_outputs_are_ordinary_tensors(name, norm):
    """Parts of the pipeline run in inference mode; nothing handed back may be an inference tensor (callers
    may modify outputs in place)."""
    net, x, y = case(5)
    out = build_defense({"name": name, "norm": norm, "epsilon": 0.2}, surrogate=net)(y, x)
    tensors = [out.probs, out.angular_deviation, *out.extras.values()]
    assert not any(t.is_inference() for t in tensors)


def test_kl_coefficient_is_unaffected_by_rows_already_within_budget():
    """Rows whose target is within epsilon get a = 1 and leave every other row's coefficient unchanged."""
    gen = torch.Generator().manual_seed(1)
    k = 6
    y = torch.softmax(2 * torch.randn(10, k, generator=gen, dtype=torch.float64), 1)
    target = torch.eye(k, dtype=torch.float64)[torch.randint(k, (10,), generator=gen)]
    near = 0.999 * y[:3] + 0.001 * target[:3]  # within any reasonable budget
    eps = 0.3
    a_alone = mixing.kl_coefficient(y, target, eps)
    a_mixed = mixing.kl_coefficient(torch.cat([y, y[:3]]), torch.cat([target, near]), eps)
    assert torch.equal(a_mixed[:10], a_alone)
    assert torch.equal(a_mixed[10:], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mad", "mad_argmax"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("oracle", ["extreme", "argmin"])
@pytest.mark.parametrize("jac", ["last_layer", "identity"])
def test_the_numpy_path_gives_what_the_torch_pipeline_gives(name, norm, oracle, jac):
    """plugins.mad.euclidean (M = I, the serving hot path) against the general torch pipeline on the same rows:
    same target wherever the best candidate is not tied to rounding, answers and angles to float64 rounding."""
    checked = ties = 0
    for k, seed, eps in itertools.product((2, 3, 5, 10), (0, 1, 2), (0.05, 0.5, 1.5)):
        net, x, y = case(k, b=16, seed=seed)
        d = build_defense({"name": name, "epsilon": eps, "norm": norm, "oracle": oracle, "jacobian": jac},
                          surrogate=net)
        assert d.euclidean_kind(k) == ("vertices" if name == "mad" else "subsets")
        rows = y / y.sum(1, keepdim=True)
        geometry = d.geometry(rows, x)
        fast = d.perturb(rows, x)
        slow = d._perturb_torch(rows, geometry, x)
        same = (fast.extras["target"] == slow.extras["target"]).all(1)
        ties += int((~same).sum())
        checked += len(same)
        for key in ("target", "mixing"):
            torch.testing.assert_close(fast.extras[key][same], slow.extras[key][same], atol=1e-12, rtol=0)
        torch.testing.assert_close(fast.probs[same], slow.probs[same], atol=1e-12, rtol=0)
        # angles: arccos turns a last-bit difference of a cosine near +-1 into ~1e-7 radians
        for a, b in ((fast.angular_deviation, slow.angular_deviation),
                     (fast.extras["target_angular_deviation"], slow.extras["target_angular_deviation"])):
            torch.testing.assert_close(a[same], b[same], atol=1e-6, rtol=0)
        if not same.all():  # a tie: both targets must make the same angle
            cos = Reference.of(geometry, rows).cosines((fast.extras["target"], slow.extras["target"]))[~same]
            torch.testing.assert_close(cos[:, 0], cos[:, 1], atol=1e-12, rtol=0)
    assert checked == 4 * 3 * 3 * 16 and ties <= checked // 50
    # the torch pipeline stays the one for KL budgets, the random oracle and K > 10 candidates
    net, _, _ = case(11)
    assert build_defense({"name": "mad_argmax", "epsilon": 0.5}, surrogate=net).euclidean_kind(11) is None
    assert build_defense({"name": "mad", "epsilon": 0.5}, surrogate=net).euclidean_kind(11) == "vertices"
    for cfg in ({"norm": "kl"}, {"oracle": "random"}):
        assert build_defense({"name": name, "epsilon": 0.5, **cfg}, surrogate=net).euclidean_kind(10) is None
