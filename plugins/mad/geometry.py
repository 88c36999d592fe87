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

This module is the one home of what ``mad``, ``mad_argmax`` and ``gradient_redirection`` (plugins.redirection)
share about the surrogate: ``SurrogateGeometry`` (the surrogate checked once at build time, then one
``Geometry`` per batch, with the same input-count and class-count checks), the class-subset table
``subset_masks`` and the class count up to which a search over subsets is exhaustive
(``EXHAUSTIVE_MAX_CLASSES``). See docs/concepts.md ("MAD, precisely").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from plugins.base import check_num_classes, require_network
from plugins.mad import jacobian

_TINY = torch.finfo(torch.float64).tiny

# Up to this many classes the subset searches (mad_argmax's subsets containing the top class,
# gradient_redirection's budget vertices) score every subset; above it they are greedy.
EXHAUSTIVE_MAX_CLASSES = 10


def subset_masks(num_classes: int) -> torch.Tensor:
    """Every subset of K classes, the empty one included, as 0/1 rows (2^K x K, float64): row i holds the
    bits of i (class k is in subset i iff bit k of i is set), so row 0 is the empty set."""
    codes = torch.arange(2**num_classes, dtype=torch.int64)
    return ((codes.unsqueeze(1) >> torch.arange(num_classes, dtype=torch.int64)) & 1).to(torch.float64)


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


class SurrogateGeometry:
    """The defender's surrogate seen through one ``jacobian`` mode, checked once at build time (a network is
    given, num_classes >= 2, the last linear layer matches num_classes, the named parameters exist); ``of``
    gives each batch's Geometry (``last_layer``: one forward pass, whose softmax is checked against the last
    linear layer on the first non-empty batch; ``all``: M = J J^T; ``identity``: the surrogate is not run)."""

    def __init__(
        self,
        surrogate: nn.Module | None,
        num_classes: int | None,
        mode: str,
        params: Sequence[str] | None,
        memory_mb: int,
        defense: str,
    ) -> None:
        self.surrogate = require_network("surrogate", surrogate, defense)
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.mode = mode
        self.memory_bytes = memory_mb << 20
        self.last_layer_name: str | None = None
        self.last_layer: nn.Linear | None = None
        self.param_names: list[str] = []
        if mode == "last_layer":
            self.last_layer_name, self.last_layer = jacobian.last_linear_for(self.surrogate, num_classes)
        elif mode == "all":
            self.param_names = jacobian.check_param_names(self.surrogate, params)
        self._layer_checked = False
        # The surrogate's first floating parameter, kept so that each batch reads the input dtype from it
        # instead of walking surrogate.parameters() (Module.double() etc. convert it in place).
        self._dtype_probe = next((t for t in self.surrogate.parameters() if torch.is_floating_point(t)), None)

    def input(self, inputs: Any, rows: int) -> torch.Tensor:
        """The inputs as the surrogate's tensor, one per row of probabilities (else ValueError)."""
        dtype = torch.float32 if self._dtype_probe is None else self._dtype_probe.dtype
        x = jacobian.as_surrogate_input(self.surrogate, inputs, dtype)
        if x.dim() == 0 or x.shape[0] != rows:
            raise ValueError(f"inputs: need one input per row of probabilities ({rows}); got shape {tuple(x.shape)}")
        return x

    def of(self, y: torch.Tensor, inputs: Any, hidden: bool = False) -> tuple[Geometry, torch.Tensor | None]:
        """This batch's Geometry and, with ``hidden`` and jacobian='last_layer', the last linear layer's input
        h per row (B x H float64; None otherwise)."""
        if self.mode == "identity":
            return identity_geometry(y), None
        x = self.input(inputs, y.shape[0])
        if self.mode == "all":
            p, gram = jacobian.gram_all(self.surrogate, x, self.param_names, self.memory_bytes)
            _check_classes(p, y)
            return all_params_geometry(p, gram), None
        captured: list[torch.Tensor] = []
        handle = self.last_layer.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0])) if hidden else None
        try:
            p = jacobian.softmax_with_check(self.surrogate, x, None if self._layer_checked else self.last_layer)
        finally:
            if handle is not None:
                handle.remove()
        self._layer_checked = self._layer_checked or x.shape[0] > 0
        _check_classes(p, y)
        h = captured[-1].detach().to(torch.float64).reshape(y.shape[0], -1) if hidden else None
        return last_layer_geometry(p), h


def _check_classes(p: torch.Tensor, y: torch.Tensor) -> None:
    if p.shape != y.shape:
        raise ValueError(
            f"surrogate: returns {p.shape[1]} classes for {p.shape[0]} rows but the probabilities are "
            f"{y.shape[0]} x {y.shape[1]}; the surrogate must have the victim's architecture"
        )
