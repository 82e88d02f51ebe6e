"""The default implementation on every kind of mesh: Explicit axes, Auto axes and inside
``jax.shard_map``, forward and gradient equal to one device (8 virtual CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import reference

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason=f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
    f"is imported; tests/conftest.py sets it), found {len(jax.devices())}",
)

B, T, N, K, H = 8, 16, 4, 2, 8
OPTIONS = {"is_causal": True}


def _inputs():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, B, T, K, H)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, T + 1, B), jnp.int32)
    return q, kv[0], kv[1], lengths


def _loss(attention):
    def loss(q, k, v, lengths):
        out = attention(q, k, v, key_value_seq_lengths=lengths, **OPTIONS)
        return jnp.sum(jnp.sin(out)), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.fixture(scope="module")
def one_device():
    """((loss, out), (dq, dk, dv)) of the oracle on one device."""
    q, k, v, lengths = _inputs()
    return jax.jit(_loss(reference.dot_product_attention))(q, k, v, lengths)


def _assert_equal_to_one_device(got, want):
    (loss, out), grads = got
    (want_loss, want_out), want_grads = want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def _batch_sharded(mesh, *arrays):
    return tuple(jax.device_put(x, NamedSharding(mesh, P("data"))) for x in arrays)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_default_implementation_on_a_data_parallel_mesh(one_device, axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    inputs = _batch_sharded(mesh, *_inputs())
    with jax.set_mesh(mesh):
        got = jax.jit(_loss(ja.dot_product_attention))(*inputs)
    _assert_equal_to_one_device(got, one_device)
    # The batch stays split: each device holds its own row.
    assert {shard.data.shape for shard in got[0][1].addressable_shards} == {(1, T, N, H)}


# Slow: the chunked backward under Explicit axes (the default there is cpu_flash where it
# builds; where it does not, test_default_implementation_on_a_data_parallel_mesh runs this).
@pytest.mark.slow
def test_default_implementation_on_explicit_axes_is_the_chunked_kernel():
    """The issue's case: the chunked backward under jax.make_mesh's default Explicit axes."""
    q = _inputs()[0]
    mesh = jax.make_mesh((8,), ("data",))
    (q_sharded,) = _batch_sharded(mesh, q)

    def loss(q, implementation):
        out = ja.dot_product_attention(q, q, q, is_causal=True, implementation=implementation)
        return jnp.sum(out**2)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss), static_argnums=1)(q_sharded, "chunked")
    want = jax.jit(jax.grad(loss), static_argnums=1)(q, "reference")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "axis_type", [AxisType.Explicit, pytest.param(AxisType.Auto, marks=pytest.mark.slow)]
)
def test_default_implementation_inside_shard_map(one_device, axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    inputs = _batch_sharded(mesh, *_inputs())

    def per_device(q, k, v, lengths):
        # The loss is a sum over batch rows: each device's share has the global gradients.
        (_, out), grads = _loss(ja.dot_product_attention)(q, k, v, lengths)
        return out, grads

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    out, grads = jax.jit(sharded)(*inputs)
    (_, want_out), want_grads = one_device
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_chunked_kernel_inside_shard_map_with_every_option():
    """Window, bias, mask, lengths and dropout inside shard_map (manual axes), against
    the oracle run per device with the same arguments."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    q, k, v, lengths = _inputs()
    rng = np.random.default_rng(1)
    bias = jnp.asarray(rng.standard_normal((B, 1, T, T)), jnp.float32)
    mask = jnp.asarray(rng.random((B, 1, T, T)) < 0.8)
    options = {"local_window_size": (5, 1), "dropout_rate": 0.25, "dropout_rng": jax.random.key(2)}

    def loss(implementation):
        def run(q, k, v, bias, mask, lengths):
            out = ja.dot_product_attention(
                q,
                k,
                v,
                bias=bias,
                mask=mask,
                key_value_seq_lengths=lengths,
                query_seq_lengths=lengths,
                implementation=implementation,
                **options,
            )
            return jnp.sum(jnp.sin(out))

        return jax.grad(run, argnums=(0, 1, 2, 3))

    per_device = jax.jit(
        jax.shard_map(loss("chunked"), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    )
    oracle = jax.jit(
        jax.shard_map(loss("reference"), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    )
    args = _batch_sharded(mesh, q, k, v, bias, mask, lengths)
    for name, g, w in zip(
        ("dq", "dk", "dv", "dbias"), per_device(*args), oracle(*args), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


# Slow: test_ring_attention.py's fast ring test runs implementation="ring" under jax.set_mesh.
@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_ring_implementation_on_explicit_and_auto_axes(one_device, axis_type):
    """implementation="ring" over a (data=2, seq=4) mesh, inputs arriving batch-sharded."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(axis_type,) * 2)
    inputs = _batch_sharded(mesh, *_inputs())
    ring = _loss(
        lambda *args, **kwargs: ja.dot_product_attention(*args, **kwargs, implementation="ring")
    )
    with jax.set_mesh(mesh):
        got = jax.jit(ring)(*inputs)
    _assert_equal_to_one_device(got, one_device)


# --- only some of q/k/v sharded inside shard_map: shared keys/values (q sharded, k/v
# replicated) or learned queries (q replicated, k/v sharded). A replicated input is used by
# every shard, so its gradient is the sum over the "data" axis.
LATENTS = 4


def _mixed_inputs():
    rng = np.random.default_rng(3)
    # x: [B, T, K, H] (batch-sharded); latents: [1, L, K, H] (replicated)
    x = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    latents = jnp.asarray(rng.standard_normal((1, LATENTS, K, H)), jnp.float32)
    return x, latents


def _mixed_attention(shared, implementation):
    def attention(x, latents):
        if shared == "kv":
            return ja.dot_product_attention(x, latents, latents, implementation=implementation)
        return ja.dot_product_attention(latents, x, x, implementation=implementation)

    return attention


def _mixed_grads_one_device(shared):
    def loss(x, latents):
        # every batch row sees the same latents: [1, L, K, H] -> [B, L, K, H]
        every_row = jnp.broadcast_to(latents, (x.shape[0], *latents.shape[1:]))
        return jnp.sum(jnp.sin(_mixed_attention(shared, "reference")(x, every_row)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(*_mixed_inputs())


def _mixed_grads_in_shard_map(mesh, shared, implementation):
    attention = jax.shard_map(
        _mixed_attention(shared, implementation),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
    )

    def loss(x, latents):
        return jnp.sum(jnp.sin(attention(x, latents)))

    x, latents = _mixed_inputs()
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    latents = jax.device_put(latents, NamedSharding(mesh, P()))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, latents)


@pytest.mark.parametrize(
    "shared, implementation",
    [
        ("kv", None),
        pytest.param("kv", "chunked", marks=pytest.mark.slow),
        pytest.param("q", "chunked", marks=pytest.mark.slow),
        pytest.param("q", None, marks=pytest.mark.slow),
        pytest.param("kv", "xla", marks=pytest.mark.slow),
    ],
)
def test_shard_map_with_some_inputs_replicated(shared, implementation):
    """The chunked custom-VJP backward types each cotangent as its input: d(latents) is
    psum'd over "data" (it was `Custom VJP bwd rule must produce an output with the same
    type`), and equals one device."""
    mesh = jax.make_mesh((8,), ("data",))
    got = _mixed_grads_in_shard_map(mesh, shared, implementation)
    want = _mixed_grads_one_device(shared)
    for name, g, w in zip(("dx", "dlatents"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    assert got[1].sharding.is_fully_replicated


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["kv", "q"])
def test_ring_inside_shard_map_with_some_inputs_replicated(shared):
    """implementation="ring" inside a shard_map that is manual over "data" only (the ring
    runs over "seq"): its output and gradients carry the manual-axis types of their inputs."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    rng = np.random.default_rng(4)
    # the ring needs the latents' sequence to divide over "seq" as well: L = T
    x = jnp.asarray(rng.standard_normal((2, T, K, H)), jnp.float32)
    latents = jnp.asarray(rng.standard_normal((1, T, K, H)), jnp.float32)

    def attention(implementation):
        def run(x, latents):
            if shared == "kv":
                return ja.dot_product_attention(x, latents, latents, implementation=implementation)
            queries = jnp.broadcast_to(latents, x.shape)
            return ja.dot_product_attention(queries, x, x, implementation=implementation)

        return run

    ring = jax.shard_map(
        attention("ring"),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P("data"),
        axis_names={"data"},
    )

    def one_device(x, latents):
        every_row = jnp.broadcast_to(latents, (x.shape[0], *latents.shape[1:]))
        return jnp.sum(jnp.sin(attention("reference")(x, every_row)))

    with jax.set_mesh(mesh):
        args = (
            jax.device_put(x, NamedSharding(mesh, P("data"))),
            jax.device_put(latents, NamedSharding(mesh, P())),
        )
        got = jax.jit(jax.grad(lambda x, l: jnp.sum(jnp.sin(ring(x, l))), argnums=(0, 1)))(*args)
    want = jax.jit(jax.grad(one_device, argnums=(0, 1)))(x, latents)
    for name, g, w in zip(("dx", "dlatents"), got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
