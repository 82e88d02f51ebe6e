"""Every JAX transformation through every implementation, against the reference.

Forward mode (``jvp``, ``jacfwd``, ``linearize``), second order (``hessian``,
``grad(grad)``, ``jacfwd(grad)``, the Hessian-vector product ``jvp(grad)``), each under
``jit``, ``vmap`` and ``checkpoint``, on the kernels and through the modules and
``flax_attention_fn``; and the memory that forward mode and the Hessian-vector product
take at T = 8192 (flash memory: O(T)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import child_peak

import jax_attn as ja
from jax_attn import reference

B, T, S, N, K, H = 2, 7, 7, 4, 2, 4
KERNELS = [
    name for name in ("chunked", "cpu_flash", "xla") if name in ja.available_implementations()
]
CASES = {
    "causal, lengths": dict(is_causal=True, key_value_seq_lengths=np.array([7, 4], np.int32)),
    "window, query lengths": dict(
        local_window_size=(2, 1), query_seq_lengths=np.array([5, 7], np.int32)
    ),
    # rows with nothing to attend among them (b 0, h 1, row 0)
    "mask_fn reading b and h, causal": dict(
        is_causal=True, mask_fn=lambda b, h, i, j: (i + j + b + h) % 3 != 1
    ),
}


# Served natively by cpu_flash (dropout, ALiBi and soft-capping in the compiled kernel;
# chunked's pure maps for second order), through score_fn by chunked.
OPTION_CASES = {
    "dropout, alibi, soft cap": dict(
        is_causal=True,
        key_value_seq_lengths=np.array([7, 5], np.int32),
        dropout_rate=0.25,
        dropout_rng=jax.random.key(3),
        alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625], np.float32),
        logit_soft_cap=2.0,
    ),
}


def _inputs(seed=0, T=T, S=S):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    return q, k, v, w


def _transformations(f, q, k, v, w):
    """name -> thunk; ``f(q, k, v) -> [B, T, N, H]``."""

    def loss(q, k, v):
        return jnp.sum(jnp.sin(f(q, k, v)) * w)

    grad = jax.grad(loss, (0, 1, 2))
    tangents = (w, 0.5 * k, -0.3 * v)
    return {
        "jvp": lambda: jax.jvp(f, (q, k, v), tangents),
        "jit(jvp)": lambda: jax.jit(lambda *p: jax.jvp(f, p, tangents))(q, k, v),
        "vmap(jvp)": lambda: jax.vmap(lambda t: jax.jvp(f, (q, k, v), (t, k, v))[1])(
            jnp.stack([w, 2.0 * q])
        ),
        "linearize": lambda: jax.linearize(f, q, k, v)[1](*tangents),
        "jacfwd": lambda: jax.jacfwd(lambda v0: f(q, k, v.at[0, 0].set(v0)))(v[0, 0]),
        "grad": lambda: grad(q, k, v),
        "checkpoint(grad)": lambda: jax.grad(jax.checkpoint(loss), (0, 1, 2))(q, k, v),
        "grad(grad)": lambda: jax.grad(lambda k: jnp.sum(grad(q, k, v)[0] ** 2))(k),
        "hvp": lambda: jax.jvp(lambda q: grad(q, k, v), (q,), (w,)),
        "jit(hvp)": lambda: jax.jit(lambda q: jax.jvp(lambda q: grad(q, k, v), (q,), (w,)))(q),
        "hessian": lambda: jax.hessian(lambda v0: loss(q, k, v.at[1, 2].set(v0)))(v[1, 2]),
        "jacfwd(grad)": lambda: jax.jacfwd(lambda q0: grad(q.at[0, 3].set(q0), k, v)[1])(q[0, 3]),
        "vmap(hvp)": lambda: jax.vmap(lambda t: jax.jvp(lambda q: grad(q, k, v)[2], (q,), (t,))[1])(
            jnp.stack([w, q])
        ),
    }


def _assert_close(actual, expected, rtol=2e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(e))) + 1e-6
        err = float(jnp.max(jnp.abs(a - e)))
        assert err <= rtol * scale, f"max error {err:.3g} against max |expected| {scale:.3g}"


# The default suite's share (compiling each transformation costs seconds); the slow step
# runs every transformation on every kernel and case.
QUICK = ("jvp", "grad", "hvp", "grad(grad)")


@pytest.mark.parametrize("implementation", [k for k in ("chunked", "cpu_flash") if k in KERNELS])
def test_first_and_second_order_equal_the_reference(implementation):
    # cpu_flash is the CPU default: all four; chunked's maps (second order everywhere)
    # forward mode and the Hessian-vector product
    _check(
        implementation, "causal, lengths", QUICK if implementation == "cpu_flash" else QUICK[::2]
    )


@pytest.mark.skipif("cpu_flash" not in KERNELS, reason="cpu_flash not built here")
def test_cpu_flash_with_a_mask_fn_first_and_second_order():
    # a mask_fn's tiles: the sparse tangent, and chunked's maps on their table (grad:
    # test_cpu_flash_sparse.py; all of them in the slow step)
    _check("cpu_flash", "mask_fn reading b and h, causal", ("jvp", "hvp"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("implementation", KERNELS)
def test_every_transformation_equals_the_reference(implementation, case):
    _check(implementation, case, None)


@pytest.mark.parametrize("names", [QUICK, pytest.param(None, marks=pytest.mark.slow)])
@pytest.mark.skipif("cpu_flash" not in KERNELS, reason="cpu_flash not built here")
def test_cpu_flash_dropout_and_score_options_under_transformations(names):
    _check("cpu_flash", "dropout, alibi, soft cap", names)


def _check(implementation, case, names):
    q, k, v, w = _inputs()
    options = {**CASES, **OPTION_CASES}[case]

    def fast(q, k, v):
        return ja.dot_product_attention(q, k, v, implementation=implementation, **options)

    def oracle(q, k, v):
        return reference.dot_product_attention(q, k, v, **options)

    ours, theirs = _transformations(fast, q, k, v, w), _transformations(oracle, q, k, v, w)
    for name in names or ours:
        try:
            _assert_close(ours[name](), theirs[name]())
        except AssertionError as error:
            raise AssertionError(f"{implementation}, {name}: {error}") from None


@pytest.mark.slow
def test_chunked_transformations_with_mask_bias_dropout_and_functions():
    """The chunked kernel's other inputs: bias (with its own tangent), mask, dropout,
    ``score_fn`` and ``mask_fn``."""
    q, k, v, w = _inputs(1)
    rng = np.random.default_rng(2)
    bias = jnp.asarray(rng.normal(size=(1, N, T, S)), jnp.float32)
    options = dict(
        mask=jnp.asarray(rng.random((B, 1, T, S)) > 0.3),
        dropout_rate=0.25,
        dropout_rng=jax.random.key(3),
        score_fn=lambda s, b, h, i, j: 4.0 * jnp.tanh(s / 4.0),
        mask_fn=lambda b, h, i, j: (i - j) % 3 != 1,
    )

    def run(attention):
        def f(q, k, v, bias):
            return attention(q, k, v, bias=bias, **options)

        def loss(q, k, v, bias):
            return jnp.sum(jnp.sin(f(q, k, v, bias)) * w)

        grad = jax.grad(loss, (0, 1, 2, 3))
        return (
            jax.jvp(f, (q, k, v, bias), (w, k, v, 0.5 * bias)),
            grad(q, k, v, bias),
            jax.jvp(lambda b: grad(q, k, v, b), (bias,), (bias,)),
            jax.grad(lambda b: jnp.sum(grad(q, k, v, b)[3] ** 2))(bias),
        )

    chunked = functools.partial(ja.dot_product_attention, implementation="chunked")
    _assert_close(run(chunked), run(reference.dot_product_attention))


@pytest.mark.slow
def test_modules_and_flax_attention_fn_take_jvp_and_hessian():
    """Through the default path: the book's module and Flax's own module."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    dx = jax.random.normal(jax.random.key(1), (2, 6, 8))

    def check(module, oracle_module):
        params = module.init(jax.random.key(2), x)

        def f(m):
            return lambda x: m.apply(params, x)

        _assert_close(jax.jvp(f(module), (x,), (dx,)), jax.jvp(f(oracle_module), (x,), (dx,)))

        def loss(m):
            return lambda x0: jnp.sum(jnp.sin(m.apply(params, x.at[0, 2].set(x0))))

        _assert_close(jax.hessian(loss(module))(x[0, 2]), jax.hessian(loss(oracle_module))(x[0, 2]))

    mha = functools.partial(ja.MultiHeadAttention, 8, 8, 6, 0.0, 2)
    check(mha(), mha(implementation="reference"))
    causal = functools.partial(ja.flax_attention_fn, is_causal=True)
    oracle = functools.partial(causal, implementation="reference")
    flax_mha = functools.partial(nn.MultiHeadDotProductAttention, num_heads=2, qkv_features=8)
    check(flax_mha(attention_fn=causal), flax_mha(attention_fn=oracle))


