"""Block sparsity of a ``mask_fn``: ``make_block_mask`` and the chunked kernel's skipping.

``make_block_mask``'s blocks equal a numpy construction; the chunked kernel visits exactly
the non-empty blocks (its table) and never reads the keys of a skipped block, forward or
backward (NaN there would show); a block mask made inside ``jit`` or passed through it
works; a document mask at T = 32768 runs in a fresh process under 1 GiB.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_peak

import jax_attn as ja
from jax_attn import mask_functions, reference
from jax_attn.kernels import chunked

SEGMENT_IDS = np.array([[0] * 6 + [1] * 4 + [2] * 3, [0] * 2 + [1] * 11], np.int32)


def document_mask(segment_ids):
    def document(b, h, q_idx, kv_idx):
        return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return document


def window_per_head(b, h, q_idx, kv_idx):  # head h sees its last h + 1 keys
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= h)


def _numpy_blocks(allowed, Tq, Sk):
    """(any, full) ``[B, N, nq, nk]`` of a bool ``[B, N, T, S]`` mask; padding not full."""
    B, N, T, S = allowed.shape
    nq, nk = -(-T // Tq), -(-S // Sk)
    padded = np.zeros((B, N, nq * Tq, nk * Sk), bool)
    padded[:, :, :T, :S] = allowed
    blocks = padded.reshape(B, N, nq, Tq, nk, Sk)
    return blocks.any(axis=(3, 5)), blocks.all(axis=(3, 5))


def _numpy_document(T):
    q_idx, kv_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    same = SEGMENT_IDS[:, None, :, None] == SEGMENT_IDS[:, None, None, :]
    return same & (q_idx >= kv_idx)


def test_docstring_examples():
    results = doctest.testmod(mask_functions, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0, results


@pytest.mark.parametrize("block_size", [(4, 5), (13, 2)])
def test_make_block_mask_matches_numpy(block_size):
    T = SEGMENT_IDS.shape[1]
    bm = ja.make_block_mask(
        document_mask(jnp.asarray(SEGMENT_IDS)), 2, 3, T, T, block_size=block_size
    )
    assert bm.any_blocks.shape[:2] == (2, 1)  # reads b, not h
    any_, full = _numpy_blocks(_numpy_document(T), *block_size)
    np.testing.assert_array_equal(bm.any_blocks, any_)
    np.testing.assert_array_equal(bm.full_blocks, full)
    np.testing.assert_array_equal(bm.kv_num_blocks, any_.sum(-1))

    per_head = ja.make_block_mask(window_per_head, 2, 3, T, T + 1, block_size=block_size)
    assert per_head.any_blocks.shape[:2] == (1, 3)  # reads h, not b
    q_idx, kv_idx = np.arange(T)[:, None], np.arange(T + 1)[None, :]
    h = np.arange(3)[:, None, None]
    allowed = ((q_idx >= kv_idx) & (q_idx - kv_idx <= h))[None]
    any_, full = _numpy_blocks(allowed, *block_size)
    np.testing.assert_array_equal(per_head.any_blocks, any_)
    np.testing.assert_array_equal(per_head.full_blocks, full)


def test_the_kernel_visits_exactly_the_non_empty_blocks():
    """Its table = blocks with any allowed element after the window and key lengths; the
    blocks it runs without position masks and mask_fn hold only allowed elements (the key
    lengths mask every block)."""
    segment_ids = np.array([[0] * 8 + [1] * 5], np.int32)
    T, (Tq, Sk), left, kv_limit = 13, (4, 3), 7, 11
    document = document_mask(jnp.asarray(segment_ids))
    bm = ja.make_block_mask(document, 1, 1, T, T, block_size=(Tq, Sk))
    plan = chunked._Plan(
        T=T,
        S=T,
        q_chunk=Tq,
        k_chunk=Sk,
        is_causal=False,
        window=(left, 0),
        scale=1.0,
        dropout_rate=0.0,
        mask_shape=None,
        bias_shape=None,
        mask_fn=bm.mask_fn,
    )
    order, counts, full = chunked._block_table(plan, bm.any_blocks, bm.full_blocks, kv_limit)
    q_idx, kv_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    same = segment_ids[0][:, None] == segment_ids[0][None, :]
    allowed = same & (q_idx >= kv_idx) & (kv_idx >= q_idx - left)
    any_ = _numpy_blocks((allowed & (kv_idx < kv_limit))[None, None], Tq, Sk)[0][0, 0]
    all_ = _numpy_blocks(allowed[None, None], Tq, Sk)[1][0, 0]
    for i in range(plan.num_q_chunks):
        visited = sorted(int(j) for j in order[i, : int(counts[i])])
        assert visited == list(np.flatnonzero(any_[i])), i
    np.testing.assert_array_equal(np.asarray(full) & any_, all_ & any_)
    assert 0 < int(counts.sum()) < any_.size  # something is skipped
    assert bool(np.asarray(full).any())  # some blocks need no mask


@pytest.mark.parametrize("with_block_mask", [False, True])
def test_skipped_blocks_are_never_read_forward_or_backward(make_qkv, with_block_mask):
    """Keys 4.. are NaN and no query may attend them: output and gradients stay finite
    (and equal the reference on clean inputs) only if their blocks are never visited."""
    q, k, v = make_qkv(B=1, T=16, S=16, N=2, K=1, H=8, seed=3)

    def first_keys(b, h, q_idx, kv_idx):
        return (kv_idx < 4) & (q_idx >= kv_idx - 3)

    poisoned = jnp.arange(16)[None, :, None, None] >= 4
    k_nan, v_nan = (jnp.where(poisoned, jnp.nan, x) for x in (k, v))
    extra = {}
    if with_block_mask:
        extra["block_mask"] = ja.make_block_mask(first_keys, 1, 1, 16, 16, block_size=(4, 4))

    def loss(q, k, v):
        out = chunked.chunked_attention(
            q,
            k,
            v,
            call=ja.validation.check_attention_args(q, k, v, mask_fn=first_keys),
            inputs=ja.validation.KernelInputs(mask_fn=first_keys, **extra),
            query_chunk_size=4,
            key_chunk_size=4,
        )
        return jnp.sum(out**2), out

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = value_and_grad(q, k_nan, v_nan)
    want = reference.dot_product_attention(q, k, v, mask_fn=first_keys)
    np.testing.assert_allclose(out, want, atol=1e-5)

    def ref_loss(q, k, v):
        return jnp.sum(reference.dot_product_attention(q, k, v, mask_fn=first_keys) ** 2)

    want_grads = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)
    for name, got, wanted in zip("qkv", grads, want_grads, strict=True):
        assert bool(jnp.isfinite(got).all()), name
        np.testing.assert_allclose(got, wanted, atol=1e-5, err_msg=name)


def test_block_masks_made_inside_jit_and_passed_through_it(make_qkv):
    T = SEGMENT_IDS.shape[1]
    q, k, v = make_qkv(B=2, T=T, S=T, N=2, K=2, H=8, seed=4)
    want = reference.dot_product_attention(q, k, v, mask_fn=document_mask(jnp.asarray(SEGMENT_IDS)))

    @jax.jit
    def inside(q, k, v, segment_ids):
        bm = ja.make_block_mask(document_mask(segment_ids), 2, 1, T, T, block_size=(4, 4))
        return ja.dot_product_attention(q, k, v, block_mask=bm)

    np.testing.assert_allclose(inside(q, k, v, jnp.asarray(SEGMENT_IDS)), want, atol=1e-5)

    bm = ja.make_block_mask(document_mask(jnp.asarray(SEGMENT_IDS)), 2, 1, T, T, block_size=(4, 4))
    through = jax.jit(lambda q, k, v, bm: ja.dot_product_attention(q, k, v, block_mask=bm))
    np.testing.assert_allclose(through(q, k, v, bm), want, atol=1e-5)


CHILD = """
T = int(sys.argv[1])
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, T, 4, 64), np.float32)) for _ in range(3))
segment_ids = jnp.asarray(np.repeat(np.arange(16, dtype=np.int32), T // 16)[None])

def document(b, h, q_idx, kv_idx):
    return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)

attend = jax.jit(lambda q, k, v: ja.dot_product_attention(q, k, v, mask_fn=document))
out = attend(q, k, v)
print(json.dumps({"peak": peak_rss(), "finite": bool(jnp.isfinite(out).all())}))
"""


@pytest.mark.slow
def test_document_mask_at_32k_peaks_under_1_gib_in_a_fresh_process():
    """Issue 12's bound: T = 32768 (B 1, N 4, H 64, float32) with a 16-document mask_fn;
    the mask alone as bool [T, S] would take 1 GiB, the float32 logits 16 GiB."""
    result = child_peak(CHILD, 32768, timeout=900)
    assert result["finite"]
    assert result["peak"] < 2**30, f"peak RSS {result['peak'] / 2**20:.0f} MiB"
