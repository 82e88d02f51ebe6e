"""Masks and scores as functions: ``mask_fn``, ``score_fn``, ``block_mask``.

Every implementation that serves a call equals the numpy float64 attention with the
equivalent explicit mask or bias; the gallery's functions are the ones docs/masks.md shows
(its code blocks are run here); errors name the argument.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import dispatch, reference
from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

DOCS = Path(__file__).resolve().parents[2] / "docs" / "masks.md"
B, T, N, K, H = 2, 12, 4, 2, 8
SEGMENT_IDS = np.array([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [1] * 3], np.int32)
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)


def _gallery() -> dict:
    """The names the Python blocks of docs/masks.md's gallery define."""
    text = DOCS.read_text()
    section = text[text.index("## Masks and scores as functions") :]
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL):
        exec(block, namespace)  # noqa: S102 - the docs' own examples
    return namespace


GALLERY = _gallery()
EXPLICIT = GALLERY["explicit_masks"](T, SEGMENT_IDS)
MASK_FNS = {
    "causal": GALLERY["causal"],
    "sliding_window": GALLERY["sliding_window"],
    "document": GALLERY["document_mask"](jnp.asarray(SEGMENT_IDS)),
    "prefix_lm": GALLERY["prefix_lm"],
}


def _serving(**options) -> list[str]:
    """The implementations on this platform that serve a call with these options."""
    q, k, v = (jnp.zeros(s, jnp.float32) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    call = check_attention_args(q, k, v, **options)
    names = ja.available_implementations()
    return [name for name in names if dispatch.unsupported_reason(name, call) is None]


def _compare(q, k, v, expected, allowed_error, explicit_kwargs, **options):
    served = _serving(**options)
    assert "reference" in served and "chunked" in served, served
    bound = allowed_error(q, k, v, expected, **explicit_kwargs)
    for name in served:
        out = np.asarray(ja.dot_product_attention(q, k, v, implementation=name, **options))
        error = float(np.abs(out - expected).max())
        assert error <= bound, (name, error, bound)
    return served


@pytest.mark.parametrize("name", sorted(MASK_FNS))
def test_gallery_mask_fn_equals_the_explicit_mask(name, make_qkv, attention_float64, allowed_error):
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=1)
    mask = EXPLICIT[name]
    expected = attention_float64(q, k, v, mask=mask)
    served = _compare(q, k, v, expected, allowed_error, {"mask": mask}, mask_fn=MASK_FNS[name])
    assert "xla" in served


def test_gallery_score_fns_equal_the_explicit_bias_and_numpy_soft_cap(
    make_qkv, attention_float64, allowed_error
):
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=2, scale=3.0)
    bias = GALLERY["explicit_alibi_bias"](SLOPES, T)
    alibi = GALLERY["alibi_bias"](jnp.asarray(SLOPES))
    expected = attention_float64(q, k, v, bias=bias, is_causal=True)
    kwargs = {"bias": bias, "is_causal": True}
    served = _compare(q, k, v, expected, allowed_error, kwargs, score_fn=alibi, is_causal=True)
    assert "xla" not in served

    # Soft-capping in numpy float64: cap * tanh(scale q.k / cap), causal.
    cap = GALLERY["CAP"]
    q64, k64, v64 = (np.repeat(np.asarray(x, np.float64), N // x.shape[2], 2) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q64, k64) / np.sqrt(H)
    assert np.abs(logits).max() > 2 * cap  # the cap changes something
    logits = np.where(np.tril(np.ones((T, T), bool)), cap * np.tanh(logits / cap), -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh->btnh", weights, v64)
    _compare(q, k, v, expected, allowed_error, {}, score_fn=GALLERY["soft_cap"], is_causal=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_scores_are_float32(dtype, make_qkv, attention_float64, allowed_error):
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=6, dtype=dtype)
    bias = GALLERY["explicit_alibi_bias"](SLOPES, T)
    mask = EXPLICIT["document"]
    expected = attention_float64(q, k, v, mask=mask, bias=bias)
    options = dict(
        mask_fn=MASK_FNS["document"], score_fn=GALLERY["alibi_bias"](jnp.asarray(SLOPES))
    )
    served = _compare(q, k, v, expected, allowed_error, {"mask": mask, "bias": bias}, **options)
    assert sorted(served) == ["chunked", "reference"]


def test_the_docs_example_with_a_shared_block_mask(make_qkv, attention_float64):
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=3)
    out = GALLERY["attend"](q, k, v, jnp.asarray(SEGMENT_IDS), jnp.asarray(SLOPES))
    bias = GALLERY["explicit_alibi_bias"](SLOPES, T)
    expected = attention_float64(q, k, v, mask=EXPLICIT["document"], bias=bias)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_functions_combine_with_every_other_argument(make_qkv, attention_float64):
    """mask, bias, is_causal, lengths, window, GQA and dropout together with both functions."""
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=4)
    rng = np.random.default_rng(0)
    user_mask = rng.random((B, 1, T, T)) > 0.2
    user_bias = rng.standard_normal((N, T, T)).astype(np.float32)
    lengths = dict(
        query_seq_lengths=jnp.array([12, 10], jnp.int32),
        key_value_seq_lengths=jnp.array([11, 12], jnp.int32),
    )
    common = dict(is_causal=True, local_window_size=(6, 0), dropout_rate=0.3, **lengths)
    common["dropout_rng"] = jax.random.key(7)
    alibi = GALLERY["explicit_alibi_bias"](SLOPES, T)
    expected = attention_float64(
        q,
        k,
        v,
        mask=user_mask & EXPLICIT["document"],
        bias=user_bias + alibi,
        **common,
    )
    options = dict(
        mask=jnp.asarray(user_mask),
        bias=jnp.asarray(user_bias),
        mask_fn=MASK_FNS["document"],
        score_fn=GALLERY["alibi_bias"](jnp.asarray(SLOPES)),
        **common,
    )
    for name in ("reference", "chunked"):
        out = ja.dot_product_attention(q, k, v, implementation=name, **options)
        np.testing.assert_allclose(out, expected, atol=2e-5, err_msg=name)


def test_jit_grad_matches_the_reference(make_qkv):
    """Gradients wrt q, k, v and a closed-over slope array, under jit."""
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=5)
    segment_ids = jnp.asarray(SEGMENT_IDS)

    def loss(q, k, v, slopes, implementation):
        out = ja.dot_product_attention(
            q,
            k,
            v,
            mask_fn=GALLERY["document_mask"](segment_ids),
            score_fn=GALLERY["alibi_bias"](slopes),
            implementation=implementation,
        )
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    slopes = jnp.asarray(SLOPES)
    expected = grad(q, k, v, slopes, "reference")
    got = grad(q, k, v, slopes, "chunked")
    for name, a, b in zip("q k v slopes".split(), got, expected, strict=True):
        scale = max(1.0, float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, err_msg=name)
    assert float(jnp.abs(expected[3]).max()) > 1e-3  # the slopes' gradient is not trivially 0


