"""``label_only``: one-hot of each row's own top-1 class (the paper's top-1 / argmax baseline)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from plugins.base import Defense, DefenseConfig, DefenseOutput
from plugins.registry import register
from plugins.simplex import one_hot_rows, top1


class LabelOnlyConfig(DefenseConfig):
    name: Literal["label_only"] = "label_only"


@register
class LabelOnly(Defense):
    name = "label_only"
    Config = LabelOnlyConfig

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        # Each row's own argmax: not one column set in every row.
        return DefenseOutput(probs=one_hot_rows(top1(y), y.shape[1], y.dtype))
