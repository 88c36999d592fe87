"""Save a torch network for the non-eager runtimes the handler loads, with a dynamic batch dimension.

One place for the export settings that train_victim (the victim's exports), package (a surrogate converted for
serving) and the tests' small victims share: the first input dimension is the batch (1 .. MAX_BATCH), ONNX
input/output names ``x`` / ``logits`` (what handlers.runtimes and the ONNX checks read), weights inside the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MAX_BATCH = 65536


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def save_program(net: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """``torch.export`` ``net`` on ``example`` (batch dimension dynamic) and save the program to ``path``."""
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=_dynamic_batch()), str(path))


def save_onnx(net: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """Export ``net`` to ONNX at ``path`` (dynamo exporter, batch dimension dynamic, input ``x``, output
    ``logits``, weights embedded)."""
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=_dynamic_batch(),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
