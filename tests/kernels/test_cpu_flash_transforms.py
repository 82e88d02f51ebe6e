"""The compiled kernel's plain entries for transformations: ``forward`` -> (out, lse),
``tangent`` (the JVP of both) and ``backward`` with a cotangent for lse, against
``jax.jvp`` / ``jax.vjp`` of a float64 reference written here from jnp ops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv

from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)


def reference_out_lse(q, k, v, q_lengths, kv_lengths, *, scale, causal, window, mask=None):
    """(out [B, T, N, H_v], lse [B, N, T]) with every mask as the kernel's (bottom-right
    causal, windows, lengths, GQA, and ``mask`` [B|1, N|1, T, S] for a mask_fn's tiles);
    rows with nothing to attend give zeros for both."""
    B, T, N, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    k, v = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
    # [B, N, T, S]
    logits = scale * jnp.einsum("BTNH,BSNH->BNTS", q, k)
    # [1, 1, T, 1] query rows, [1, 1, 1, S] keys
    t = jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
    s = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
    pos = t + S - T
    # [B, 1, T, S]
    allowed = (s < kv_lengths[:, None, None, None]) & (t < q_lengths[:, None, None, None])
    if causal:
        allowed &= s <= pos
    if window is not None:
        allowed &= (s >= pos - window[0]) & (s <= pos + window[1])
    if mask is not None:
        allowed = allowed & mask
    live = allowed.any(-1)  # [B, 1, T]
    # finite stand-ins where masked, so no NaN reaches a derivative; the rows with nothing
    # to attend are replaced by zeros afterwards
    logits = jnp.where(allowed, logits, -1e30)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.where(allowed, jnp.exp(logits - lse[..., None]), 0.0)
    out = jnp.einsum("BNTS,BSNH->BTNH", weights, v)
    out = jnp.where(live.transpose(0, 2, 1)[..., None], out, 0.0)
    return out, jnp.where(live, lse, 0.0)


SHAPE = dict(B=2, T=70, S=130, N=4, K=2, H=24, H_v=40)  # tiles crossed, packed keys
SMALL = dict(B=2, T=9, S=5, N=6, K=2, H=8, H_v=12)  # T > S, one key tile
CASES = {
    "plain": (SHAPE, {}),
    "causal": (SHAPE, {"causal": True}),
    "window": (SHAPE, {"window": (20, 3)}),
    "lengths": (SHAPE, {"causal": True, "lengths": ([70, 9], [0, 100])}),
    "small_causal_window": (SMALL, {"causal": True, "window": (2, 1)}),
    "small_lengths": (SMALL, {"lengths": ([9, 4], [5, 2])}),
}


def _setup(case):
    shape, options = CASES[case]
    q, k, v = make_qkv(**shape, seed=11)
    rng = np.random.default_rng(12)
    dq, dk, dv = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k, v))
    B, T, S = shape["B"], shape["T"], shape["S"]
    q_lengths, kv_lengths = options.get("lengths", ([T] * B, [S] * B))
    q_lengths, kv_lengths = (jnp.asarray(x, jnp.int32) for x in (q_lengths, kv_lengths))
    call = dataclasses.replace(
        check_attention_args(q, k, v),
        is_causal=options.get("causal", False),
        window=options.get("window"),
    )

    def reference(q, k, v):
        return reference_out_lse(
            q, k, v, q_lengths, kv_lengths,
            scale=call.scale, causal=call.is_causal, window=call.window,
        )  # fmt: skip

    return call, (q, k, v), (q_lengths, kv_lengths), (dq, dk, dv), reference


def _close(got, want, name):
    want = np.asarray(want)
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=name)


def _float64(*arrays):
    return [jnp.asarray(np.asarray(x, np.float64)) for x in arrays]


@pytest.mark.parametrize("case", sorted(CASES))
def test_tangent_equals_jvp_of_the_float64_reference(case):
    call, qkv, lengths, tangents, reference = _setup(case)
    out, lse = cpu_flash.forward(call, *qkv, *lengths)
    d_out, d_lse = jax.jit(cpu_flash.tangent, static_argnums=0)(
        call, *qkv, *lengths, out, lse, *tangents
    )
    with jax.enable_x64(True):
        (want_out, want_lse), (want_d_out, want_d_lse) = jax.jvp(
            reference, tuple(_float64(*qkv)), tuple(_float64(*tangents))
        )
    live = np.asarray(want_lse) != 0.0
    _close(out, want_out, "out")
    _close(np.where(live, lse, 0.0), want_lse, "lse")
    _close(d_out, want_d_out, "d_out")
    _close(d_lse, want_d_lse, "d_lse")
    assert float(np.abs(want_d_lse).max()) > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_with_an_lse_cotangent_equals_vjp_of_the_float64_reference(case):
    call, qkv, lengths, _, reference = _setup(case)
    out, lse = cpu_flash.forward(call, *qkv, *lengths)
    rng = np.random.default_rng(13)
    d_out, d_lse = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (out, lse))
    grads = jax.jit(cpu_flash.backward, static_argnums=0)(
        call, *qkv, *lengths, out, lse, d_out, d_lse
    )
    with jax.enable_x64(True):
        _, pullback = jax.vjp(reference, *_float64(*qkv))
        want = pullback(tuple(_float64(d_out, d_lse)))
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert got.dtype == jnp.float32 and got.shape == expected.shape
        _close(got, expected, name)


def test_backward_with_zero_lse_cotangent_is_the_custom_vjp():
    call, qkv, lengths, _, _ = _setup("causal")
    out, lse = cpu_flash.forward(call, *qkv, *lengths)
    d_out = jnp.asarray(np.random.default_rng(14).standard_normal(out.shape), jnp.float32)
    grads = cpu_flash.backward(call, *qkv, *lengths, out, lse, d_out, jnp.zeros_like(lse))
    _, pullback = jax.vjp(lambda q, k, v: cpu_flash._flash(call, q, k, v, *lengths), *qkv)
    # not bit for bit: the backward's items add their dQ shares in whichever order the
    # threads reach the lock
    for got, want in zip(grads, pullback(d_out), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def _tiled(b, h, q_idx, kv_idx):
    # documents on tile boundaries (full and empty tiles); head 1 partial
    return (q_idx // 64 == kv_idx // 64) & ((h != 1) | (kv_idx % 3 != 0))


def test_entries_with_a_mask_fns_tiles_equal_the_float64_reference():
    """forward, tangent and backward (with an lse cotangent) given a tile table and bitmasks
    (``cpu_flash_tiles.tile_table``) against jvp / vjp of the masked reference."""
    from jax_attn.kernels import cpu_flash_tiles
    from jax_attn.validation import KernelInputs

    call, qkv, lengths, tangents, _ = _setup("causal")
    B, T, N, _ = qkv[0].shape
    S = qkv[1].shape[1]
    tiles = cpu_flash_tiles.tile_table(call, KernelInputs(mask_fn=_tiled))
    assert {-2, -1} <= set(np.unique(tiles[0]).tolist()) and int(tiles[0].max()) >= 0
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    # [1, N, T, S]
    mask = np.stack([(t // 64 == s // 64) & ((h != 1) | (s % 3 != 0)) for h in range(N)])[None]

    def reference(q, k, v):
        return reference_out_lse(
            q, k, v, *lengths, scale=call.scale, causal=True, window=None, mask=mask
        )

    out, lse = cpu_flash.forward(call, *qkv, *lengths, tiles=tiles)
    d_out, d_lse = cpu_flash.tangent(call, *qkv, *lengths, out, lse, *tangents, tiles=tiles)
    rng = np.random.default_rng(15)
    ct_out, ct_lse = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (out, lse))
    grads = cpu_flash.backward(call, *qkv, *lengths, out, lse, ct_out, ct_lse, tiles=tiles)
    with jax.enable_x64(True):
        (want_out, want_lse), (want_d_out, want_d_lse) = jax.jvp(
            reference, tuple(_float64(*qkv)), tuple(_float64(*tangents))
        )
        _, pullback = jax.vjp(reference, *_float64(*qkv))
        want_grads = pullback(tuple(_float64(ct_out, ct_lse)))
    live = np.asarray(want_lse) != 0.0
    _close(out, want_out, "out")
    _close(np.where(live, lse, 0.0), want_lse, "lse")
    _close(d_out, want_d_out, "d_out")
    _close(d_lse, want_d_lse, "d_lse")
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        _close(got, expected, name)
