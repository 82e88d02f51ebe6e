"""``alibi_slopes`` and ``logit_soft_cap``: the score changes models ship, as options of
``dot_product_attention`` (FlashAttention's and splash attention's names), against a
numpy float64 computation and through every implementation that serves them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_float64

import jax_attn as ja
from jax_attn import reference

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H)).astype(np.float32) * 2.0
    k = rng.normal(size=(B, S, K, H)).astype(np.float32) * 2.0
    v = rng.normal(size=(B, S, K, H)).astype(np.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    return q, k, v, slopes


def _alibi_bias(slopes):
    """[1, N, T, S] (or [B, N, T, S] for [B, N] slopes): -slope * |i + S - T - j|."""
    distance = np.abs(np.arange(T)[:, None] + S - T - np.arange(S)[None, :])
    slopes = np.asarray(slopes, np.float64)
    lead = slopes[None] if slopes.ndim == 1 else slopes
    return -lead[..., None, None] * distance


def _capped_float64(q, k, v, cap, bias):
    """Causal attention with soft-capped logits, then ``bias``, in numpy float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    logits = cap * np.tanh(logits / cap) + bias
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


SERVING = [
    name for name in ("reference", "chunked", "cpu_flash") if name in ja.available_implementations()
]


@pytest.mark.parametrize("implementation", [None, *SERVING])
def test_alibi_equals_its_bias_and_soft_cap_its_formula(implementation):
    q, k, v, slopes = _inputs()
    got = ja.dot_product_attention(
        q, k, v, is_causal=True, alibi_slopes=slopes, implementation=implementation
    )
    want = attention_float64(q, k, v, is_causal=True, bias=_alibi_bias(slopes))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    batch_slopes = np.stack([slopes, slopes[::-1]])
    got = ja.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        alibi_slopes=batch_slopes,
        logit_soft_cap=3.0,
        implementation=implementation,
    )
    want = _capped_float64(q, k, v, 3.0, _alibi_bias(batch_slopes))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_slopes_and_forward_mode_goes_through():
    q, k, v, slopes = _inputs(1)

    def loss(attention, slopes):
        out = attention(q, k, v, is_causal=True, alibi_slopes=slopes, logit_soft_cap=4.0)
        return jnp.sum(jnp.sin(out))

    chunked = lambda *a, **o: ja.dot_product_attention(*a, implementation="chunked", **o)  # noqa: E731
    for fn in (jax.grad, lambda f: lambda s: jax.jvp(f, (s,), (jnp.ones_like(s),))[1]):
        want = fn(lambda s: loss(reference.dot_product_attention, s))(jnp.asarray(slopes))
        # the default too: traced slopes leave the kernel that takes them as constants
        for attention in (chunked, ja.dot_product_attention):
            got = fn(lambda s, attention=attention: loss(attention, s))(jnp.asarray(slopes))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kernels_without_score_functions_decline_and_bad_options_are_named():
    q, k, v, slopes = _inputs()
    with pytest.raises(ValueError, match="'xla'.*score_fn"):
        ja.dot_product_attention(q, k, v, alibi_slopes=slopes, implementation="xla")
    if "cpu_flash" in ja.available_implementations():
        # it serves concrete slopes natively (tests/kernels/test_cpu_flash_dropout.py);
        # traced ones may be learned, and it takes no derivative for them
        with pytest.raises(ValueError, match="score_fn"):
            jax.jit(
                lambda s: ja.dot_product_attention(
                    q, k, v, alibi_slopes=s, implementation="cpu_flash"
                )
            )(slopes)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[4\] or \[2, 4\]"):
        ja.dot_product_attention(q, k, v, alibi_slopes=slopes[:3])
    with pytest.raises(TypeError, match="alibi_slopes must hold floats"):
        ja.dot_product_attention(q, k, v, alibi_slopes=np.arange(N))
    with pytest.raises(ValueError, match="logit_soft_cap must be a positive finite float"):
        ja.dot_product_attention(q, k, v, logit_soft_cap=0.0)
    with pytest.raises(TypeError, match="logit_soft_cap must be a positive float or None"):
        ja.dot_product_attention(q, k, v, logit_soft_cap="3")