_MEMORY = """
B, T, N, H = 1, int(sys.argv[1]), 4, 64
q = k = v = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
attention = lambda q, k, v: ja.dot_product_attention(q, k, v, is_causal=True)
loss = lambda q, k, v: jnp.sum(attention(q, k, v) ** 2)
programs = {
    "jvp": lambda q, k, v: jax.jvp(attention, (q, k, v), (q, k, v)),
    "hvp": lambda q, k, v: jax.jvp(lambda q: jax.grad(loss)(q, k, v), (q,), (q,)),
}
temp = {
    name: jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    for name, fn in programs.items()
}
print(json.dumps(temp))
"""


@pytest.mark.slow
def test_forward_mode_and_hessian_vector_product_keep_flash_memory():
    """B 1, T 8192, N 4, H 64 causal float32 in a one-device process (the default is the
    compiled kernel): the plain jvp would hold 1 GiB of logits and as much of tangents."""
    temp = child_peak(_MEMORY, "8192")
    assert temp["jvp"] < 256 * 2**20, temp
    assert temp["hvp"] < 256 * 2**20, temp


def test_module_jvp_through_the_default():
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    mha = functools.partial(ja.MultiHeadAttention, 8, 8, 6, 0.0, 2)
    params = mha().init(jax.random.key(2), x)

    def f(module):
        return lambda x: module.apply(params, x)

    _assert_close(
        jax.jvp(f(mha()), (x,), (x,)), jax.jvp(f(mha(implementation="reference")), (x,), (x,))
    )


