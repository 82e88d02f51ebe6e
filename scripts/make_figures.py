"""Regenerates every figure committed under ``docs/figures`` in one command.

    python scripts/make_figures.py               # everything (trains the copy model once)
    python scripts/make_figures.py --no-trained  # only the sentence figures (= jax-attn plot --all)

The sentence figures come from :func:`jax_attn.apps.plots.sentence_figures` on the book's
sentence (fixed seeds). ``trained_copy_layer_0.png`` shows the heads of the decoder that
``jax-attn train --config configs/copy.toml`` trains (:func:`jax_attn.apps.train.head_figures`,
drawn by :mod:`jax_attn.apps.plots`); the checkpoint is kept in
``runs/copy/`` (git-ignored) and trained first when it is missing (about 1.5 minutes on
a shared 2-core CPU).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from jax_attn.apps import plots  # noqa: E402


def main(argv: list[str]) -> int:
    code = plots.main(["--all", "--out", str(plots.FIGURES_DIR)])
    if code or "--no-trained" in argv:
        return code
    from jax_attn.apps import train

    config = ROOT / "configs" / "copy.toml"
    run_dir = ROOT / "runs" / "copy"
    checkpoint = run_dir / "checkpoint"
    if not checkpoint.exists():
        code = train.main(["--config", str(config), "--out", str(run_dir), "--no-progress"])
        if code:
            return code
    figures = train.head_figures(
        train.load_train_config(config), train.checkpoint_params(checkpoint)
    )
    paths = plots.save_figures(
        {"trained_copy_layer_0": figures["trained_layer_0"]}, plots.FIGURES_DIR
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
