"""``jax-attn`` command line: ``demo``, ``check``, ``bench``, ``plot``, ``train``.

Each subcommand lives in its own module with a ``main(argv) -> int`` and its own
argument parser, whose ``--help`` lists every option; this file only routes to it.
``jax-attn bench --mesh ...`` goes straight to :mod:`jax_attn.apps.bench_mesh`, which sets
the CPU device count before jax is imported (``bench`` imports jax).
"""

from __future__ import annotations

import importlib
import sys

from jax_attn.apps.extras import MissingExtra

COMMANDS = {
    "demo": (
        "jax_attn.apps.demo",
        "walk chapter 3 on the book's sentence and check GPT-2 attention",
    ),
    "check": ("jax_attn.apps.check", "every implementation against the reference on this device"),
    "bench": ("jax_attn.apps.bench", "this library and its peers side by side"),
    "plot": ("jax_attn.apps.plots", "attention heatmaps for a sentence"),
    "train": ("jax_attn.apps.train", "train a small decoder and generate with the KV cache"),
}


def usage() -> str:
    lines = ["usage: jax-attn COMMAND [options]   (jax-attn COMMAND --help for its options)", ""]
    lines += [f"  {name:<7} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"jax-attn: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[command][0]
    if command == "bench" and any(a == "--mesh" or a.startswith("--mesh=") for a in rest):
        module_name = "jax_attn.apps.bench_mesh"
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except MissingExtra as error:
        print(f"jax-attn {command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
