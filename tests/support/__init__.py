"""Helpers that tests (unit, handler, lab, integration) and bench/ share: victims exported in every runtime
(victims), a TorchServe launcher for tests (torchserve), an MLflow tracking server (mlflow_server), a
surrogate that raises on a sentinel input (booby_model), an in-process handler over a staged archive
(handler) and the parser of TorchServe's metric log lines (metrics_log). No test lives here."""
