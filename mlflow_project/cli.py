"""What every command-line entry point of mlflow_project shares."""

from __future__ import annotations

import argparse


def integer(value: str) -> int:
    """An argparse type for an integer parameter that MLflow may render as a float string ("12.0")."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {value!r}") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer; got {value!r}")
    return int(number)
