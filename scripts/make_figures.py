"""Regenerates every figure committed under ``docs/figures`` in one command.

    python scripts/make_figures.py        # same as: jax-attn plot --all

The figures come from :func:`jax_attn.plots.sentence_figures` on the book's sentence
(fixed seeds), so rerunning gives the same pictures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from jax_attn.plots import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--all", *sys.argv[1:]]))
