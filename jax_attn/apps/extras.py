"""The apps' optional dependencies (the ``apps`` extra): imported with an error that says
how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL", "MissingExtra", "require"]

INSTALL = 'pip install "jax_attn[apps]"'


class MissingExtra(ImportError):
    """An app needs a package of the ``apps`` extra that is not installed."""


def require(module: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingExtra(
            f"this command needs {package}, which is not installed: {INSTALL}"
        ) from error
