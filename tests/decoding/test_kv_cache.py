"""The pure KV-cache functions against the reference's full causal pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_attn import kv_cache, reference

B, S_MAX, N, H = 2, 8, 4, 8


def _qkv(T, K, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    )


# One jitted, checkified step shared by the tests, so each (T, K) compiles once.
CHECKED_DECODE = kv_cache.checked(kv_cache.decode_attention)


def _decode_in_chunks(q, k, v, chunks, step=CHECKED_DECODE):
    cache = kv_cache.init_cache(B, S_MAX, k.shape[2], H)
    outs, start = [], 0
    for size in chunks:
        end = start + size
        out, cache = step(cache, q[:, start:end], k[:, start:end], v[:, start:end])
        outs.append(out)
        start = end
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("K, chunks", [(2, (1,) * 7), (2, (3, 1, 2, 1)), (1, (3, 4))])
def test_decode_in_chunks_equals_full_causal_pass(K, chunks):
    q, k, v = _qkv(7, K)
    out, cache = _decode_in_chunks(q, k, v, chunks)
    expected = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.index, [7, 7])
    assert cache.key.shape == (B, S_MAX, K, H)


def test_eager_decode_equals_full_pass():
    q, k, v = _qkv(4, 2)
    out, _ = _decode_in_chunks(q, k, v, (3, 1), step=kv_cache.decode_attention)
    expected = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_one_token_steps_inside_scan_equal_full_pass():
    q, k, v = _qkv(8, 2)

    def run(q, k, v):
        cache = kv_cache.init_cache(B, S_MAX, 2, H)

        def body(cache, qkv):
            q_t, k_t, v_t = (x[:, None] for x in qkv)
            out, cache = kv_cache.decode_attention(cache, q_t, k_t, v_t)
            return cache, out[:, 0]

        # scan over T: [T, B, ...]
        cache, outs = jax.lax.scan(body, cache, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v)))
        return jnp.swapaxes(outs, 0, 1), cache.index

    out, index = kv_cache.checked(run)(q, k, v)
    expected = reference.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(index, [8, 8])


def test_overflow_raises_eagerly_with_sizes():
    q, k, v = _qkv(3, 2)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)._replace(index=jnp.array([6, 4], jnp.int32))
    with pytest.raises(ValueError, match="writing 3 new tokens at index 6 needs 9 slots.*=8"):
        kv_cache.decode_attention(cache, q[:, :3], k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="do not fit in context_length=8"):
        kv_cache.update_cache(kv_cache.init_cache(B, 8, 2, H), *_qkv(9, 2)[1:])


def test_overflow_raises_under_jit_and_scan():
    q, k, v = _qkv(3, 2)
    full = kv_cache.init_cache(B, S_MAX, 2, H)._replace(index=jnp.array([5, 7], jnp.int32))
    with pytest.raises(ValueError, match="writing 3 new tokens at index 7"):
        CHECKED_DECODE(full, q, k, v)

    def scan_steps(cache, k_steps):
        def body(cache, k_t):
            return kv_cache.update_cache(cache, k_t[:, None], k_t[:, None]), None

        return jax.lax.scan(body, cache, k_steps)[0]

    steps = jnp.zeros((4, B, 2, H))
    with pytest.raises(ValueError, match="KV cache overflow"):
        kv_cache.checked(scan_steps)(full, steps)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
        kv_cache.checked(kv_cache.update_cache)(
            kv_cache.init_cache(B, S_MAX, 2, H), k, v, jnp.array([1, 4])
        )
    # Staged without checkify, the check refuses to trace instead of passing silently.
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(kv_cache.decode_attention)(full, q, k, v)


def test_mixed_prompt_lengths_match_each_sequence_alone():
    lengths = np.array([1, 3])
    q, k, v = _qkv(6, 2, seed=1)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)
    # Prompt block of 3 (sequence 0 padded after 1 token), then one token per step.
    prompt, cache = kv_cache.decode_attention(
        cache, q[:, :3], k[:, :3], v[:, :3], lengths=jnp.asarray(lengths)
    )
    np.testing.assert_array_equal(cache.index, lengths)
    np.testing.assert_array_equal(prompt[0, 1:], 0.0)
    steps = []
    for t in range(3):
        # sequence b's next token is its own token lengths[b] + t
        pick = [jnp.stack([x[b, lengths[b] + t] for b in range(B)])[:, None] for x in (q, k, v)]
        out, cache = kv_cache.decode_attention(cache, *pick)
        steps.append(out)
    steps = jnp.concatenate(steps, axis=1)
    for b in range(B):
        T_b = lengths[b] + 3
        expected = reference.dot_product_attention(
            q[b : b + 1, :T_b], k[b : b + 1, :T_b], v[b : b + 1, :T_b], is_causal=True
        )[0]
        np.testing.assert_allclose(prompt[b, : lengths[b]], expected[: lengths[b]], atol=1e-5)
        np.testing.assert_allclose(steps[b], expected[lengths[b] :], atol=1e-5)


def test_positions_and_gqa_shapes():
    cache = kv_cache.init_cache(3, 16, 2, 4, jnp.bfloat16, value_head_dim=6)
    assert cache.key.shape == (3, 16, 2, 4) and cache.value.shape == (3, 16, 2, 6)
    assert cache.key.dtype == jnp.bfloat16 and cache.index.dtype == jnp.int32
    cache = cache._replace(index=jnp.array([0, 2, 5], jnp.int32))
    np.testing.assert_array_equal(kv_cache.positions(cache, 2), [[0, 1], [2, 3], [5, 6]])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(key_shape=(B, 2, 3, H)), "new_key must have shape"),
        (dict(value_shape=(B, 2, 2, H + 1)), "new_value must have shape"),
        (dict(lengths=jnp.array([1, 3])), r"lengths must lie in \[0, T=2\]"),
        (dict(lengths=jnp.array([1])), r"lengths must have shape \[B\]"),
    ],
)
def test_bad_arguments_name_the_argument(bad, match):
    cache = kv_cache.init_cache(B, S_MAX, 2, H)
    new_key = jnp.zeros(bad.get("key_shape", (B, 2, 2, H)))
    new_value = jnp.zeros(bad.get("value_shape", (B, 2, 2, H)))
    with pytest.raises(ValueError, match=match):
        kv_cache.update_cache(cache, new_key, new_value, lengths=bad.get("lengths"))
