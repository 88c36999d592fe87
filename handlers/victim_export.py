"""The one owner of the victim export directory: the files train_victim (and train_misinformation) write, their
names, the input spec, and loading each runtime from them.

    <export>/
      state_dict.pt          torch.save of the eager module's state dict (rebuilt from input_spec's ``arch``)
      model.pt2              torch.export program, dynamic batch dimension
      model.torchscript.pt   torch.jit.script module
      model.onnx             ONNX, input ``x``, output ``logits``, dynamic batch dimension
      input_spec.json        arch, num_classes, output, dataset, shape, mean, std, classes (+ test_accuracy)
      index_to_name.json     TorchServe's class-name map

Every runtime returns logits. ``state_dict.pt`` and ``input_spec.json`` are what makes a directory an export (the
other runtimes' files are optional: the lab writes them only when asked). It lives in handlers/ because the
worker reads it too (handlers/registry.py fetches another version's victim); it imports no mlflow and no lab
code: the eager architectures are passed in (``mlflow_project.lab.models.ARCHITECTURES``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.config import LABELS_FILE, RUNTIMES
from handlers.runtimes import Runtime, TorchRuntime, load_file, load_state_dict

INPUT_SPEC = "input_spec.json"
LABELS = LABELS_FILE
FILES = {"eager": "state_dict.pt", "export": "model.pt2", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
REQUIRED = (FILES["eager"], INPUT_SPEC)
ALL_FILES = (*FILES.values(), INPUT_SPEC, LABELS)
if tuple(FILES) != RUNTIMES:  # one file per runtime the handler loads (handlers.config.RUNTIMES)
    raise ImportError(f"victim_export.FILES {tuple(FILES)} does not name one file per runtime {RUNTIMES}")

Exporter = Callable[[nn.Module, Path], None]


class NotAnExport(FileNotFoundError, ValueError):
    """The directory is not an export directory (a FileNotFoundError and a ValueError, as callers expected)."""


@dataclass(frozen=True)
class VictimExport:
    """An export directory. ``role`` and ``writer`` only word the errors (``misinformation`` /
    ``train_misinformation`` for adaptive_misinformation's model, which has the victim's layout)."""

    root: Path
    role: str = "victim"
    writer: str = "train_victim"

    # ------------------------------------------------------------------------------------------ finding one

    @staticmethod
    def is_export(path: str | Path) -> bool:
        """Whether ``path`` is an export directory (it holds the required files; :meth:`open` says what is
        missing)."""
        return all((Path(path) / name).is_file() for name in REQUIRED)

    @classmethod
    def open(cls, path: str | Path, role: str = "victim", writer: str = "train_victim") -> VictimExport:
        """The export directory ``path`` (a file inside it stands for its directory); raise
        :class:`NotAnExport` naming what is missing."""
        root = Path(path)
        if root.is_file():
            root = root.parent
        missing = [name for name in REQUIRED if not (root / name).is_file()]
        if missing:
            raise NotAnExport(
                f"{role}: {root} is not a {role} export directory: it is not a {writer} export directory "
                f"(missing {', '.join(missing)}; {writer} writes {', '.join(REQUIRED)} and the runtimes' files)"
            )
        return cls(root, role, writer)

    @classmethod
    def find(cls, under: str | Path, role: str = "victim", writer: str = "train_victim") -> VictimExport | None:
        """The first export directory at or below ``under`` (a downloaded artifact tree), or None."""
        under = Path(under)
        if not under.is_dir():
            return None
        found = sorted(under.rglob(INPUT_SPEC))
        return cls.open(found[0].parent, role, writer) if found else None

    # ------------------------------------------------------------------------------------------ the input spec

    @staticmethod
    def parse_spec(text: str | bytes, where: str = INPUT_SPEC) -> dict[str, Any]:
        """An input spec document (its JSON text); raise ValueError when it is not one."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{where}: not JSON: {exc}") from None
        missing = [k for k in ("arch", "num_classes", "shape") if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise ValueError(f"{where}: not an input spec (missing {', '.join(missing)})")
        return doc

    @cached_property
    def spec(self) -> dict[str, Any]:
        """The input spec document (input_spec.json)."""
        path = self.root / INPUT_SPEC
        return self.parse_spec(path.read_text(encoding="utf-8"), str(path))

    @property
    def arch(self) -> str:
        return str(self.spec["arch"])

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.spec["shape"]]

    @property
    def dataset(self) -> str | None:
        return self.spec.get("dataset")

    @property
    def labels(self) -> Path | None:
        """index_to_name.json when the export has it."""
        path = self.root / LABELS
        return path if path.is_file() else None

    # ------------------------------------------------------------------------------------------ the runtimes

    @staticmethod
    def relative(runtime: str) -> str:
        """The file name ``runtime`` is exported to (inside the directory)."""
        if runtime not in FILES:
            raise ValueError(f"runtime: unknown {runtime!r}; allowed: {', '.join(FILES)}")
        return FILES[runtime]

    def file(self, runtime: str) -> Path:
        """The file of ``runtime``; raise ValueError when this export has none."""
        path = self.root / self.relative(runtime)
        if not path.is_file():
            have = [r for r in FILES if (self.root / FILES[r]).is_file()]
            raise ValueError(f"{self.role}: {self.root} has no {path.name} for runtime {runtime!r} "
                             f"(this export has: {', '.join(have)})")
        return path

    def eager(self, architectures: Mapping[str, Callable[..., nn.Module]]) -> nn.Module:
        """The eager module: ``architectures[arch](num_classes=...)`` with the saved state dict, in eval mode."""
        if self.arch not in architectures:
            raise ValueError(f"{self.role}: {self.root}: architecture {self.arch!r} is not one of "
                             f"{', '.join(architectures)}")
        return load_state_dict(architectures[self.arch](num_classes=self.num_classes), self.file("eager"), self.role)

    def runtime(self, kind: str, architectures: Mapping[str, Callable[..., nn.Module]] | None = None,
                intra_op: int = 1, inter_op: int = 1) -> Runtime:
        """``kind`` loaded as a handlers.runtimes.Runtime (logits out); eager needs ``architectures``."""
        if kind == "eager":
            if architectures is None:
                raise ValueError("runtime 'eager' needs the architectures to rebuild the module from")
            return TorchRuntime(self.eager(architectures), "eager")
        return load_file(kind, str(self.file(kind)), intra_op, inter_op)

    # ------------------------------------------------------------------------------------------ writing one

    @classmethod
    def write(cls, out: str | Path, model: nn.Module, spec: Mapping[str, Any], classes: list[str],
              exporters: Mapping[str, Exporter] | None = None) -> tuple[VictimExport, dict[str, Path]]:
        """Write an export directory: the state dict, ``spec`` (input_spec.json), the labels, and each runtime of
        ``exporters`` (runtime -> ``save(model, path)``). Returns it and the paths written (by file name)."""
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
        model = model.eval()
        paths = {FILES["eager"]: root / FILES["eager"]}
        torch.save(model.state_dict(), paths[FILES["eager"]])
        for runtime, save in (exporters or {}).items():
            path = root / cls.relative(runtime)
            save(model, path)
            paths[path.name] = path
        doc = cls.parse_spec(json.dumps(dict(spec)), "spec")
        paths[INPUT_SPEC] = root / INPUT_SPEC
        paths[INPUT_SPEC].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        paths[LABELS] = root / LABELS
        paths[LABELS].write_text(json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2) + "\n",
                                 encoding="utf-8")
        return cls(root), paths
