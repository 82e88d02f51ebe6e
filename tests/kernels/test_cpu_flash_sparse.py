"""The compiled CPU kernel with a ``mask_fn`` / ``block_mask`` (its block sparsity:
``kernels/cpu_flash_tiles.py``) against the float64 oracle given the same mask as an array,
and its gradients against the reference: sizes off the 64-row tiles, GQA, documents,
windows, rows with nothing to attend, masks that read ``b`` and ``h``, block masks known
while tracing and traced; the tile table against a numpy tiling of the dense mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allowed_error, attention_float64, make_qkv

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.kernels import cpu_flash, cpu_flash_tiles
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)

# T and S end mid-tile (3 and 4 tiles of 64); GQA; H, H_v not multiples of 16
SHAPE = dict(B=2, T=150, S=200, N=4, K=2, H=24, H_v=40)
B, T, S, N = SHAPE["B"], SHAPE["T"], SHAPE["S"], SHAPE["N"]
_rng = np.random.default_rng(5)
# [B, T] and [B, S] document ids, different per batch row; query document 0 has no key
# (key documents start at 1): its rows attend nothing
Q_DOCS = np.sort(_rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)
K_DOCS = np.sort(_rng.integers(1, 5, (B, S)), axis=1).astype(np.int32)
_Q_DOCS, _K_DOCS = jnp.asarray(Q_DOCS), jnp.asarray(K_DOCS)


def documents(b, h, q_idx, kv_idx):
    return _Q_DOCS[b, q_idx] == _K_DOCS[b, kv_idx]


def head_windows(b, h, q_idx, kv_idx):
    # head h looks back 16 (h + 1) keys from position q_idx + 50
    return (kv_idx <= q_idx + 50) & (kv_idx > q_idx + 50 - 16 * (h + 1))


def stripes(b, h, q_idx, kv_idx):
    # every tile partial
    return (q_idx + 2 * kv_idx + b) % 5 != 0


# [B|1, N|1, T, S] numpy twins of the functions above
_t, _s = np.arange(T)[:, None], np.arange(S)[None, :]
DENSE = {
    documents: Q_DOCS[:, None, :, None] == K_DOCS[:, None, None, :],
    head_windows: np.stack([(_s <= _t + 50) & (_s > _t + 50 - 16 * (h + 1)) for h in range(N)])[
        None
    ],
    stripes: np.stack([(_t + 2 * _s + b) % 5 != 0 for b in range(B)])[:, None],
}
CASES = {
    "documents": (documents, {}),
    "documents, causal": (documents, {"is_causal": True}),
    "head windows, lengths": (
        head_windows,
        {"query_seq_lengths": np.array([150, 40]), "key_value_seq_lengths": np.array([0, 170])},
    ),
    "stripes, window": (stripes, {"local_window_size": (70, 10)}),
}


def _flash(q, k, v, **kwargs):
    return ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)


def _oracle(q, k, v, mask_fn, kwargs):
    return attention_float64(q, k, v, mask=DENSE[mask_fn], **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_output_equals_float64_reference(case):
    mask_fn, kwargs = CASES[case]
    q, k, v = make_qkv(**SHAPE, seed=1)
    want = _oracle(q, k, v, mask_fn, kwargs)
    got = jax.jit(lambda q, k, v: _flash(q, k, v, mask_fn=mask_fn, **kwargs))(q, k, v)
    assert got.shape == (B, T, N, SHAPE["H_v"])
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))


def test_rows_with_nothing_to_attend_are_zero():
    q, k, v = make_qkv(**SHAPE, seed=2)
    got = _flash(q, k, v, mask_fn=documents)  # eager
    empty = Q_DOCS == 0  # [B, T]
    assert empty.any() and not empty.all()
    assert not np.any(np.asarray(got)[empty])
    want = _oracle(q, k, v, documents, {})
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))


@pytest.mark.parametrize("case", ["documents, causal", "head windows, lengths"])
def test_gradients_equal_the_reference(case):
    mask_fn, kwargs = CASES[case]
    q, k, v = make_qkv(**SHAPE, seed=3)
    weights = jnp.asarray(
        np.random.default_rng(7).standard_normal((B, T, N, SHAPE["H_v"])), jnp.float32
    )

    def grads(implementation):
        def loss(q, k, v):
            out = ja.dot_product_attention(
                q, k, v, implementation=implementation, mask_fn=mask_fn, **kwargs
            )
            return jnp.sum(out * weights)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, got, want in zip("qkv", grads("cpu_flash"), grads("reference"), strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale, err_msg=f"d{name}")


def test_traced_block_masks_and_masks_of_traced_arrays():
    """A block mask passed into ``jit`` and a ``mask_fn`` closing over a traced array build
    their tiles in the program; same results as the oracle."""
    q, k, v = make_qkv(**SHAPE, seed=4)
    want = _oracle(q, k, v, stripes, {"local_window_size": (70, 10)})
    # blocks that straddle the kernel's tiles
    blocks = ja.make_block_mask(stripes, B, 1, T, S, block_size=(48, 80))

    @jax.jit
    def with_blocks(q, k, v, blocks):
        return _flash(q, k, v, block_mask=blocks, local_window_size=(70, 10))

    got = with_blocks(q, k, v, blocks)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))
    # 128-blocks: tiles of a partial block that come out empty or full are reclassified
    got = jax.jit(lambda q, k, v, blocks: _flash(q, k, v, block_mask=blocks))(
        q, k, v, ja.make_block_mask(documents, B, 1, T, S)
    )
    want = _oracle(q, k, v, documents, {})
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))

    @jax.jit
    def of_traced_ids(q, k, v, q_docs, k_docs):
        def traced_documents(b, h, q_idx, kv_idx):
            return q_docs[b, q_idx] == k_docs[b, kv_idx]

        return _flash(q, k, v, mask_fn=traced_documents, is_causal=True)

    got = of_traced_ids(q, k, v, _Q_DOCS, _K_DOCS)
    want = _oracle(q, k, v, documents, {"is_causal": True})
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))


def test_tile_table_against_a_numpy_tiling():
    """Known while tracing, every tile is classified exactly: empty, full, or partial with
    the bits of the dense mask."""
    call = check_attention_args(*make_qkv(**SHAPE), mask_fn=documents)
    from jax_attn.validation import KernelInputs

    table, bitmasks = map(
        np.asarray, cpu_flash_tiles.tile_table(call, KernelInputs(mask_fn=documents))
    )
    tile = cpu_flash_tiles.TILE
    nq, nk = -(-T // tile), -(-S // tile)
    assert table.shape == (B, 1, nq, nk)
    # [B, T', S'] padded with "not allowed", in tiles [B, nq, tile, nk, tile]
    dense = np.zeros((B, nq * tile, nk * tile), bool)
    dense[:, :T, :S] = DENSE[documents][:, 0]
    inside = np.zeros((nq * tile, nk * tile), bool)
    inside[:T, :S] = True
    tiles = dense.reshape(B, nq, tile, nk, tile)
    inside_tiles = inside.reshape(nq, tile, nk, tile)
    for b in range(B):
        for i in range(nq):
            for j in range(nk):
                allowed, within = tiles[b, i, :, j], inside_tiles[i, :, j]
                entry = table[b, 0, i, j]
                if not allowed.any():
                    assert entry == cpu_flash_tiles.EMPTY, (b, i, j)
                elif allowed[within].all():
                    assert entry == cpu_flash_tiles.FULL, (b, i, j)
                else:
                    assert entry >= 0, (b, i, j)
                    words = bitmasks[b, entry].reshape(tile, tile // 32)
                    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
                    np.testing.assert_array_equal(bits.reshape(tile, tile) == 1, allowed)
    partial = (table >= 0).reshape(B, -1).sum(axis=1)
    assert bitmasks.shape[1] == max(1, partial.max())


def test_default_serves_mask_fn_and_block_mask_with_the_compiled_kernel():
    q, k, v = make_qkv(**SHAPE)
    for kwargs in (
        {"mask_fn": documents},
        {"block_mask": ja.make_block_mask(documents, B, 1, T, S)},
    ):
        call = check_attention_args(q, k, v, **kwargs)
        assert dispatch.select_implementation(call, "cpu") == "cpu_flash"
    call = check_attention_args(q, k, v, score_fn=lambda s, b, h, i, j: s, mask_fn=documents)
    assert dispatch.select_implementation(call, "cpu") == "chunked"


def test_vmap_over_calls_with_a_mask_fn():
    q, k, v = make_qkv(**SHAPE, seed=6)
    stacked = jax.vmap(lambda q: _flash(q, k, v, mask_fn=head_windows))(jnp.stack([q, 2 * q]))
    for x, got in zip((q, 2 * q), stacked, strict=True):
        want = _oracle(x, k, v, head_windows, {})
        np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(x, k, v, want))


@pytest.mark.parametrize(
    "mask_fn, fits",
    # test_traced_block_masks_and_masks_of_traced_arrays runs traced tables by default
    [
        pytest.param(documents, True, marks=pytest.mark.slow),
        pytest.param(stripes, False, marks=pytest.mark.slow),
    ],
)
def test_traced_tables_without_room_for_the_mask_run_chunked_instead(monkeypatch, mask_fn, fits):
    """A table built in the program holds a bounded number of partial tiles (O(T) memory);
    a mask with more runs the chunked kernel in a ``lax.cond``: the same values and
    gradients either way."""
    from jax_attn.validation import KernelInputs

    monkeypatch.setattr(cpu_flash_tiles, "ROOM_PER_TILE_LINE", 1)
    monkeypatch.setattr(cpu_flash_tiles, "_TILES_PER_STEP", 2)  # room: 8 partial tiles
    q, k, v = make_qkv(**SHAPE, seed=8)
    blocks = ja.make_block_mask(mask_fn, B, 1, T, S, block_size=(64, 64))
    call = check_attention_args(q, k, v, block_mask=blocks)
    inputs = KernelInputs(block_mask=blocks)
    assert bool(cpu_flash_tiles._traced_table(call, inputs, (True, False))[2]) == fits
    weights = jnp.asarray(
        np.random.default_rng(9).standard_normal((B, T, N, SHAPE["H_v"])), jnp.float32
    )

    def value_and_grads(attention):
        # the output itself, not the loss summed from it: a scalar sum of 48,000 terms
        # rounds in an order each XLA version picks, beyond a bound relative to its value
        def loss(q, k, v, blocks):
            out = attention(q, k, v, blocks)
            return jnp.sum(out * weights), out

        grad = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
        (_, out), grads = jax.jit(grad)(q, k, v, blocks)
        return out, grads

    got = value_and_grads(lambda q, k, v, blocks: _flash(q, k, v, block_mask=blocks))
    want = value_and_grads(
        lambda q, k, v, _: ja.dot_product_attention(
            q, k, v, mask_fn=mask_fn, implementation="reference"
        )
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * float(jnp.abs(w).max()))


def test_mask_fn_composes_with_mask_bias_options_and_dropout():
    """A ``mask_fn``'s tiles beside a dense mask, a bias, the score options and dropout:
    outputs, gradients (the bias' too) and a jvp equal the reference's."""
    q, k, v = make_qkv(**SHAPE)
    rng = np.random.default_rng(8)
    bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
    kwargs = dict(
        mask_fn=head_windows,
        mask=jnp.asarray(rng.random((B, 1, 1, S)) < 0.8),
        logit_soft_cap=2.0,
        alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
        dropout_rate=0.2,
        dropout_rng=jax.random.key(3),
    )
    weights = jnp.asarray(rng.standard_normal((B, T, N, SHAPE["H_v"])), jnp.float32)

    def loss(implementation):
        def f(q, k, v, bias):
            out = ja.dot_product_attention(
                q, k, v, bias=bias, implementation=implementation, **kwargs
            )
            return jnp.sum(out * weights)

        return f

    args = (q, k, v, bias)
    got = jax.jit(jax.value_and_grad(loss("cpu_flash"), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.value_and_grad(loss("reference"), argnums=(0, 1, 2, 3)))(*args)
    names = ("loss", "dq", "dk", "dv", "dbias")
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.abs(w).max()) + 1e-6
        assert float(jnp.abs(g - w).max()) <= 4e-6 * scale, name
    tangents = tuple(0.1 * jnp.ones_like(x) for x in args)
    got_t = jax.jit(lambda *a: jax.jvp(loss("cpu_flash"), a, tangents)[1])(*args)
    want_t = jax.jit(lambda *a: jax.jvp(loss("reference"), a, tangents)[1])(*args)
    assert float(jnp.abs(got_t - want_t)) <= 4e-6 * (float(jnp.abs(want_t)) + 1.0)