def _first_and_second_order(f, q, k, v, w):
    names = ("jvp", "grad", "hvp", "grad(grad)")
    thunks = _transformations(f, q, k, v, w)
    return [thunks[name]() for name in names]


@pytest.mark.slow
def test_ring_attention_takes_forward_mode_and_second_order():
    """Sequence-parallel over 4 devices (causal: zig-zag), jitted under the mesh."""
    from jax.sharding import AxisType

    q, k, v, w = _inputs(4, T=8, S=8)
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,))

    def ring(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation="ring")

    with jax.set_mesh(mesh):
        ours = jax.jit(lambda q, k, v, w: _first_and_second_order(ring, q, k, v, w))(q, k, v, w)

    def oracle(q, k, v):
        return reference.dot_product_attention(q, k, v, is_causal=True)

    _assert_close(jax.device_get(ours), _first_and_second_order(oracle, q, k, v, w))


@pytest.mark.slow
def test_default_inside_shard_map_takes_jvp_and_hessian_vector_products():
    """Each device's share of the batch (the default kernel, manual axes), against the
    reference on the whole batch."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    q, k, v, w = _inputs(5)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))

    def run(attention):
        def per_device(q, k, v, w):
            return _first_and_second_order(
                lambda q, k, v: attention(q, k, v, is_causal=True), q, k, v, w
            )

        return per_device

    sharded = jax.shard_map(
        run(ja.dot_product_attention), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    batch_split = jax.sharding.NamedSharding(mesh, P("data"))
    ours = jax.jit(sharded)(*(jax.device_put(x, batch_split) for x in (q, k, v, w)))
    per_row = [
        run(reference.dot_product_attention)(*(x[i : i + 1] for x in (q, k, v, w)))
        for i in range(B)
    ]
    _assert_close(ours, jax.tree.map(lambda *rows: jnp.concatenate(rows), *per_row))


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_pallas_kernels_take_forward_mode_and_second_order(implementation, monkeypatch):
    """JAX's Pallas kernels (interpret mode) hold a custom_vjp: composable() gives them the
    chunked kernel's maps for what it cannot do."""
    from jax_attn.kernels import pallas_gpu

    monkeypatch.setenv(pallas_gpu.INTERPRET_ENV, "1")
    q, k, v, w = _inputs(6, T=8, S=8)

    def pallas(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    def oracle(q, k, v):
        return reference.dot_product_attention(q, k, v, is_causal=True)

    _assert_close(
        _first_and_second_order(pallas, q, k, v, w), _first_and_second_order(oracle, q, k, v, w)
    )


@pytest.mark.slow
def test_forward_mode_and_hessian_under_x64():
    """``jax_enable_x64`` makes Python ints int64 and floats float64: the maps must keep
    their float32 and int32 types."""
    q, k, v, w = _inputs(7)
    lengths = np.array([7, 4], np.int32)

    def run(attention):
        def f(q):
            return attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)

        def loss(q0):
            return jnp.sum(f(q.at[0, 3, 0].set(q0)) ** 2)

        return jax.jvp(f, (q,), (w,)), jax.hessian(loss)(q[0, 3, 0])

    with jax.enable_x64(True):
        ours = run(functools.partial(ja.dot_product_attention, implementation="chunked"))
        theirs = run(reference.dot_product_attention)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ours))
    _assert_close(ours, theirs)
