"""``jax-attn demo`` end to end, with a small config for the jit-compiled part."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_attn.apps import cli, config, demo
from jax_attn.data import book_values

TINY = """\
[attention]
name = "tiny"
d_in = 32
d_out = 32
num_heads = 4
context_length = 16
dropout = 0.1
qkv_bias = true

[run]
batch = 2
seq_len = 16
dtype = "float32"
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.slow  # an end-to-end command; test_demo's other tests run the demo in-process
def test_demo_through_the_cli_prints_book_values_device_and_times(tiny_config, tmp_path, capsys):
    out_dir = tmp_path / "out"
    # shape and dtype overridden on the command line (one demo run checks both)
    argv = ["--config", str(tiny_config), "--out", str(out_dir), "--runs", "1"]
    argv += ["--batch", "1", "--seq-len", "4", "--dtype", "bfloat16"]
    code = cli.main(["demo", *argv])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "input x [1, 4, 32] bfloat16" in text
    # printed values of 3.3.1, 3.3.2, 3.4.1 and exercise 3.3, each next to its match mark
    for printed in (
        "0.9544  1.4950  1.4754  0.8434  0.7070  1.0865",
        "0.2098  0.2006  0.1981  0.1242  0.1220  0.1452",
        "0.3061  0.8210",
        "2,360,064 parameters",
    ):
        assert printed in text
    assert re.search(r"book steps: (\d+) of \1 checks passed; all checks: (\d+) of \2", text)
    assert "FAILED" not in text
    assert str(jax.devices()[0]) in text
    assert "compile time:" in text and "run time:" in text
    assert "equals the einsum reference" in text
    assert "everything matches" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no heatmap: this command needs matplotlib" in text
    else:
        png = out_dir / "attention_weights.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in text


@pytest.mark.slow  # a subprocess-heavy check of the demo's failure paths
def test_demo_fails_when_a_book_value_or_the_reference_check_does_not_match(
    tiny_config, monkeypatch, capsys
):
    """Both failures planted in one demo run: each is reported, the exit code is 1."""
    wrong = copy.deepcopy(book_values())
    wrong["3.4.1"]["attn_score_22"] = 1.8534
    monkeypatch.setattr(demo, "BOOK", wrong)

    def wrong_reference(params, x, num_heads):
        return demo.F.dense(x, params["out_proj"]) * 0.0

    monkeypatch.setattr(demo, "reference_multi_head_attention", wrong_reference)
    code = demo.main(["--config", str(tiny_config), "--no-plot", "--runs", "1", "--seq-len", "4"])
    text = capsys.readouterr().out
    assert code == 1
    assert "FAILED: attn_score_22" in text
    assert "output equals the einsum reference" in text.split("FAILED: ")[-1]
    # the book steps count only the book value as failed
    match = re.search(r"book steps: (\d+) of (\d+) checks passed", text)
    assert int(match[1]) == int(match[2]) - 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "no-such-config"], "not found"),
        (["--config", "gpt2-small", "--seq-len", "2048"], "context_length"),
    ],
)
def test_demo_bad_config_exits_2(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_rejects_non_positive_overrides(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--batch", "0"])
    assert "--batch must be > 0" in capsys.readouterr().err


def test_reference_multi_head_attention_equals_the_module():
    cfg = config.from_dict(
        config.AttentionConfig,
        {
            "name": "t",
            "d_in": 12,
            "d_out": 12,
            "num_heads": 3,
            "context_length": 8,
            "dropout": 0.0,
            "qkv_bias": True,
        },
    )
    module = cfg.multi_head_attention()
    # numpy input and weights in the shapes init gives (a random init compiles a lot)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 12), np.float32))
    shapes = jax.eval_shape(module.init, jax.random.key(1), x)["params"]
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(s.shape[0])),
        shapes,
    )
    reference = jax.jit(demo.reference_multi_head_attention, static_argnums=2)
    ours = reference(params, x, cfg.num_heads)
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x), ours, atol=1e-5)
    # causal: the first token's output depends only on the first token
    changed = reference(params, x.at[:, 1:].set(0.0), cfg.num_heads)
    np.testing.assert_allclose(changed[:, 0], ours[:, 0], atol=1e-6)
    assert not jnp.allclose(changed[:, -1], ours[:, -1])


def test_demo_embeds_the_books_inputs_and_values():
    book = book_values()
    np.testing.assert_array_equal(np.asarray(demo.INPUTS), np.asarray(book["inputs"]))
    assert demo.SENTENCE == book["sentence"]
    for section in ("3.3.1", "3.3.2", "3.4.1", "3.5.1"):
        for name, value in demo.BOOK[section].items():
            np.testing.assert_array_equal(
                np.asarray(value), np.asarray(book[section][name]), err_msg=f"{section} {name}"
            )
    assert demo.BOOK["exercise_3.3"]["parameter_count"] == book["exercise_3.3"]["parameter_count"]
