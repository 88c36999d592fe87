"""StealGuard's TorchServe adapter: one thin handler class over runtimes, a request codec and metric emission.

``handlers`` imports ``plugins`` (the defenses) and ``ts`` (TorchServe) but never ``mlflow``. A .mar archive
carries its own copy of ``handlers/`` and ``plugins/``; the handler file puts the archive's directory on
``sys.path`` so those copies are the ones imported. Third-party distributions an archive ships (``package
--extra-dist``) sit in its ``pylib/`` directory, which the handler also puts on ``sys.path`` (with their
``*.dist-info``, so the ``stealguard.defenses`` entry points resolve in the worker).
"""

EXTRA_CODE_DIR = "pylib"
