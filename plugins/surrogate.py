"""The defender's fixed surrogate for MAD: the victim's architecture, randomly initialised from a seed.

``make_surrogate(victim_or_arch, seed)`` accepts
- a victim ``nn.Module`` instance: it is deep-copied (dtype, device and structure kept) and every submodule
  with its own parameters or buffers is re-initialised by its ``reset_parameters()``; a submodule that owns
  parameters but has no ``reset_parameters()`` cannot be re-initialised generically and raises ValueError;
- an ``nn.Module`` subclass or any zero-argument factory returning a module (e.g.
  ``functools.partial(LeNet, num_classes=10)``): it is called.
Either way the random draws come from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the
result depends only on the architecture and the seed, and the caller's global RNG state is left untouched.
The surrogate is returned in eval mode with ``requires_grad`` off on every parameter (MAD's ``jacobian='all'``
differentiates with torch.func, which needs no ``requires_grad``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

Architecture = nn.Module | type[nn.Module] | Callable[[], nn.Module]


def make_surrogate(victim_or_arch: Architecture, seed: int) -> nn.Module:
    """A deterministic, randomly initialised copy of the victim's architecture (eval mode, no grad)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: must be an integer in [0, 2**63); got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(victim_or_arch, nn.Module):
            surrogate = copy.deepcopy(victim_or_arch)
            reinitialise(surrogate)
        elif callable(victim_or_arch):
            surrogate = victim_or_arch()
            if not isinstance(surrogate, nn.Module):
                raise ValueError(
                    "victim_or_arch: a factory must return a torch.nn.Module; "
                    f"got {type(surrogate).__name__}"
                )
        else:
            raise ValueError(
                "victim_or_arch: expected a victim nn.Module, an nn.Module class or a factory; "
                f"got {type(victim_or_arch).__name__}"
            )
    surrogate.eval()
    surrogate.requires_grad_(False)
    return surrogate


def reinitialise(module: nn.Module) -> None:
    """Re-draw every parameter of ``module`` (in module order) with each submodule's ``reset_parameters``."""
    for name, sub in module.named_modules():
        owns = list(sub.parameters(recurse=False)) + list(sub.buffers(recurse=False))
        if not owns:
            continue
        reset = getattr(sub, "reset_parameters", None)
        if not callable(reset):
            raise ValueError(
                f"victim_or_arch: submodule '{name or type(sub).__name__}' ({type(sub).__name__}) has "
                "parameters but no reset_parameters(); pass the architecture class or a factory instead"
            )
        with torch.no_grad():
            reset()
