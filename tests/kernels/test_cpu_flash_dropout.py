"""Dropout, ALiBi and tanh soft-capping in the compiled CPU kernel ("cpu_flash") against
the reference: the same dropped weights for the same key (also under ``jax.vmap`` and split
over devices), outputs and gradients, GQA, odd sizes, lengths, causal and windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import reference
from jax_attn.kernels import cpu_flash
from jax_attn.masks import make_dropout_mask

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)

# T and S cross the 64-row tiles; GQA (N 4 over K 2); H and H_v not multiples of 16.
SHAPE = dict(B=2, T=70, S=130, N=4, K=2, H=24, H_v=40)
SLOPES = jnp.array([0.5, 0.25, 0.125, 0.0625], jnp.float32)
KEY = jax.random.key(5)
CASES = {
    "dropout": dict(dropout_rate=0.3, dropout_rng=KEY),
    "causal dropout": dict(is_causal=True, dropout_rate=0.1, dropout_rng=KEY),
    "dropout near 1": dict(is_causal=True, dropout_rate=0.97, dropout_rng=KEY),
    "dropout, lengths": dict(
        dropout_rate=0.2,
        dropout_rng=KEY,
        query_seq_lengths=jnp.array([70, 9]),
        key_value_seq_lengths=jnp.array([0, 100]),
    ),
    "soft cap": dict(logit_soft_cap=0.7),
    "alibi, causal": dict(alibi_slopes=SLOPES, is_causal=True),
    "alibi [B, N], window": dict(
        alibi_slopes=jnp.stack([SLOPES, 2.0 * SLOPES]), local_window_size=(20, 3)
    ),
    "all, lengths": dict(
        alibi_slopes=SLOPES,
        logit_soft_cap=1.5,
        dropout_rate=0.2,
        dropout_rng=KEY,
        is_causal=True,
        key_value_seq_lengths=jnp.array([130, 50]),
    ),
}


def _flash(q, k, v, **kwargs):
    return ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)


def _assert_close(got, want, bound, name=""):
    scale = float(jnp.abs(want).max()) + 1e-6
    err = float(jnp.abs(got - want).max())
    assert err <= bound * scale, f"{name}: max error {err:.3g} against max |want| {scale:.3g}"


# the default suite's share; the slow step runs every case
# (rates near 1 and lengths: test_it_drops_exactly_the_weights_the_reference_drops and
# "all, lengths")
QUICK = ("causal dropout", "all, lengths")


@pytest.mark.parametrize(
    "case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)]
)
def test_outputs_and_gradients_equal_the_reference(case):
    q, k, v = make_qkv(**SHAPE)
    kwargs = CASES[case]
    weights = jnp.asarray(np.random.default_rng(7).standard_normal((2, 70, 4, 40)), jnp.float32)

    def run(attention):
        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, **kwargs) * weights)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v), jax.jit(
            lambda q, k, v: attention(q, k, v, **kwargs)
        )(q, k, v)

    (_, got_grads), got = run(_flash)
    (_, want_grads), want = run(reference.dot_product_attention)
    _assert_close(got, want, 2e-6, "out")
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        _assert_close(g, w, 4e-6, f"d{name}")


def _one_hot_values(B, S, K):
    """v ``[B, S, K, S]`` with key s's value the unit vector e_s: the output's channel s is
    then key s's (dropped, rescaled) weight, exactly 0 where it is dropped or masked."""
    return jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, K, S))


@pytest.mark.parametrize("rate, seed", [(0.1, 0), (0.5, 1), (0.97, 2)])
def test_it_drops_exactly_the_weights_the_reference_drops(seed, rate):
    B, T, S, N, K = 2, 67, 130, 4, 2
    q, k, _ = make_qkv(B=B, T=T, S=S, N=N, K=K, H=16, seed=seed)
    v = _one_hot_values(B, S, K)
    key = jax.random.key(seed + 10)
    out = _flash(q, k, v, dropout_rate=rate, dropout_rng=key)
    # [B, N, T, S]
    kept = jnp.transpose(out, (0, 2, 1, 3)) != 0.0
    want = make_dropout_mask(key, rate, (B, N, T, S))
    assert bool(jnp.array_equal(kept, want))
    _assert_close(
        out, reference.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=key), 2e-6
    )


