"""The surrogate's side of MAD: its softmax, its last linear layer, and per-sample Gram matrices J J^T.

``jacobian="last_layer"`` needs the surrogate's logits to be the output of a linear layer. The layer is found
as follows: if the surrogate has an attribute ``last_layer`` (an ``nn.Linear``, or the dotted name of a
submodule that is one) that layer is used; otherwise the last ``nn.Linear`` in ``surrogate.modules()`` order.
On the first batch a forward hook checks that softmax(surrogate output) equals softmax(that layer's output)
(so a trailing log_softmax is fine, anything else after the layer is refused with a ValueError).

``jacobian="all"``: per sample, J = d logits / d params (K x D) by ``torch.func`` (functional_call + vmap +
jacrev), and M = J J^T (K x K) summed over parameter tensors; the batch is processed in chunks so that the
per-chunk Jacobian stays within a memory budget (D x K x chunk x element size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

SOFTMAX_CHECK_TOL = 1e-5  # how far softmax(output) may be from softmax(last linear output) on the first batch


def find_last_linear(surrogate: nn.Module) -> tuple[str, nn.Linear]:
    """The surrogate's last linear layer and its name (see the module docstring for the rule)."""
    explicit = getattr(surrogate, "last_layer", None)
    if explicit is not None:
        if isinstance(explicit, str):
            try:
                layer = surrogate.get_submodule(explicit)
            except AttributeError:
                raise ValueError(f"surrogate: attribute last_layer={explicit!r} names no submodule") from None
            name = explicit
        else:
            layer = explicit
            name = next((n for n, m in surrogate.named_modules() if m is explicit), "last_layer")
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"surrogate: last_layer must be an nn.Linear (or the name of one); got {type(layer).__name__}"
            )
        return name, layer
    found = [(n, m) for n, m in surrogate.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            "jacobian: 'last_layer' needs a surrogate whose logits come from an nn.Linear (found none; set a "
            "'last_layer' attribute on the surrogate, or use jacobian='all' or 'identity')"
        )
    return found[-1]



def last_linear_for(surrogate: nn.Module, num_classes: int | None) -> tuple[str, nn.Linear]:
    """:func:`find_last_linear`, checked against the victim's class count when it is known."""
    name, layer = find_last_linear(surrogate)
    if num_classes is not None and layer.out_features != num_classes:
        raise ValueError(
            f"surrogate: its last nn.Linear '{name}' has {layer.out_features} outputs but num_classes={num_classes}"
        )
    return name, layer

def surrogate_dtype(surrogate: nn.Module) -> torch.dtype:
    for tensor in surrogate.parameters():
        if torch.is_floating_point(tensor):
            return tensor.dtype
    return torch.float32


def as_surrogate_input(surrogate: nn.Module, inputs: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The inputs as a tensor for the surrogate: floating inputs cast to ``dtype`` (default: the dtype of
    the surrogate's first floating parameter, see ``surrogate_dtype``)."""
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
    if torch.is_floating_point(x):  # integer inputs (e.g. token ids) are passed as they are
        x = x.to(surrogate_dtype(surrogate) if dtype is None else dtype)
    return x.detach()


def softmax_with_check(surrogate: nn.Module, x: torch.Tensor, layer: nn.Linear | None) -> torch.Tensor:
    """The surrogate's softmax (B x K, float64), no gradients. With ``layer``, also check (once per call)
    that the logits are that layer's output up to a per-row shift; raise ValueError otherwise."""
    captured: list[torch.Tensor] = []
    handle = None
    if layer is not None:
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = surrogate(x)
    finally:
        if handle is not None:
            handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"surrogate: must map the batch of inputs to B x K logits; got {shape}")
    p = torch.softmax(logits.to(torch.float64), dim=1)
    if layer is not None:
        if not captured or captured[-1].shape != logits.shape:
            raise ValueError(
                "jacobian: 'last_layer' found the surrogate's last nn.Linear but its output is not the "
                "surrogate's output; set a 'last_layer' attribute on the surrogate or use jacobian='all'"
            )
        q = torch.softmax(captured[-1].to(torch.float64), dim=1)
        worst = (q - p).abs().max().item() if p.numel() else 0.0
        if worst > SOFTMAX_CHECK_TOL:
            raise ValueError(
                "jacobian: 'last_layer' needs the surrogate's logits to be its last nn.Linear's output "
                f"(up to a per-row shift such as log_softmax); softmaxes differ by {worst:.3g}. "
                "Set a 'last_layer' attribute on the surrogate or use jacobian='all'"
            )
    return p


def check_param_names(surrogate: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The parameter names jacobian='all' differentiates: all floating parameters, or the named ones."""
    available = [n for n, t in surrogate.named_parameters() if torch.is_floating_point(t)]
    if names is None:
        if not available:
            raise ValueError("surrogate: jacobian='all' needs a surrogate with floating-point parameters")
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"params: unknown parameter name(s) {unknown}; the surrogate has: {', '.join(available)}"
        )
    return list(dict.fromkeys(names))


def chunk_size(num_classes: int, num_params: int, element_size: int, memory_bytes: int) -> int:
    """Samples per chunk so that one chunk's Jacobian (and as much again for jacrev's work) fits."""
    per_sample = max(1, 2 * num_classes * num_params * element_size)
    return max(1, memory_bytes // per_sample)


def gram_all(
    surrogate: nn.Module, x: torch.Tensor, names: Sequence[str], memory_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample softmax p (B x K, float64) and Gram M = J J^T (B x K x K, float64), J = dlogits/dparams."""
    params = dict(surrogate.named_parameters())
    buffers = dict(surrogate.named_buffers())
    wrt = {n: params[n].detach() for n in names}
    fixed = {n: t.detach() for n, t in params.items() if n not in wrt}
    fixed.update({n: t.detach() for n, t in buffers.items()})

    def logits_one(theta: dict[str, torch.Tensor], xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = functional_call(surrogate, {**fixed, **theta}, (xi.unsqueeze(0),)).squeeze(0)
        return z, z

    per_sample = vmap(jacrev(logits_one, has_aux=True), in_dims=(None, 0))
    num_params = sum(t.numel() for t in wrt.values())
    element = next(iter(wrt.values())).element_size()
    grams, probs = [], []
    with torch.no_grad():  # torch.func's own transforms still differentiate; nothing leaks to autograd
        probe = surrogate(x[:1]) if x.shape[0] else None
        k = probe.shape[1] if probe is not None else 1
        step = chunk_size(k, num_params, element, memory_bytes)
        for start in range(0, x.shape[0], step):
            jac, logits = per_sample(wrt, x[start : start + step])
            gram = None
            for j in jac.values():
                # Each parameter tensor's K x K block in the Jacobian's own dtype (no D-sized float64 copy);
                # the blocks are summed in float64.
                flat = j.reshape(j.shape[0], j.shape[1], -1)
                part = torch.bmm(flat, flat.transpose(1, 2)).to(torch.float64)
                gram = part if gram is None else gram + part
            grams.append(gram)
            probs.append(torch.softmax(logits.to(torch.float64), dim=1))
    if not grams:
        return torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, 1, 1, dtype=torch.float64)
    return torch.cat(probs), torch.cat(grams)
