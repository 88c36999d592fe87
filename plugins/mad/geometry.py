"""The space MAD measures angles in, reduced to K x K per row.

The attacker's update for a posterior v is ``u(v) = G^T v`` with ``G = d log F(x; w) / dw`` (K x D). Writing
``log F = z - logsumexp(z)`` for the logits z, row k of G is ``(e_k - p)^T J`` (J = dz/dw, p the softmax), so
``u(v) = J^T (v - p)`` for every v on the simplex and every inner product MAD needs is

    <u(v), u(w)> = (v - c)^T M (w - c)        with a per-row centre c and Gram matrix M (K x K).

``Geometry`` holds c and M for a batch (``gram=None`` means M = I):

- ``jacobian="last_layer"``: J over the last linear layer (z = W h + b) is ``e_k h^T`` (and ``e_k`` for the
  bias), so M = (|h|^2 + 1) I. A positive scale changes no angle, so c = p and M = I: the angle depends only
  on the surrogate's softmax p and costs one forward pass.
- ``jacobian="all"``: c = p and M = J J^T, J the Jacobian of the logits w.r.t. all (or the named) parameters.
- ``jacobian="identity"``: the paper's G = I ablation, u(v) = v: c = 0 and M = I.

Everything here is float64 and batched; the angle between u(v) and u(y) is
``cos = (v - c)^T M (y - c) / sqrt((v - c)^T M (v - c) * (y - c)^T M (y - c))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class Geometry:
    """Per-row centre ``c`` (B x K) and Gram matrix ``M`` (B x K x K, or None for the identity), float64."""

    centre: torch.Tensor
    gram: torch.Tensor | None = None

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """M v for a B x K batch of vectors (one per row)."""
        if self.gram is None:
            return v
        return torch.bmm(self.gram, v.unsqueeze(2)).squeeze(2)

    def diagonal(self) -> torch.Tensor:
        """diag(M) per row (B x K)."""
        if self.gram is None:
            return torch.ones_like(self.centre)
        return torch.diagonal(self.gram, dim1=1, dim2=2)


@dataclass(frozen=True)
class Reference:
    """What every candidate's score needs about a row's own posterior y: the terms of (v - c)^T M (y - c)
    and (v - c)^T M (v - c) that do not depend on v."""

    geometry: Geometry
    m_r: torch.Tensor  # M (y - c), B x K
    r_m_r: torch.Tensor  # (y - c)^T M (y - c), B
    m_c: torch.Tensor  # M c, B x K
    c_m_c: torch.Tensor  # c^T M c, B
    c_m_r: torch.Tensor  # c^T M (y - c), B

    @classmethod
    def of(cls, geometry: Geometry, y: torch.Tensor) -> Reference:
        c = geometry.centre
        r = y - c
        m_r = geometry.apply(r)
        m_c = geometry.apply(c)
        return cls(
            geometry=geometry,
            m_r=m_r,
            r_m_r=(r * m_r).sum(1),
            m_c=m_c,
            c_m_c=(c * m_c).sum(1),
            c_m_r=(c * m_r).sum(1),
        )

    def cosine_from_terms(
        self, v_m_r: torch.Tensor, v_m_v: torch.Tensor | float, v_m_c: torch.Tensor
    ) -> torch.Tensor:
        """cos angle(u(v), u(y)) from v^T M r, v^T M v and v^T M c (each B or B x C; v^T M v may be a
        number shared by every row and candidate)."""
        extra = (lambda t: t.unsqueeze(1)) if v_m_r.dim() == 2 else (lambda t: t)
        num = v_m_r - extra(self.c_m_r)
        den = (v_m_v - 2 * v_m_c + extra(self.c_m_c)).clamp_min(0) * extra(self.r_m_r)
        # A zero vector (u(v) = 0 or u(y) = 0) has no direction: its cosine is reported as 0 (a right angle).
        return (num / den.clamp_min(_TINY).sqrt()).clamp(-1.0, 1.0)

    def cosine(self, v: torch.Tensor) -> torch.Tensor:
        """cos angle(u(v), u(y)) for one arbitrary vector v per row (B x K) -> B."""
        m_v = self.geometry.apply(v)
        return self.cosine_from_terms((v * self.m_r).sum(1), (v * m_v).sum(1), (v * self.m_c).sum(1))

    def cosines(self, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        """cos angle(u(v), u(y)) for several vectors per row at once (each B x K) -> B x len(vs). With M = I
        the vectors are stacked and scored by one set of ops (the same values as one ``cosine`` call each)."""
        if self.geometry.gram is not None:
            return torch.stack([self.cosine(v) for v in vs], dim=1)
        v = torch.stack(tuple(vs), dim=1)  # B x N x K
        m_r, m_c = self.m_r.unsqueeze(1), self.m_c.unsqueeze(1)
        return self.cosine_from_terms((v * m_r).sum(2), (v * v).sum(2), (v * m_c).sum(2))

    def vertex_cosines(self) -> torch.Tensor:
        """cos for every one-hot vertex e_k (B x K)."""
        diag = 1.0 if self.geometry.gram is None else self.geometry.diagonal()  # e_k^T M e_k
        return self.cosine_from_terms(self.m_r, diag, self.m_c)

    def subset_cosines(self, masks: torch.Tensor) -> torch.Tensor:
        """cos for the uniform distribution over each subset in ``masks`` (C x K of 0/1, shared) -> B x C."""
        size = masks.sum(1)  # C
        v_m_r = (self.m_r @ masks.T) / size
        v_m_c = (self.m_c @ masks.T) / size
        if self.geometry.gram is None:
            v_m_v = (1.0 / size).expand_as(v_m_r)
        else:
            # 1_S^T M 1_S for every row and subset: (masks M_b) . masks, summed over classes.
            v_m_v = torch.einsum("ck,bkl,cl->bc", masks, self.geometry.gram, masks) / size.square()
        return self.cosine_from_terms(v_m_r, v_m_v, v_m_c)


def angle(cosine: torch.Tensor) -> torch.Tensor:
    """Radians from a cosine (clamped into [-1, 1])."""
    return torch.arccos(cosine.clamp(-1.0, 1.0))


def last_layer_geometry(p: torch.Tensor) -> Geometry:
    """Geometry for G over the surrogate's last linear layer: centre p, M = I (see the module docstring)."""
    return Geometry(centre=p.to(torch.float64))


def identity_geometry(y: torch.Tensor) -> Geometry:
    """Geometry for the G = I ablation: u(v) = v."""
    return Geometry(centre=torch.zeros_like(y, dtype=torch.float64))


def all_params_geometry(p: torch.Tensor, gram: torch.Tensor) -> Geometry:
    """Geometry for G over all (or the named) parameters: centre p, M = J J^T."""
    return Geometry(centre=p.to(torch.float64), gram=gram.to(torch.float64))
