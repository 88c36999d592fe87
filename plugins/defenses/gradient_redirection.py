"""``gradient_redirection``: GRAD² (Mazeika, Li, Forsyth, "How to Steer Your Adversary: Targeted and Efficient
Model Stealing Defenses with Gradient Redirection", ICML 2022), with StealGuard's solver.

MAD pushes the attacker's training update ``u(y~) = G^T y~`` *away* from the true one; GRAD² steers it
*towards* a chosen direction T in the surrogate's parameter space. Per row:

    y~ = argmax cos(u(v), T)   over v on the simplex with ||v - y||_1 <= epsilon      (Budget("l1", epsilon))

with G = d log F(x; w) / dw of the defender's fixed surrogate (as MAD: docs/concepts.md, "The geometry"), so that
``u(v) = J^T (v - c)`` and every inner product reduces to K x K terms (plugins.mad.geometry):
``<u(v), T> = (v - c)^T g`` and ``|u(v)|^2 = (v - c)^T M (v - c)``. Targets (``target``):

- ``reverse``: T = -u(y), the negative of the true update (GRAD²'s untargeted setting; the exact counterpart
  of MAD's objective): g = -M (y - c).
- ``least_likely``: T = u(e_l), the update the attacker would make if the label were the victim's least likely
  class l (ties: the first): g = M (e_l - c).
- ``shift``: T = u(e_l) with l = (top-1 + shift) mod K, a fixed label permutation (a targeted redirection:
  the clone is steered to answer class c + shift).
- ``random``: a fixed random unit direction T over the surrogate's parameters (the last layer's for
  ``jacobian="last_layer"``), drawn once from ``secret``: g = J T (computed with ``torch.func.jvp`` for
  ``jacobian="all"``; ``T_W h + T_b`` in closed form for the last layer, h its input).

``jacobian``: ``last_layer`` (closed form: c = p, M = I up to the scale |h|^2 + 1, one forward pass),
``all`` (M = J J^T by torch.func, plugins.mad.jacobian.gram_all) or ``identity`` (u(v) = v).
The solver is plugins.redirection (exact for the identity M and K <= 10: see its docstring).

Output: ``angular_deviation`` is angle(u(y~), u(y)) as for MAD; ``extras``: ``target_cosine`` (cos(u(y~), T)),
``initial_cosine`` (cos(u(y), T)) and ``target_class`` (l, or -1 for reverse/random), all per row.
Deterministic: no per-query randomness (the random direction is fixed per secret).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call, jvp

from plugins import redirection
from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput, check_num_classes, require_network
from plugins.mad import jacobian
from plugins.mad.geometry import Geometry, Reference, angle
from plugins.registry import register

_TINY = torch.finfo(torch.float64).tiny


class GradientRedirectionConfig(DefenseConfig):
    name: Literal["gradient_redirection"] = "gradient_redirection"
    epsilon: float = Field(
        default=0.5, ge=0, le=2, description="l1 budget per row: ||y~ - y||_1 <= epsilon (0 <= epsilon <= 2)"
    )
    target: Literal["reverse", "least_likely", "shift", "random"] = Field(
        default="reverse",
        description="direction the attacker's update is steered to: -u(y), u(least likely class), "
        "u(top-1 + shift), or a fixed random parameter direction",
    )
    shift: int = Field(
        default=1, ge=1, le=100_000, description="target='shift' only: the steered label is (top-1 + shift) mod K"
    )
    jacobian: Literal["last_layer", "all", "identity"] = Field(
        default="last_layer",
        description="G over the surrogate's last linear layer, all its parameters, or G = I",
    )
    params: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="jacobian='all' only: restrict G to these parameter names"
    )
    secret: str = Field(
        default="stealguard", min_length=1, description="target='random': seeds the fixed random direction"
    )
    refine_steps: int = Field(
        default=60, ge=0, le=10_000, description="jacobian='all': projected-gradient steps after the search"
    )
    jacobian_memory_mb: int = Field(
        default=256, ge=1, le=65536, description="jacobian='all': memory budget (MiB) for one chunk's Jacobian"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.params is not None and self.jacobian != "all":
            raise ValueError(f"params: only used with jacobian='all'; got jacobian={self.jacobian!r}")
        if self.shift != 1 and self.target != "shift":
            raise ValueError(f"shift: only used with target='shift'; got target={self.target!r}")
        return self


def _generator(secret: str) -> torch.Generator:
    digest = hashlib.blake2b(secret.encode("utf-8"), digest_size=8, person=b"sg-grad2").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@register
class GradientRedirection(Defense):
    name = "gradient_redirection"
    Config = GradientRedirectionConfig
    needs_inputs = True
    needs_surrogate = True

    def __init__(
        self,
        config: GradientRedirectionConfig,
        surrogate: nn.Module | None = None,
        num_classes: int | None = None,
        **resources: Any,
    ) -> None:
        super().__init__(config)
        self.surrogate = require_network("surrogate", surrogate, self.name)
        check_num_classes(num_classes)
        if num_classes is not None and config.target == "shift" and config.shift % num_classes == 0:
            raise ValueError(f"shift: must not be a multiple of num_classes={num_classes}; got {config.shift}")
        self.num_classes = num_classes
        self.layer: nn.Linear | None = None
        self.param_names: list[str] = []
        self._layer_checked = False
        self._direction: dict[str, torch.Tensor] | None = None
        if config.jacobian == "last_layer":
            _, self.layer = jacobian.last_linear_for(surrogate, num_classes)
            if config.target == "random":
                gen = _generator(config.secret)
                w = torch.randn(self.layer.out_features, self.layer.in_features, generator=gen, dtype=torch.float64)
                d = {"weight": w}
                if self.layer.bias is not None:
                    d["bias"] = torch.randn(self.layer.out_features, generator=gen, dtype=torch.float64)
                self._direction = _unit(d)
        elif config.jacobian == "all":
            self.param_names = jacobian.check_param_names(surrogate, config.params)
            if config.target == "random":
                gen = _generator(config.secret)
                params = dict(surrogate.named_parameters())
                d = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in self.param_names}
                self._direction = _unit(d)

    @property
    def budget(self) -> Budget:
        return Budget(norm="l1", epsilon=self.config.epsilon)

    # -- the reduced geometry and the target ----------------------------------------------------------------

    def _surrogate_input(self, inputs: Any, b: int) -> torch.Tensor:
        x = jacobian.as_surrogate_input(self.surrogate, inputs)
        if x.dim() == 0 or x.shape[0] != b:
            raise ValueError(f"inputs: need one input per row of probabilities ({b}); got shape {tuple(x.shape)}")
        return x

    def _check_classes(self, p: torch.Tensor, y: torch.Tensor) -> None:
        if p.shape != y.shape:
            raise ValueError(
                f"surrogate: returns {p.shape[1]} classes for {p.shape[0]} rows but the probabilities are "
                f"{y.shape[0]} x {y.shape[1]}; the surrogate must have the victim's architecture"
            )

    def problem(self, y: torch.Tensor, inputs: Any):
        """(geometry, g, |T| per row, target class per row) for this batch."""
        b, k = y.shape
        mode, target = self.config.jacobian, self.config.target
        h = None
        if mode == "identity":
            geometry = Geometry(centre=torch.zeros_like(y))
        elif mode == "last_layer":
            x = self._surrogate_input(inputs, b)
            captured: list[torch.Tensor] = []
            handle = self.layer.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
            try:
                p = jacobian.softmax_with_check(self.surrogate, x, None if self._layer_checked else self.layer)
            finally:
                handle.remove()
            self._layer_checked = self._layer_checked or b > 0
            self._check_classes(p, y)
            geometry = Geometry(centre=p)
            h = captured[-1].detach().to(torch.float64).reshape(b, -1)
        else:
            x = self._surrogate_input(inputs, b)
            p, gram = jacobian.gram_all(self.surrogate, x, self.param_names, self.config.jacobian_memory_mb << 20)
            self._check_classes(p, y)
            geometry = Geometry(centre=p, gram=gram)
        c = geometry.centre
        label = torch.full((b,), -1, dtype=torch.int64)
        if target == "random":
            g, t_norm = self._random_g(geometry, h, inputs, b, k)
            return geometry, g, t_norm, label
        if target == "reverse":
            w_minus_c = -(y - c)
        else:
            if target == "least_likely":
                label = y.argmin(dim=1)
            else:
                if self.config.shift % k == 0:
                    raise ValueError(f"shift: must not be a multiple of the number of classes K={k}")
                label = (y.argmax(dim=1) + self.config.shift) % k
            w_minus_c = torch.zeros_like(y).scatter_(1, label.unsqueeze(1), 1.0) - c
        g = geometry.apply(w_minus_c)
        t_norm = (w_minus_c * g).sum(dim=1).clamp_min(0).sqrt()
        return geometry, g, t_norm, label

    def _random_g(self, geometry: Geometry, h, inputs: Any, b: int, k: int):
        mode = self.config.jacobian
        ones = torch.ones(b, dtype=torch.float64)
        if mode == "identity":
            t = torch.randn(k, generator=_generator(self.config.secret), dtype=torch.float64)
            return (t / t.norm()).expand(b, k).clone(), ones
        if mode == "last_layer":
            d = self._direction
            g = h @ d["weight"].T
            scale = h.square().sum(dim=1)
            if "bias" in d:
                g = g + d["bias"]
                scale = scale + 1.0
            # M = I in the reduced geometry drops the factor |h|^2 (+ 1): put it back on g so that
            # num / sqrt(quad) is exactly cos(u(v), T) with |T| = 1.
            return g / scale.clamp_min(_TINY).sqrt().unsqueeze(1), ones
        x = self._surrogate_input(inputs, b)
        return self._jvp(x), ones

    def _jvp(self, x: torch.Tensor) -> torch.Tensor:
        """J T per row (B x K): the directional derivative of the surrogate's logits along T."""
        params = dict(self.surrogate.named_parameters())
        wrt = {n: params[n].detach() for n in self.param_names}
        fixed = {n: t.detach() for n, t in params.items() if n not in wrt}
        fixed.update({n: t.detach() for n, t in self.surrogate.named_buffers()})
        tangent = {n: self._direction[n].to(wrt[n].dtype) for n in self.param_names}

        def logits(theta: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.surrogate, {**fixed, **theta}, (x,))

        with torch.no_grad():
            _, out = jvp(logits, (wrt,), (tangent,))
        return out.to(torch.float64)

    # -- the defense ----------------------------------------------------------------------------------------

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        b = y.shape[0]
        if b == 0:
            zeros = torch.zeros(0, dtype=torch.float64)
            extras = {"target_cosine": zeros, "initial_cosine": zeros.clone(), "target_class": zeros.clone()}
            return DefenseOutput(probs=y.clone(), angular_deviation=zeros.clone(), extras=extras)
        if self.config.epsilon > 0:  # epsilon = 0 returns y bit for bit
            y = y / y.sum(dim=1, keepdim=True)
        geometry, g, t_norm, label = self.problem(y, inputs)
        c, gram = geometry.centre, geometry.gram
        y_tilde, _ = redirection.solve(y, c, g, gram, self.config.epsilon, self.config.refine_steps)
        denom = t_norm.clamp_min(_TINY)
        final = redirection.score(y_tilde, c, g, gram) / denom
        initial = redirection.score(y, c, g, gram) / denom
        if self.config.epsilon > 0:
            deviation = angle(Reference.of(geometry, y).cosine(y_tilde))
        else:
            deviation = torch.zeros(b, dtype=torch.float64)
        extras = {
            "target_cosine": final.clamp(-1, 1),
            "initial_cosine": initial.clamp(-1, 1),
            "target_class": label.to(torch.float64),
        }
        return DefenseOutput(probs=y_tilde, angular_deviation=deviation, extras=extras)


def _unit(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = torch.sqrt(sum(t.square().sum() for t in d.values()))
    return {n: t / norm for n, t in d.items()}
