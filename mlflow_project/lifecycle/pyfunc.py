"""The registered defense as an MLflow pyfunc model (models-from-code).

    model = mlflow.pyfunc.load_model("models:/<victim>-defense@production")
    probs = model.predict(x)      # x: N x <input shape> float32 array -> N x K defended probabilities

``predict`` runs the bundled victim and the bundled defense (with the bundled surrogate, and misinformation model
for adaptive_misinformation: bundle.DefendedVictim) through the TorchServe handler's own pipeline
(handlers.service.DefendedPipeline), output and budget checks included: offline batch scoring gives the same
defended probabilities as the server, a defense that fails at load refuses to load (ConfigError) and a batch
the defense fails on raises DefenseFailed, never an undefended answer. This file is what MLflow logs as the model's
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
        self.input_shape = tuple(self.defended.bundle.victim_export.shape)

    def predict(self, context, model_input, params=None):  # no type hints: the logged signature is the schema
        x = np.asarray(model_input, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input: expected N x {list(self.input_shape)}; got shape {list(x.shape)}")
        return self.defended(torch.from_numpy(x)).probs.numpy()


mlflow.models.set_model(DefensePyfunc())