def test_vmap_over_sequences_with_closed_over_segment_ids(make_qkv):
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H, seed=5)
    segment_ids = jnp.asarray(SEGMENT_IDS)

    def per_sequence(q, k, v, ids):  # unbatched [T, N, H]; ids [T] closed over
        def document(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

        return ja.dot_product_attention(q, k, v, mask_fn=document, implementation="chunked")

    out = jax.jit(jax.vmap(per_sequence))(q, k, v, segment_ids)
    want = reference.dot_product_attention(q, k, v, mask_fn=MASK_FNS["document"])
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_default_dispatch_serves_functions_and_others_decline():
    q = k = v = jnp.zeros((1, 16, 2, 8), jnp.float32)
    call = check_attention_args(q, k, v, score_fn=GALLERY["soft_cap"])
    assert dispatch.select_implementation(call, "cpu") == "chunked"
    reason = dispatch.unsupported_reason("xla", call, "cpu")
    assert "score_fn" in reason and "chunked" in reason
    for name in ("cudnn", "ring", "pallas_gpu", "pallas_tpu"):
        for options in ({"mask_fn": GALLERY["causal"]}, {"score_fn": GALLERY["soft_cap"]}):
            call = check_attention_args(q, k, v, **options)
            platform = {"pallas_tpu": "tpu", "cpu": "cpu"}.get(name, "gpu")
            reason = dispatch.unsupported_reason(name, call, platform)
            assert reason is not None, (name, options)
    # T < 8: the compiled kernel, first on CPU whatever T, takes a mask_fn where it builds;
    # else xla goes first
    small = jnp.zeros((1, 2, 2, 8), jnp.float32)
    call = check_attention_args(small, small, small, mask_fn=GALLERY["causal"])
    expected = "cpu_flash" if cpu_flash.build_reason() is None else "xla"
    assert dispatch.select_implementation(call, "cpu") == expected
    with pytest.raises(ValueError, match="implementation='xla' cannot serve.*score_fn"):
        ja.dot_product_attention(q, k, v, score_fn=GALLERY["soft_cap"], implementation="xla")


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"mask_fn": 3}, TypeError, r"mask_fn must be a function mask_fn\(b, h, q_idx, kv_idx\)"),
        ({"mask_fn": lambda b, h, q: q > 0}, TypeError, "mask_fn must be a function .* raised"),
        (
            {"mask_fn": lambda b, h, q, kv: q - kv},
            TypeError,
            r"mask_fn must return one bool .*got int32\[\]",
        ),
        ({"score_fn": "tanh"}, TypeError, r"score_fn must be a function score_fn\(score"),
        (
            {"score_fn": lambda s, b, h, q, kv: jnp.stack([s, s])},
            TypeError,
            r"score_fn must return one float \(shape \[\]\), got float32\[2\]",
        ),
        ({"block_mask": np.ones((1, 1, 1, 1), bool)}, TypeError, "block_mask must be a BlockMask"),
    ],
)
def test_errors_name_the_argument(options, error, match):
    q = k = v = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(error, match=match):
        ja.dot_product_attention(q, k, v, **options)


def test_block_mask_errors_name_what_was_expected():
    q = k = v = jnp.zeros((2, 4, 2, 8), jnp.float32)
    causal = GALLERY["causal"]
    with pytest.raises(
        ValueError, match=r"made for \(B, N, T, S\) = \(2, 2, 4, 4\).*\(1, 1, 5, 5\)"
    ):
        ja.dot_product_attention(q, k, v, block_mask=ja.make_block_mask(causal, 1, 1, 5, 5))
    with pytest.raises(ValueError, match="mask_fn must be the function block_mask was made from"):
        ja.dot_product_attention(
            q, k, v, mask_fn=GALLERY["prefix_lm"], block_mask=ja.make_block_mask(causal, 2, 2, 4, 4)
        )
    with pytest.raises(TypeError, match="make_block_mask: mask_fn must be a function"):
        ja.make_block_mask(None, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="make_block_mask: block_size must be a pair"):
        ja.make_block_mask(causal, 1, 1, 4, 4, block_size=(0, 2))
