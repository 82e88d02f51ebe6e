"""Argument syntax shared by the ``jax-attn`` commands.

A list of names takes one syntax everywhere: ``--implementations xla chunked``,
``--implementations xla,chunked`` and the two mixed mean the same.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["LIST_SYNTAX", "NameList", "add_name_list"]

LIST_SYNTAX = "space- or comma-separated"


class NameList(argparse.Action):
    """``nargs="+"`` whose values may also be comma-separated; repeating the flag adds."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        given = [values] if isinstance(values, str) else list(values or [])
        names = [name for value in given for name in str(value).split(",") if name]
        if not names:
            parser.error(f"{option_string} needs at least one name")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + names)


def add_name_list(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    metavar: str,
    help_text: str,
) -> None:
    """``flag NAME [NAME ...]`` (or ``NAME,NAME``) into a list, default ``None``."""
    parser.add_argument(
        flag,
        nargs="+",
        action=NameList,
        default=None,
        metavar=metavar,
        help=f"{help_text} ({LIST_SYNTAX})",
    )