@pytest.mark.slow
def test_vmap_over_keys_and_inputs_drops_as_the_vmapped_reference():
    B, T, S, N, K = 2, 9, 20, 4, 2
    q, k, _ = make_qkv(B=B, T=T, S=S, N=N, K=K, H=8, seed=4)
    v = _one_hot_values(B, S, K)
    keys = jax.random.split(jax.random.key(1), 3)

    def attend(attention, q, key):
        return attention(q, k, v, is_causal=True, dropout_rate=0.4, dropout_rng=key)

    # a batched key (each mapped call its own mask) and one shared key over a batch of q
    qs = jnp.stack([q, 2.0 * q, -q])
    for in_axes, args in (((None, 0), (q, keys)), ((0, None), (qs, keys[0]))):
        got = jax.vmap(lambda q, key: attend(_flash, q, key), in_axes)(*args)
        want = jax.vmap(lambda q, key: attend(reference.dot_product_attention, q, key), in_axes)(
            *args
        )
        assert bool(jnp.array_equal(got != 0.0, want != 0.0))
        _assert_close(got, want, 2e-6)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs conftest's 8 CPU devices")
@pytest.mark.slow  # test_partitioned_kernels splits cpu_flash in the default suite
def test_split_over_batch_and_heads_drops_the_global_indices():
    # each device runs its share of (b, n): the row seeds carry the global indices
    B, T, S, N, K = 2, 20, 40, 4, 4
    q, k, _ = make_qkv(B=B, T=T, S=S, N=N, K=K, H=8, seed=6)
    v = _one_hot_values(B, S, K)
    mesh = jax.make_mesh((2, 4), ("data", "heads"))
    spec = NamedSharding(mesh, P("data", None, "heads", None))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    key = jax.random.key(8)
    slopes = jnp.stack([SLOPES, SLOPES[::-1]])
    kwargs = dict(dropout_rate=0.3, dropout_rng=key, alibi_slopes=slopes, logit_soft_cap=2.0)
    got = jax.jit(lambda q, k, v: _flash(q, k, v, **kwargs))(q, k, v)
    assert got.sharding.spec[:3] == ("data", None, "heads")
    whole = (jnp.asarray(np.asarray(x)) for x in (q, k, v))  # the reference on one device
    want = reference.dot_product_attention(*whole, **kwargs)
    assert bool(jnp.array_equal(got != 0.0, want != 0.0))
    _assert_close(got, want, 2e-6)


def test_forward_mode_with_dropout_and_options_equals_the_reference():
    # the kernel's tangent entry (one key tile: S 70 crosses two, T 9 < S)
    B, T, S, N, K = 2, 9, 70, 4, 2
    q, k, v = make_qkv(B=B, T=T, S=S, N=N, K=K, H=8, H_v=12, seed=9)
    kwargs = dict(dropout_rate=0.3, dropout_rng=KEY, alibi_slopes=SLOPES, logit_soft_cap=1.0)
    dq, dk, dv = (0.5 * q, -0.3 * k, 0.7 * v)
    got = jax.jvp(lambda q, k, v: _flash(q, k, v, **kwargs), (q, k, v), (dq, dk, dv))
    want = jax.jvp(
        lambda q, k, v: reference.dot_product_attention(q, k, v, **kwargs), (q, k, v), (dq, dk, dv)
    )
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w, 2e-6)


@pytest.mark.slow  # test_cpu_flash_sparse's composition test runs these with a mask_fn
def test_options_and_dropout_compose_with_mask_and_bias():
    """The bias is added after the score options (the reference's order), so its gradient
    is the logits' before the soft cap's derivative; jvp takes the bias' tangent there too."""
    q, k, v = make_qkv(**SHAPE)
    rng = np.random.default_rng(3)
    bias = jnp.asarray(rng.standard_normal((1, 4, 70, 130)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 1, 130)) < 0.8)
    kwargs = dict(
        mask=mask,
        alibi_slopes=SLOPES,
        logit_soft_cap=1.5,
        dropout_rate=0.2,
        dropout_rng=KEY,
        is_causal=True,
    )
    weights = jnp.asarray(rng.standard_normal((2, 70, 4, 40)), jnp.float32)

    def loss(attention):
        return lambda q, k, v, bias: jnp.sum(attention(q, k, v, bias=bias, **kwargs) * weights)

    args = (q, k, v, bias)
    got = jax.jit(jax.grad(loss(_flash), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.grad(loss(reference.dot_product_attention), argnums=(0, 1, 2, 3)))(*args)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
        _assert_close(g, w, 4e-6, name)
    tangents = tuple(jnp.ones_like(x) * 0.1 for x in args)
    _, got_t = jax.jit(lambda *a: jax.jvp(loss(_flash), a, tangents))(*args)
    _, want_t = jax.jit(lambda *a: jax.jvp(loss(reference.dot_product_attention), a, tangents))(
        *args
    )
    _assert_close(got_t, want_t, 4e-6, "jvp")
