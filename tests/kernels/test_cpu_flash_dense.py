"""The compiled kernel ("cpu_flash") with a boolean ``mask`` and an additive ``bias``
broadcastable to ``[B, N, T, S]``: outputs against the float64 oracle, gradients (the
bias' summed over its broadcast axes) and transformations against the reference, fully
masked rows, the NaN policy, dispatch, and a split over devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import allowed_error, attention_float64, make_qkv
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import dispatch, reference
from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)

# GQA, T and S cross the 64-row tiles (the keys three of them), odd head dims
SHAPE = dict(B=2, T=70, S=130, N=4, K=2, H=24, H_v=40)
B, T, S, N = SHAPE["B"], SHAPE["T"], SHAPE["S"], SHAPE["N"]


def _arrays():
    rng = np.random.default_rng(21)
    # [B, 1, 1, S] key padding: the second sequence's last 70 keys (a whole key tile) padded
    padding = np.arange(S)[None, None, None, :] < np.array([S, 60])[:, None, None, None]
    dense = rng.random((B, N, T, S)) > 0.3
    # [T, S] with rows 3 and 40 masked entirely
    rows_out = rng.random((T, S)) > 0.2
    rows_out[[3, 40]] = False
    # [B, 1, 1, S] bias, -inf (masked) on the second sequence's first 10 keys
    minus_inf = rng.standard_normal((B, 1, 1, S)).astype(np.float32)
    minus_inf[1, 0, 0, :10] = -np.inf
    return {
        "padding": jnp.asarray(padding),
        "dense": jnp.asarray(dense),
        "rows_out": jnp.asarray(rows_out),
        "head_keys": jnp.asarray(rng.random((1, N, 1, S)) > 0.4),
        "bias_heads": jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32),
        "bias_keys": jnp.asarray(minus_inf),
        "bias_rows": jnp.asarray(rng.standard_normal((T, S)), jnp.float32),
        "bias_full": jnp.asarray(rng.standard_normal((B, N, T, S)), jnp.float32),
    }


ARRAYS = _arrays()
CASES = {
    "padding mask, causal": dict(mask="padding", is_causal=True),
    "dense mask, lengths": dict(
        mask="dense",
        query_seq_lengths=jnp.array([70, 33]),
        key_value_seq_lengths=jnp.array([130, 90]),
    ),
    "rows fully masked, bias [B,1,1,S] with -inf": dict(mask="rows_out", bias="bias_keys"),
    "bias [1,N,T,S], window": dict(bias="bias_heads", local_window_size=(40, 5)),
    "bias [T,S], mask [1,N,1,S], causal": dict(bias="bias_rows", mask="head_keys", is_causal=True),
    "bias [B,N,T,S], padding": dict(bias="bias_full", mask="padding"),
}


def _flash(q, k, v, **kwargs):
    return ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)


def _options(case):
    return {
        name: ARRAYS[value] if name in ("mask", "bias") else value
        for name, value in CASES[case].items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_equals_float64_reference(case):
    q, k, v = make_qkv(**SHAPE)
    kwargs = _options(case)
    want = attention_float64(q, k, v, **kwargs)
    got = jax.jit(
        lambda q, k, v: ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)
    )(q, k, v)
    np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want, **kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_the_reference(case):
    q, k, v = make_qkv(**SHAPE)
    kwargs = _options(case)
    bias = kwargs.pop("bias", None)
    weights = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, N, 40)), jnp.float32)

    def grads(implementation):
        def loss(q, k, v, bias):
            out = ja.dot_product_attention(
                q, k, v, bias=bias, implementation=implementation, **kwargs
            )
            return jnp.sum(out * weights)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    got, want = grads("cpu_flash"), grads("reference")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and np.isfinite(np.asarray(g)).all(), name
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-6 * max(scale, 1.0), err_msg=name)


def test_fully_masked_rows_are_zero():
    q, k, v = make_qkv(**SHAPE)
    # rows 3 and 40 by the mask; every row of sequence 1 by a bias of -inf on every key
    bias = jnp.zeros((B, 1, 1, S)).at[1].set(-jnp.inf)
    out = ja.dot_product_attention(
        q, k, v, mask=ARRAYS["rows_out"], bias=bias, implementation="cpu_flash"
    )
    assert not jnp.any(out[:, [3, 40]]) and not jnp.any(out[1])
    assert jnp.all(jnp.any(out[0, :3] != 0, axis=-1))


def _transformations_against_the_reference(names):
    """jvp (the bias' tangent reaching the output), grad, checkpoint, the Hessian-vector
    product, grad(grad) and vmap, on a [B, 1, T, S] mask and a [1, N, T, S] bias."""
    B_, T_, N_, K_, H_ = 2, 7, 4, 2, 4
    q, k, v = make_qkv(B=B_, T=T_, S=T_, N=N_, K=K_, H=H_, seed=3)
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((1, N_, T_, T_)), jnp.float32)
    mask = jnp.asarray(rng.random((B_, 1, T_, T_)) > 0.3)
    lengths = jnp.array([7, 4], jnp.int32)

    def run(implementation):
        def f(q, k, v, bias):
            return ja.dot_product_attention(
                q,
                k,
                v,
                bias=bias,
                mask=mask,
                is_causal=True,
                key_value_seq_lengths=lengths,
                implementation=implementation,
            )

        def loss(q, k, v, bias):
            return jnp.sum(jnp.sin(f(q, k, v, bias)) * w)

        grad = jax.grad(loss, (0, 1, 2, 3))
        thunks = {
            "jvp": lambda: jax.jvp(f, (q, k, v, bias), (w, 0.5 * k, v, 0.5 * bias)),
            "grad": lambda: jax.jit(grad)(q, k, v, bias),
            "checkpoint(grad)": lambda: jax.grad(jax.checkpoint(loss), (0, 1, 2, 3))(q, k, v, bias),
            "hvp": lambda: jax.jvp(lambda b: grad(q, k, v, b), (bias,), (bias,)),
            "grad(grad)": lambda: jax.grad(lambda b: jnp.sum(grad(q, k, v, b)[3] ** 2))(bias),
            "vmap(grad)": lambda: jax.vmap(lambda b: grad(q, k, v, b)[3])(jnp.stack([bias, -bias])),
        }
        return {name: thunks[name]() for name in names}

    ours, theirs = run("cpu_flash"), run("reference")
    for name in ours:
        for a, e in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(theirs[name]), strict=True):
            scale = float(jnp.max(jnp.abs(e))) + 1e-6
            err = float(jnp.max(jnp.abs(a - e)))
            assert err <= 2e-5 * scale, f"{name}: max error {err:.3g}, max |expected| {scale:.3g}"


def test_first_order_transformations_with_mask_and_bias():
    _transformations_against_the_reference(("jvp", "grad"))


@pytest.mark.slow
def test_second_order_and_checkpoint_with_mask_and_bias():
    _transformations_against_the_reference(("checkpoint(grad)", "hvp", "grad(grad)", "vmap(grad)"))


def test_nan_and_inf_in_bias_follow_the_nan_policy():
    q, k, v = make_qkv(B=2, T=9, S=11, N=2, K=1, H=8)
    bias = jnp.zeros((2, 1, 1, 11)).at[0, 0, 0, 4].set(jnp.nan).at[1, 0, 0, 6].set(jnp.inf)
    bias = bias.at[1, 0, 0, 2].set(-jnp.inf)  # -inf masks: no fault
    kwargs = dict(bias=bias, is_causal=True)
    got = ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)
    want = reference.dot_product_attention(q, k, v, **kwargs)
    # the rows that attend key 4 (sequence 0) or key 6 (sequence 1) are NaN, others finite
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any() and not np.isnan(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_the_default_serves_mask_and_bias_with_the_compiled_kernel():
    q, k, v = make_qkv(**SHAPE)
    for options in ({"mask": ARRAYS["padding"]}, {"bias": ARRAYS["bias_rows"]}):
        call = check_attention_args(q, k, v, **options)
        assert dispatch.select_implementation(call, "cpu") == "cpu_flash"


def test_bias_where_a_mesh_axis_is_partitioned_is_declined():
    if len(jax.devices()) < 2:
        pytest.skip("needs conftest's 8 CPU devices")
    q, k, v = make_qkv(B=8, T=8, S=8, N=2, K=1, H=8)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with jax.set_mesh(mesh):
        call = check_attention_args(q, k, v, bias=jnp.zeros((8, 8)))
        assert "no bias" in dispatch.unsupported_reason("cpu_flash", call, "cpu")
        call = check_attention_args(q, k, v, mask=jnp.ones((8, 1, 1, 8), bool))
        assert dispatch.unsupported_reason("cpu_flash", call, "cpu") is None


@pytest.mark.slow  # test_partitioned_kernels splits cpu_flash in the default suite
def test_plain_jit_of_sharded_arrays_with_mask_and_bias():
    """A [B, 1, 1, S] mask split with the batch, a [1, N, T, S] bias broadcast over it (its
    backward runs whole), the heads split too: results and gradients as on one device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs conftest's 8 CPU devices")
    B_, T_, N_, K_ = 8, 16, 4, 2
    q, k, v = make_qkv(B=B_, T=T_, S=T_, N=N_, K=K_, H=8, seed=5)
    rng = np.random.default_rng(6)
    mask = jnp.asarray(rng.random((B_, 1, 1, T_)) > 0.2)
    bias = jnp.asarray(rng.standard_normal((1, N_, T_, T_)), jnp.float32)

    def step(attention):
        def loss(q, k, v, mask, bias):
            out = attention(q, k, v, mask=mask, bias=bias, is_causal=True)
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 4)))

    mesh = jax.make_mesh((4, 2), ("data", "heads"), axis_types=(AxisType.Auto,) * 2)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    spec = P("data", None, "heads")
    args = (put(q, spec), put(k, spec), put(v, spec), put(mask, P("data")), put(bias, P()))
    compiled = step(_flash).lower(*args).compile().as_text()
    assert "jax_attn_cpu_flash_forward" in compiled
    got = step(_flash)(*args)
    want = step(reference.dot_product_attention)(q, k, v, mask, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
