"""Candidate targets y* and the oracles that pick one per row, all batched.

- ``mad``: the K one-hot vertices of the simplex.
- ``mad_argmax``: uniform distributions over class subsets S that contain the row's top class c. For
  K <= EXHAUSTIVE_MAX_CLASSES every such subset (2^(K-1) of them) is scored at once; for larger K a greedy
  search starts from S = {c} and adds, one class per step, the class whose addition scores best (every
  remaining class is scored in one vectorised step), keeping the best subset seen, until at most
  ``max_candidates`` candidates per row have been scored.

Oracles: ``extreme`` picks the candidate with the largest angular deviation (smallest cosine), ``argmin`` the
one with the smallest deviation (the paper's ablation), ``random`` a uniformly random candidate drawn from the
row's own keyed seed (a uniform vertex for mad; a uniform subset containing c for mad_argmax, i.e. each
other class in S with probability 1/2). Ties go to the first candidate in enumeration order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from plugins import seeding
from plugins.mad.geometry import EXHAUSTIVE_MAX_CLASSES, Reference, subset_masks

_TINY = torch.finfo(torch.float64).tiny

# Oracle -> sign applied to the cosine before taking the row-wise argmax.
_SIGN = {"extreme": -1.0, "argmin": 1.0}


def greedy_steps(num_classes: int, max_candidates: int) -> int:
    """How many classes the greedy search may add to {c} while scoring at most max_candidates per row."""
    used, steps = 1, 0
    while steps + 1 < num_classes and used + (num_classes - 1 - steps) <= max_candidates:
        used += num_classes - 1 - steps
        steps += 1
    return steps


def greedy_candidates_scored(num_classes: int, max_candidates: int) -> int:
    steps = greedy_steps(num_classes, max_candidates)
    return 1 + sum(num_classes - 1 - s for s in range(steps))


def _pick(score: torch.Tensor, oracle: str) -> torch.Tensor:
    """Row-wise index of the first candidate maximising ``_SIGN[oracle] * score`` (B x C -> B): the smallest
    score for ``extreme``, the largest for ``argmin`` (the same index as the argmax of the signed score,
    ties included, without multiplying by the sign)."""
    return score.argmin(dim=1) if _SIGN[oracle] < 0 else score.argmax(dim=1)


def vertex_target(ref: Reference, oracle: str) -> torch.Tensor:
    """The chosen one-hot vertex per row (B x K)."""
    with torch.inference_mode():  # only the chosen index leaves the block
        best = _pick(ref.vertex_cosines(), oracle)
    return _eye(ref.m_r.shape[1])[best]


@dataclass(frozen=True)
class ExhaustiveTables:
    """Constant tables for the exhaustive mad_argmax search over K classes, built once per K (shared: never
    modify them in place; indexing them returns fresh tensors).

    - ``others``: K x (K-1) int64, row c = every class but c in increasing order.
    - ``table``: 2^(K-1) x (K-1) float64 of 0/1; code i = the subset {c} + {others[c][j] : bit j of i set}.
    - ``size``: 2^(K-1), |S| = 1 + table.sum(1); ``inv_size`` = 1 / size.
    - ``targets``: K x 2^(K-1) x K, targets[c, i] = the uniform distribution over code i's subset for top c.
    """

    others: torch.Tensor
    table: torch.Tensor
    size: torch.Tensor
    inv_size: torch.Tensor
    targets: torch.Tensor


@functools.lru_cache(maxsize=EXHAUSTIVE_MAX_CLASSES + 1)
def exhaustive_tables(num_classes: int) -> ExhaustiveTables:
    """The (cached) constant tables of the exhaustive search for K = num_classes (2 <= K <= 10 in use)."""
    k = num_classes
    with torch.inference_mode(False):  # plain tensors even if first asked for inside inference mode
        ar = torch.arange(k - 1)
        top = torch.arange(k)
        others = ar.unsqueeze(0) + (ar.unsqueeze(0) >= top.unsqueeze(1)).to(torch.int64)
        table = subset_masks(k - 1)  # code 0 (the empty set of others): S = {c}
        size = 1.0 + table.sum(1)
        members = torch.zeros(k, table.shape[0], k, dtype=torch.float64)
        members.scatter_(2, others.unsqueeze(1).expand(k, table.shape[0], k - 1), table.expand(k, -1, -1))
        members[top, :, top] = 1.0
        targets = members / size.unsqueeze(1)
        inv_size = 1.0 / size
    return ExhaustiveTables(others=others, table=table, size=size, inv_size=inv_size, targets=targets)


@functools.lru_cache(maxsize=16)
def _eye(num_classes: int) -> torch.Tensor:
    """The K one-hot vertices (K x K float64), shared: only ever indexed."""
    with torch.inference_mode(False):
        return torch.eye(num_classes, dtype=torch.float64)


def subset_target_exhaustive(ref: Reference, top: torch.Tensor, oracle: str) -> torch.Tensor:
    """The chosen subset's uniform distribution per row among all 2^(K-1) subsets that contain the row's top.

    Each row's other classes (all but c, in increasing order) are gathered into K - 1 columns, so one shared
    (2^(K-1) x (K-1)) table of subsets serves every row and every sum over a subset is one matrix product.
    Candidates are ranked by ``(v - c)^T M r / sqrt((v - c)^T M (v - c))``, i.e. by the cosine times the
    row's positive constant sqrt(r^T M r); code i of the table is S = {c} + {others whose bit is set in i}.
    The tables are built once per K (``exhaustive_tables``).
    """
    tables = exhaustive_tables(ref.m_r.shape[1])
    with torch.inference_mode():  # only the chosen code leaves the block
        best = _score_subsets(ref, top, tables, oracle)
    return tables.targets[top, best]


def _score_subsets(ref: Reference, top: torch.Tensor, tables: ExhaustiveTables, oracle: str) -> torch.Tensor:
    """The chosen code (row of ``tables.table``) per row (B,); see subset_target_exhaustive."""
    b, k = ref.m_r.shape
    table, size = tables.table, tables.size
    others = tables.others[top]  # B x (K-1)
    top1 = top.unsqueeze(1)
    sum_m_r = ref.m_r.gather(1, others) @ table.T + ref.m_r.gather(1, top1)
    sum_m_c = ref.m_c.gather(1, others) @ table.T + ref.m_c.gather(1, top1)
    gram = ref.geometry.gram
    if gram is None:
        v_m_v = tables.inv_size
    else:
        m_oo = gram.gather(1, others.unsqueeze(2).expand(b, k - 1, k)).gather(2, others.unsqueeze(1).expand(
            b, k - 1, k - 1))
        m_cc = gram.gather(1, top1.unsqueeze(2).expand(b, 1, k)).squeeze(1)  # row c of M, B x K
        s_m_s = (
            m_cc.gather(1, top1)
            + 2 * m_cc.gather(1, others) @ table.T
            + torch.einsum("ck,bkl,cl->bc", table, m_oo, table)
        )
        v_m_v = s_m_s / size.square()
    num = sum_m_r / size - ref.c_m_r.unsqueeze(1)
    den = (v_m_v - 2 * sum_m_c / size + ref.c_m_c.unsqueeze(1)).clamp_min(_TINY)
    return _pick(num * den.rsqrt(), oracle)


def subset_target_greedy(ref: Reference, top: torch.Tensor, oracle: str, max_candidates: int) -> torch.Tensor:
    """Greedy search over subsets containing the top class (see the module docstring); B x K target."""
    sign = _SIGN[oracle]
    b, k = ref.m_r.shape
    geometry = ref.geometry
    diag = geometry.diagonal()
    col_of = _column_getter(geometry.gram)
    rows = torch.arange(b)
    mask = torch.zeros(b, k, dtype=torch.bool)
    mask[rows, top] = True
    size = 1.0
    s_mr = ref.m_r[rows, top]
    s_mc = ref.m_c[rows, top]
    s_mm = diag[rows, top]
    col = col_of(top, mask)  # M 1_S, B x K
    best_score = sign * ref.cosine_from_terms(s_mr, s_mm, s_mc)
    best_mask = mask.clone()
    for _ in range(greedy_steps(k, max_candidates)):
        n1 = size + 1.0
        cos = ref.cosine_from_terms(
            (s_mr.unsqueeze(1) + ref.m_r) / n1,
            (s_mm.unsqueeze(1) + 2 * col + diag) / n1**2,
            (s_mc.unsqueeze(1) + ref.m_c) / n1,
        )
        score = (sign * cos).masked_fill(mask, -torch.inf)
        step_score, j = score.max(dim=1)
        s_mm = s_mm + 2 * col[rows, j] + diag[rows, j]
        s_mr = s_mr + ref.m_r[rows, j]
        s_mc = s_mc + ref.m_c[rows, j]
        mask = mask.clone()
        mask[rows, j] = True
        col = col + col_of(j, mask)
        size = n1
        improved = step_score > best_score
        best_score = torch.where(improved, step_score, best_score)
        best_mask = torch.where(improved.unsqueeze(1), mask, best_mask)
    chosen = best_mask.to(torch.float64)
    return chosen / chosen.sum(dim=1, keepdim=True)


def _column_getter(gram: torch.Tensor | None):
    """A function giving column j of each row's M (B x K) for a batch of class indices j."""
    if gram is None:

        def identity_column(j: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.zeros(mask.shape, dtype=torch.float64).scatter_(1, j.unsqueeze(1), 1.0)

        return identity_column

    def gram_column(j: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        index = j.view(-1, 1, 1).expand(-1, gram.shape[1], 1)
        return gram.gather(2, index).squeeze(2)

    return gram_column


def random_vertex(seeds: np.ndarray, num_classes: int) -> torch.Tensor:
    """A uniformly random one-hot vertex per row from each row's seed (B x K)."""
    u = torch.from_numpy(seeding.uniform(seeds, 1))
    index = (u * num_classes).floor().to(torch.int64).clamp_(0, num_classes - 1)
    return torch.zeros(len(seeds), num_classes, dtype=torch.float64).scatter_(1, index, 1.0)


def random_subset(seeds: np.ndarray, top: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The uniform distribution over a uniformly random subset containing each row's top class (B x K)."""
    u = torch.from_numpy(seeding.uniform(seeds, num_classes))
    mask = u < 0.5
    mask[torch.arange(len(seeds)), top] = True
    chosen = mask.to(torch.float64)
    return chosen / chosen.sum(dim=1, keepdim=True)
