"""StealGuard's TorchServe adapter: one thin handler class over runtimes, a request codec and metric emission.

``handlers`` imports ``plugins`` (the defenses) and ``ts`` (TorchServe) but never ``mlflow``. A .mar archive
carries its own copy of ``handlers/`` and ``plugins/``; the handler file puts the archive's directory on
``sys.path`` so those copies are the ones imported.
"""
