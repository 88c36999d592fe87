"""The registered defense as an MLflow pyfunc model (models-from-code).

    model = mlflow.pyfunc.load_model("models:/<victim>-defense@production")
    probs = model.predict(x)      # x: N x <input shape> float32 array -> N x K defended probabilities

``predict`` runs the bundled victim and the bundled defense (with the bundled surrogate, and misinformation model
for adaptive_misinformation: bundle.DefendedVictim) exactly as the TorchServe handler does, so offline
batch scoring gives the same defended probabilities as the server. This file is what MLflow logs as the model's
code (``python_model=<this file>``); the bundle directory is its single artifact, ``bundle``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from mlflow_project.lifecycle.bundle import DefendedVictim, read_bundle


class DefensePyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        self.defended = DefendedVictim(read_bundle(context.artifacts["bundle"]))
        self.input_shape = tuple(self.defended.bundle.input_spec["shape"])

    def predict(self, context, model_input, params=None):  # no type hints: the logged signature is the schema
        x = np.asarray(model_input, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input: expected N x {list(self.input_shape)}; got shape {list(x.shape)}")
        return self.defended(torch.from_numpy(x)).probs.numpy()


mlflow.models.set_model(DefensePyfunc())
