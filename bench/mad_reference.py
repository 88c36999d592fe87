"""A per-sample MAD reference for bench_mad.py's speed-up figures (the tests own their own, independent copy
in tests/unit/test_mad_reference.py; this one only has to be the same slow algorithm).

Per sample: one autograd.grad of log-softmax[k] per class k w.r.t. the chosen parameters gives the explicit
K x D matrix G; H(v) = || G^T v / |G^T v| - G^T y / |G^T y| ||^2 for every candidate v; the best candidate
is mixed in with the closed-form (l1, l2) or bisected (KL) coefficient.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn


def explicit_G(model: nn.Module, x_i: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    log_p = torch.log_softmax(model(x_i.unsqueeze(0)), dim=1)[0]
    rows = []
    for k in range(log_p.shape[0]):
        grads = torch.autograd.grad(log_p[k], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).to(torch.float64)


def objective(G: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> float:
    a, b = G.T @ v, G.T @ y
    return float(((a / a.norm() - b / b.norm()) ** 2).sum())


def candidate_list(name: str, y: torch.Tensor) -> list[torch.Tensor]:
    k, c = y.shape[0], int(y.argmax())
    if name == "mad":
        return list(torch.eye(k, dtype=torch.float64))
    others = [j for j in range(k) if j != c]
    out = []
    for r in range(k):
        for extra in itertools.combinations(others, r):
            v = torch.zeros(k, dtype=torch.float64)
            v[[c, *extra]] = 1.0 / (r + 1)
            out.append(v)
    return out


def kl(y: torch.Tensor, t: torch.Tensor) -> float:
    pairs = zip(y.tolist(), t.tolist(), strict=True)
    return sum(yi * (math.log(yi) - math.log(max(ti, 1e-12))) for yi, ti in pairs if yi > 0)


def coefficient(y: torch.Tensor, t: torch.Tensor, eps: float, norm: str) -> float:
    if norm != "kl":
        d = float((t - y).abs().sum()) if norm == "l1" else float((t - y).norm())
        return 1.0 if d <= eps else eps / d
    if kl(y, t) <= eps:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(y, (1 - mid) * y + mid * t) <= eps else (lo, mid)
    return lo


def prepare(model: nn.Module, jacobian: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """A differentiable copy of the surrogate and the parameters G is taken over."""
    model = copy.deepcopy(model).requires_grad_(True)
    if jacobian == "last_layer":
        return model, list([m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters())
    return model, list(model.parameters())


def reference_mad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, norm: str,
                  jacobian: str, shared_forward: bool = False, prepared=None) -> torch.Tensor:
    """y~ for every row, one row at a time (K <= 10 for mad_argmax).

    ``shared_forward=True`` (last_layer only): one batched forward with autograd, then per sample and per
    class autograd.grad of that sample's log-softmax w.r.t. the last layer (autograd only walks back to that
    layer, so each row costs its own gradients, objective and mixing, not a forward pass).
    """
    model, params = prepared if prepared is not None else prepare(model, jacobian)
    y = y.to(torch.float64)
    log_p = torch.log_softmax(model(x), dim=1) if shared_forward else None
    out = []
    for i in range(y.shape[0]):
        if log_p is not None:
            rows = []
            for k in range(y.shape[1]):
                grads = torch.autograd.grad(log_p[i, k], params, retain_graph=True)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            G = torch.stack(rows).to(torch.float64)
        else:
            G = explicit_G(model, x[i], params)
        cands = candidate_list(name, y[i])
        scores = [objective(G, y[i], v) for v in cands]
        target = cands[max(range(len(cands)), key=scores.__getitem__)]
        a = coefficient(y[i], target, eps, norm)
        if name == "mad_argmax":
            c = int(y[i].argmax())
            gaps = [float(y[i, c] - y[i, j]) for j in range(y.shape[1]) if j != c and target[j] > 0]
            if gaps:
                a = min(a, max(0.0, 1 - 1e-6 / max(min(gaps), 1e-6)))
        out.append(target.clone() if a >= 1 else (1 - a) * y[i] + a * target)
    return torch.stack(out)
