"""The chunked implementation equals the reference: forward and gradients, every feature."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import reference
from jax_attn.kernels import chunked
from jax_attn.validation import KernelInputs, check_attention_args

_ARRAYS = ("mask", "bias", "query_seq_lengths", "key_value_seq_lengths", "dropout_rng")

B, N, H = 2, 4, 8


def _normal(shape, seed, dtype=jnp.float32):
    """Random inputs from numpy: no threefry kernel to compile per shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _bernoulli(shape, p, seed):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def _inputs(T, S, K=2, H_v=H, dtype=jnp.float32, seed=0):
    q = _normal((B, T, N, H), seed, dtype)
    k = _normal((B, S, K, H), seed + 1, dtype)
    v = _normal((B, S, K, H_v), seed + 2, dtype)
    return q, k, v


def _extras(name, T, S):
    if name in ("mask_lengths_dropout", "all"):
        return {
            "mask": _bernoulli((B, 1, T, S), 0.7, 7),
            "query_seq_lengths": jnp.array([T, T // 2]),
            "key_value_seq_lengths": jnp.array([S, S // 3]),
            "dropout_rate": 0.3,
            "dropout_rng": jax.random.key(3),
        }
    return {}


def _chunked(q, k, v, *, query_chunk_size=None, key_chunk_size=None, **kwargs):
    """The registered kernel with chosen chunk sizes, called the way the dispatcher calls it."""
    call = check_attention_args(q, k, v, **kwargs)
    inputs = KernelInputs(**{name: kwargs.get(name) for name in _ARRAYS})
    return chunked.chunked_attention(
        q,
        k,
        v,
        call=call,
        inputs=inputs,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
    )


def _loss(fn, **kwargs):
    def loss(q, k, v, bias):
        extra = {} if bias is None else {"bias": bias}
        return jnp.sum(jnp.sin(fn(q, k, v, **kwargs, **extra)))

    return loss


@functools.partial(jax.jit, static_argnames="static")
def _reference_jit(q, k, v, arrays, static):
    return reference.dot_product_attention(q, k, v, **arrays, **dict(static))


def _reference(q, k, v, **kwargs):
    """The oracle, jitted once per shape and options (cached across calls and tests)."""
    arrays = {name: x for name, x in kwargs.items() if isinstance(x, jax.Array)}
    static = tuple(sorted((name, x) for name, x in kwargs.items() if name not in arrays))
    return _reference_jit(q, k, v, arrays, static=static)


def _assert_close(actual, expected, tol):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol)


CASES = [
    # (T, S, K, H_v, chunks, options, extras)
    pytest.param(13, 17, 2, H, (4, 5), {}, None, marks=pytest.mark.slow),
    # Slow: the causal "all" case runs the causal multi-chunk backward and
    # test_fully_masked_rows_and_chunks_give_zeros_not_nan the rows that see no key.
    pytest.param(
        17, 13, 2, H, (3, 4), {"is_causal": True}, None, marks=pytest.mark.slow
    ),  # first rows see no key
    # Slow: the "all" case runs the same K, H_v and window, forward and gradients.
    pytest.param(
        13,
        17,
        1,
        6,
        (16, 4),
        {"is_causal": True, "local_window_size": (3, 1)},
        None,
        marks=pytest.mark.slow,
    ),
    pytest.param(
        13, 13, 4, H, (5, 3), {"local_window_size": 2, "scale": 0.3}, None, marks=pytest.mark.slow
    ),
    # Fast: MQA, H_v != H, causal + window, mask, both lengths, dropout and a bias with
    # -inf rows and columns in one compile; the three cases it merges stay as slow tests.
    (13, 17, 1, 6, (4, 5), {"is_causal": True, "local_window_size": (3, 1)}, "all"),
    pytest.param(
        13, 17, 2, H, (4, 5), {"is_causal": True}, "mask_lengths_dropout", marks=pytest.mark.slow
    ),
    pytest.param(13, 17, 2, H, (5, 4), {}, "bias", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("T, S, K, H_v, chunks, options, extra", CASES)
def test_forward_and_gradients_match_reference(T, S, K, H_v, chunks, options, extra):
    q, k, v = _inputs(T, S, K, H_v)
    kwargs = {**options, **_extras(extra, T, S)}
    bias = None
    if extra in ("bias", "all"):
        bias = _normal((1, N, T, S), 5)
        bias = bias.at[0, 1, 2, :].set(-jnp.inf).at[0, 0, :, 3].set(-jnp.inf)
    fast = _loss(
        _chunked,
        query_chunk_size=chunks[0],
        key_chunk_size=chunks[1],
        **kwargs,
    )
    slow = _loss(reference.dot_product_attention, **kwargs)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    value_fast, grads_fast = jax.jit(jax.value_and_grad(fast, argnums))(q, k, v, bias)
    value_slow, grads_slow = jax.jit(jax.value_and_grad(slow, argnums))(q, k, v, bias)
    _assert_close(value_fast, value_slow, 1e-4)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow, strict=True):
        _assert_close(fast_grad, slow_grad, 1e-4)


# Slow: test_forward_and_gradients_match_reference[all] runs the forward over chunks
# (4, 5) that divide neither T=13 nor S=17, against the reference.
@pytest.mark.slow
@pytest.mark.parametrize("chunks", [(1, 1), (3, 7), (64, 64)])
def test_any_chunk_size_gives_the_reference(chunks):
    q, k, v = _inputs(13, 17)
    out = _chunked(q, k, v, is_causal=True, query_chunk_size=chunks[0], key_chunk_size=chunks[1])
    _assert_close(out, _reference(q, k, v, is_causal=True), 1e-5)


# Slow: test_forward_and_gradients_match_reference[all] takes a bias broadcast over the
# batch and its gradient, and a mask broadcast over heads.
@pytest.mark.slow
def test_broadcast_bias_and_mask():
    q, k, v = _inputs(9, 11)
    bias = _normal((B, 1, 1, 11), 1)
    mask = _bernoulli((1, N, 9, 1), 0.8, 2)
    fast = _loss(_chunked, mask=mask, query_chunk_size=4, key_chunk_size=3)
    slow = _loss(reference.dot_product_attention, mask=mask)
    grads_fast = jax.jit(jax.grad(fast, (0, 3)))(q, k, v, bias)
    grads_slow = jax.jit(jax.grad(slow, (0, 3)))(q, k, v, bias)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow, strict=True):
        _assert_close(fast_grad, slow_grad, 1e-4)


# Slow: test_forward_and_gradients_match_reference[all]'s query lengths
# leave a whole query chunk (rows 8..11) with no key, forward and gradients checked finite.
@pytest.mark.slow
def test_fully_masked_rows_and_chunks_give_zeros_not_nan():
    T = S = 8
    q, k, v = _inputs(T, S)
    # Rows 0..3 see nothing (a whole query chunk); keys 4..7 are masked for every row.
    mask = jnp.zeros((T, S), bool).at[4:, :4].set(True)
    out = _chunked(q, k, v, mask=mask, query_chunk_size=4, key_chunk_size=4)
    np.testing.assert_array_equal(np.asarray(out[:, :4]), 0.0)
    fast = _loss(_chunked, mask=mask, query_chunk_size=4, key_chunk_size=4)
    slow = _loss(reference.dot_product_attention, mask=mask)
    value_fast, grads_fast = jax.jit(jax.value_and_grad(fast, (0, 1, 2)))(q, k, v, None)
    value_slow, grads_slow = jax.jit(jax.value_and_grad(slow, (0, 1, 2)))(q, k, v, None)
    _assert_close(value_fast, value_slow, 1e-5)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow, strict=True):
        _assert_close(fast_grad, slow_grad, 1e-5)


@pytest.mark.parametrize(
    "options, poisoned_keys, clean_rows",
    [
        # Causal: query chunk 0 (rows 0..3) must never read key chunk 1 (keys 4..7).
        ({"is_causal": True}, slice(4, 12), slice(0, 4)),
        # Window (2, 0): rows 8..11 read keys 6..11 only, so chunk 0 (keys 0..3) is skipped.
        ({"local_window_size": (2, 0)}, slice(0, 4), slice(8, 12)),
    ],
)
def test_empty_blocks_are_not_computed(options, poisoned_keys, clean_rows):
    """NaN values in the skipped key chunk would reach the output (0 * NaN) if it were read."""
    q, k, v = _inputs(12, 12)
    v = v.at[:, poisoned_keys].set(jnp.nan)

    def run(q):
        """The output and the gradient of ``sum(out[:, clean_rows])`` in one compile."""
        out, vjp = jax.vjp(
            lambda q: _chunked(q, k, v, query_chunk_size=4, key_chunk_size=4, **options), q
        )
        return out, vjp(jnp.zeros_like(out).at[:, clean_rows].set(1.0))[0]

    out, grad_q = jax.jit(run)(q)
    assert np.all(np.isfinite(np.asarray(out[:, clean_rows])))
    assert np.all(np.isfinite(np.asarray(grad_q[:, clean_rows])))


@pytest.mark.parametrize(
    "T, S, chunks, options",
    [
        (16, 16, (4, 4), {"is_causal": True}),
        (6, 16, (4, 3), {"is_causal": True}),
        (16, 10, (3, 4), {"is_causal": True}),
        (16, 16, (4, 3), {"local_window_size": (5, 2)}),
        (10, 16, (4, 4), {"is_causal": True, "local_window_size": (3, 0)}),
        (10, 14, (4, 4), {}),
    ],
)
def test_key_chunk_ranges_cover_exactly_the_band(T, S, chunks, options):
    """Visited chunks hold every allowed key; chunks run without position masks hold only them."""
    from jax_attn.masks import build_attention_mask

    window = options.get("local_window_size")
    window = (window, window) if isinstance(window, int) else window
    plan = chunked._Plan(
        T=T,
        S=S,
        q_chunk=chunks[0],
        k_chunk=chunks[1],
        is_causal=options.get("is_causal", False),
        window=window,
        scale=1.0,
        dropout_rate=0.0,
        mask_shape=None,
        bias_shape=None,
    )
    allowed = build_attention_mask(T, S, is_causal=plan.is_causal, local_window_size=window)
    allowed = np.ones((T, S), bool) if allowed is None else np.asarray(allowed[0, 0])
    allowed = np.pad(allowed, [(0, plan.T_padded - T), (0, plan.S_padded - S)])
    Tq, Sk = chunks
    for i in range(plan.num_q_chunks):
        lo, full_lo, full_hi, hi = (int(x) for x in chunked._key_chunk_ranges(plan, i, S))
        assert lo <= full_lo <= full_hi <= hi
        rows = allowed[i * Tq : (i + 1) * Tq][: max(0, min(Tq, T - i * Tq))]
        for j in range(plan.S_padded // Sk):
            block = rows[:, j * Sk : (j + 1) * Sk]
            assert (lo <= j < hi) == bool(block.any()), (i, j)
            if full_lo <= j < full_hi:
                assert block.all(), (i, j)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    q, k, v = _inputs(13, 17, dtype=dtype)
    out = _chunked(q, k, v, is_causal=True, query_chunk_size=4, key_chunk_size=8)
    assert out.dtype == dtype
    _assert_close(out, _reference(q, k, v, is_causal=True), 2e-2)


# Slow: test_inside_scan_and_vmap's vmap hands the public entry unbatched inputs with the
# default chunks, against the reference.
@pytest.mark.slow
def test_public_entry_unbatched_inputs():
    q, k, v = _inputs(5, 7)
    out = ja.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="chunked")
    _assert_close(out, _reference(q[0], k[0], v[0], is_causal=True), 1e-5)


def test_default_chunk_sizes():
    assert chunked.default_chunk_sizes(96, "cpu") == (128, 64)
    assert chunked.default_chunk_sizes(4, "cpu") == (512, 256)
    assert chunked.default_chunk_sizes(10**6, "cpu") == (64, 32)
    assert chunked.default_chunk_sizes(16, "gpu") == (1024, 1024)


# Slow: test_forward_and_gradients_match_reference[all] runs causal, window, mask, lengths,
# dropout and bias gradients over several chunks; test_inside_scan_and_vmap the entry.
@pytest.mark.slow
def test_public_entry_with_every_feature_under_jit_and_grad():
    T, S = 13, 17
    q, k, v = _inputs(T, S)
    kwargs = {
        "is_causal": True,
        "local_window_size": (6, 0),
        **_extras("mask_lengths_dropout", T, S),
    }
    bias = _normal((B, 1, T, S), 4)
    fast = _loss(ja.dot_product_attention, implementation="chunked", **kwargs)
    slow = _loss(reference.dot_product_attention, **kwargs)
    value_fast, grads_fast = jax.jit(jax.value_and_grad(fast, (0, 1, 2, 3)))(q, k, v, bias)
    value_slow, grads_slow = jax.jit(jax.value_and_grad(slow, (0, 1, 2, 3)))(q, k, v, bias)
    _assert_close(value_fast, value_slow, 1e-4)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow, strict=True):
        _assert_close(fast_grad, slow_grad, 1e-4)


def test_inside_scan_and_vmap():
    """A user's scan over layers and vmap over a batch of sequences."""
    q, k, v = _inputs(8, 8)

    def layer(x, _):
        return _chunked(x, k, v, is_causal=True, query_chunk_size=4, key_chunk_size=4), None

    got, _ = jax.jit(lambda x: jax.lax.scan(layer, x, None, length=2))(q)
    want = _reference(_reference(q, k, v, is_causal=True), k, v, is_causal=True)
    _assert_close(got, want, 1e-5)
    per_sequence = jax.vmap(
        lambda q, k, v: ja.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")
    )
    _assert_close(jax.jit(per_sequence)(q, k, v), _reference(q, k, v, is_causal=True), 1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"query_chunk_size": 0}, "query_chunk_size"),
        ({"key_chunk_size": 2.5}, "key_chunk_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, v = _inputs(4, 4)
    with pytest.raises(ValueError, match=match):
        _chunked(q, k, v, **kwargs)


def test_float64_inputs_are_declined_and_x64_mode_works():
    """With jax_enable_x64 on: float64 is declined with a reason; float32 inputs with int64
    lengths, a mask and a bias run forward and backward over several chunks."""
    with jax.enable_x64(True):
        q = jnp.zeros((1, 4, 2, 8), jnp.float64)
        with pytest.raises(ValueError, match="float64"):
            ja.dot_product_attention(q, q, q, implementation="chunked")
        q, k, v = _inputs(6, 6)
        kwargs = {
            "is_causal": True,
            "key_value_seq_lengths": jnp.array([6, 3]),
            "mask": _bernoulli((B, 1, 6, 6), 0.8, 9),
        }
        bias = _normal((1, N, 6, 6), 10)
        fast = _loss(_chunked, query_chunk_size=4, key_chunk_size=2, **kwargs)
        slow = _loss(reference.dot_product_attention, **kwargs)
        grads_fast = jax.jit(jax.grad(fast, (0, 1, 2, 3)))(q, k, v, bias)
        grads_slow = jax.jit(jax.grad(slow, (0, 1, 2, 3)))(q, k, v, bias)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow, strict=True):
        _assert_close(fast_grad, slow_grad, 1e-4)
