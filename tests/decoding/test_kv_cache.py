"""The pure KV-cache functions against the reference's full causal pass."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv_numpy
from jax import lax

from jax_attn import kv_cache, reference

B, S_MAX, N, H = 2, 8, 4, 8


# The user's jitted decode step, shared by the tests so each shape compiles once.
decode_step = jax.jit(kv_cache.decode_attention)
full_causal_pass = jax.jit(functools.partial(reference.dot_product_attention, is_causal=True))


def _decode_in_chunks(q, k, v, chunks, step=decode_step):
    cache = kv_cache.init_cache(B, S_MAX, k.shape[2], H, k.dtype)
    outs, start = [], 0
    for size in chunks:
        end = start + size
        out, cache = step(cache, q[:, start:end], k[:, start:end], v[:, start:end])
        outs.append(out)
        start = end
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "K, chunks",
    [
        (2, (1,) * S_MAX),
        (2, (3, 1, 3, 1)),
        # one kv head in chunks of 4: test_eager_decode_equals_full_pass decodes just that
        pytest.param(1, (4, 4), marks=pytest.mark.slow),
    ],
)
def test_decode_in_chunks_equals_full_causal_pass(K, chunks):
    q, k, v = make_qkv_numpy(B, S_MAX, S_MAX, N, K, H)
    out, cache = _decode_in_chunks(q, k, v, chunks)
    expected = full_causal_pass(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.index, [S_MAX, S_MAX])
    assert cache.key.shape == (B, S_MAX, K, H)


def test_eager_decode_equals_full_pass():
    q, k, v = make_qkv_numpy(B, S_MAX, S_MAX, N, 1, H)
    out, _ = _decode_in_chunks(q, k, v, (4, 4), step=kv_cache.decode_attention)
    expected = full_causal_pass(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@jax.jit
def _generate(cache, q, k, v):
    """One token at a time through the jitted step inside ``lax.scan``."""

    def body(cache, qkv):
        out, cache = decode_step(cache, *(x[:, None] for x in qkv))
        return cache, out[:, 0]

    # scan over T: [T, B, ...]
    cache, outs = lax.scan(body, cache, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v)))
    return jnp.swapaxes(outs, 0, 1), cache


def test_scan_equals_full_pass_and_overflow_never_overwrites():
    q, k, v = make_qkv_numpy(B, S_MAX + 2, S_MAX + 2, N, 2, H)
    out, cache = _generate(kv_cache.init_cache(B, S_MAX, 2, H), q, k, v)
    fits = slice(None, S_MAX)
    expected = full_causal_pass(q[:, fits], k[:, fits], v[:, fits])
    np.testing.assert_allclose(out[:, fits], expected, rtol=1e-5, atol=1e-5)
    # The two steps past the end: NaN outputs, the first S_MAX tokens' keys kept.
    assert np.isnan(out[:, S_MAX:]).all()
    np.testing.assert_array_equal(cache.key, k[:, fits])
    np.testing.assert_array_equal(cache.value, v[:, fits])
    np.testing.assert_array_equal(cache.index, [S_MAX, S_MAX])


def test_overflow_under_jit_touches_only_that_sequence():
    q, k, v = make_qkv_numpy(B, 1, 1, N, 2, H)
    _, k_old, v_old = make_qkv_numpy(B, S_MAX, S_MAX, N, 2, H, seed=1)
    cache = kv_cache.KVCache(k_old, v_old, jnp.array([S_MAX - 1, S_MAX], jnp.int32))
    out, new = decode_step(cache, q, k, v)
    # Sequence 1 is full: NaN, nothing written.
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(new.key[1], k_old[1])
    np.testing.assert_array_equal(new.value[1], v_old[1])
    # Sequence 0 writes its last slot and attends over all of them.
    k_all, v_all = k_old.copy(), v_old.copy()
    k_all[0, -1], v_all[0, -1] = k[0, 0], v[0, 0]
    expected = full_causal_pass(q[:1], k_all[:1], v_all[:1])
    np.testing.assert_allclose(out[:1], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new.key[0], k_all[0])
    np.testing.assert_array_equal(new.index, [S_MAX, S_MAX])


def test_traced_bad_lengths_give_nan_and_keep_the_cache():
    q, k, v = make_qkv_numpy(B, 3, 3, N, 2, H)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)
    out, new = decode_step(cache, q, k, v, lengths=jnp.array([2, 4]))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    np.testing.assert_array_equal(new.index, [2, 0])
    np.testing.assert_array_equal(new.key[1], cache.key[1])


def test_checked_turns_overflow_into_an_error():
    q, k, v = make_qkv_numpy(B, 3, 3, N, 2, H)
    full = kv_cache.init_cache(B, S_MAX, 2, H)._replace(index=jnp.array([5, 7], jnp.int32))
    with pytest.raises(ValueError, match="writing 3 new tokens at index 7"):
        kv_cache.checked(kv_cache.decode_attention)(full, q, k, v)


@pytest.mark.slow
def test_checked_scan_and_lengths():
    q, k, v = make_qkv_numpy(B, 3, 3, N, 2, H)
    full = kv_cache.init_cache(B, S_MAX, 2, H)._replace(index=jnp.array([5, 7], jnp.int32))
    with pytest.raises(ValueError, match="KV cache overflow"):
        kv_cache.checked(_generate)(full, q, k, v)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
        kv_cache.checked(kv_cache.update_cache)(
            kv_cache.init_cache(B, S_MAX, 2, H), k, v, jnp.array([1, 4])
        )


def test_overflow_raises_eagerly_with_sizes():
    q, k, v = make_qkv_numpy(B, 3, 3, N, 2, H)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)._replace(index=jnp.array([6, 4], jnp.int32))
    with pytest.raises(ValueError, match="writing 3 new tokens at index 6 needs 9 slots.*=8"):
        kv_cache.decode_attention(cache, q, k, v)
    _, k, v = make_qkv_numpy(B, 9, 9, N, 2, H)
    with pytest.raises(ValueError, match="do not fit in context_length=8"):
        kv_cache.update_cache(kv_cache.init_cache(B, 8, 2, H), k, v)


def test_mixed_prompt_lengths_under_jit_match_each_sequence_alone():
    lengths = np.array([1, 3])
    q, k, v = make_qkv_numpy(B, S_MAX, S_MAX, N, 2, H)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)
    # Prompt block of 3 (sequence 0 padded after 1 token), then one token per step.
    prompt, cache = decode_step(cache, q[:, :3], k[:, :3], v[:, :3], lengths=jnp.asarray(lengths))
    np.testing.assert_array_equal(cache.index, lengths)
    np.testing.assert_array_equal(prompt[0, 1:], 0.0)
    steps = []
    for t in range(3):
        # sequence b's next token is its own token lengths[b] + t
        pick = [np.stack([x[b, lengths[b] + t] for b in range(B)])[:, None] for x in (q, k, v)]
        out, cache = decode_step(cache, *pick)
        steps.append(out)
    steps = np.concatenate(steps, axis=1)
    expected = full_causal_pass(q, k, v)
    for b in range(B):
        T_b = lengths[b] + 3
        np.testing.assert_allclose(prompt[b, : lengths[b]], expected[b, : lengths[b]], atol=1e-5)
        np.testing.assert_allclose(steps[b], expected[b, lengths[b] : T_b], atol=1e-5)


def test_one_token_step_with_a_padded_sequence():
    # One query per sequence goes to the kernels as key lengths (no dense mask); a padded
    # one (lengths 0) gets a zero row and leaves its sequence's cache as it was.
    q, k, v = make_qkv_numpy(B, S_MAX, S_MAX, N, 2, H)
    cache = kv_cache.init_cache(B, S_MAX, 2, H)
    _, cache = decode_step(cache, q[:, :3], k[:, :3], v[:, :3])
    pick = [x[:, 3:4] for x in (q, k, v)]
    out, cache = decode_step(cache, *pick, lengths=jnp.array([0, 1]))
    np.testing.assert_array_equal(cache.index, [3, 4])
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], full_causal_pass(q, k, v)[1, 3:4], rtol=1e-5, atol=1e-5)


def test_x64_float64_cache_under_jit_and_scan():
    with jax.enable_x64(True):
        q, k, v = make_qkv_numpy(B, 4, 4, N, 2, H, dtype=np.float64)
        empty = kv_cache.init_cache(B, S_MAX, 2, H, jnp.float64)
        out, cache = _generate(empty, q, k, v)
        expected = full_causal_pass(q, k, v)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        assert out.dtype == jnp.float64
        chex.assert_trees_all_equal_dtypes(cache, empty)
        np.testing.assert_array_equal(cache.index, [4, 4])


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
