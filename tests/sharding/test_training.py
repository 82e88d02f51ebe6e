"""A sharded optax training step of a 2-block model built from ja.MultiHeadAttention equals
the same steps on one device: tensor-parallel on a data x model mesh (laid out by
shard_params, and from the partition metadata under Explicit axes), data-parallel inside
jax.shard_map, and ring attention on a data x seq mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_attn as ja
from jax_attn import sharding

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        len(jax.devices()) < 8,
        reason=f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before "
        f"jax is imported; tests/conftest.py sets it), found {len(jax.devices())}",
    ),
]

B, T, D, HEADS = 4, 16, 32, 4


class Block(nn.Module):
    implementation: str | None = None
    model_axis: str | None = None

    @nn.compact
    def __call__(self, x):
        attention = ja.MultiHeadAttention(
            D,
            D,
            T,
            0.0,
            HEADS,
            qkv_bias=True,
            implementation=self.implementation,
            model_axis=self.model_axis,
        )
        x = x + attention(nn.LayerNorm()(x), deterministic=True)
        return x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(nn.LayerNorm()(x))))


class Model(nn.Module):
    implementation: str | None = None
    model_axis: str | None = None

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = Block(self.implementation, self.model_axis)(x)
        return nn.Dense(D)(x)


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    return x, y


OPTIMIZER = optax.sgd(0.1, momentum=0.9)  # adam counts steps in int32: not strict-safe


def _step(model, mean=lambda value: value):
    """One optax step; ``mean`` averages the loss over data-parallel shards (shard_map)."""

    def step(params, opt_state, x, y):
        def loss(params):
            return mean(jnp.mean((model.apply({"params": params}, x) - y) ** 2))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def _train(model, params, x, y, steps=2, step=None):
    optimizer = OPTIMIZER
    step = jax.jit(_step(model)) if step is None else step
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, x, y)
        losses.append(value)
    return params, losses


@pytest.fixture(scope="module")
def one_device():
    x, y = _data()
    params = jax.jit(Model().init)(jax.random.key(0), x)["params"]
    return params, _train(Model(), params, x, y)


def _assert_same_training(got, want):
    got_params, got_losses = got
    want_params, want_losses = want
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_params), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_tensor_parallel_training_equals_one_device(one_device):
    params, want = one_device
    mesh = sharding.make_mesh(data=2, model=4)
    x, y = (sharding.shard_batch(a, mesh) for a in _data())
    placed = sharding.shard_params(params, mesh, num_heads=HEADS)
    kernel = placed["Block_0"]["MultiHeadAttention_0"]["W_query"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "model")
    got = _train(Model(), placed, x, y)
    _assert_same_training(got, want)
    new_kernel = got[0]["Block_1"]["MultiHeadAttention_0"]["W_value"]["kernel"]
    assert {s.data.shape for s in new_kernel.addressable_shards} == {(D, D // 4)}


def test_ring_attention_training_equals_one_device(one_device):
    params, want = one_device
    mesh = sharding.make_mesh(data=2, seq=4)
    x, y = (sharding.shard_batch(a, mesh) for a in _data())
    with jax.set_mesh(mesh):
        got = _train(Model("ring"), sharding.shard_params(params, mesh), x, y)
    _assert_same_training(got, want)


def test_explicit_axes_training_from_partition_metadata_equals_one_device(one_device):
    params, want = one_device
    model = Model(model_axis="model")
    variables = jax.jit(model.init)(jax.random.key(0), _data()[0])
    specs = nn.get_partition_spec(variables)["params"]
    unboxed = nn.unbox(variables)["params"]
    jax.tree.map(np.testing.assert_array_equal, unboxed, params)  # metadata changes no value
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    put = lambda a, spec: jax.device_put(a, jax.NamedSharding(mesh, spec))  # noqa: E731
    placed = jax.tree.map(put, unboxed, specs)
    kernel = placed["Block_0"]["MultiHeadAttention_0"]["W_query"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "model")
    x, y = (put(a, jax.P("data")) for a in _data())
    with jax.set_mesh(mesh):
        got = _train(model, placed, x, y)
    _assert_same_training(got, want)


def test_data_parallel_training_inside_shard_map_equals_one_device(one_device):
    params, want = one_device
    mesh = jax.make_mesh((4,), ("data",))
    P = jax.P
    step = _step(Model(), mean=lambda value: jax.lax.pmean(value, "data"))
    in_specs = (P(), P(), P("data"), P("data"))
    sharded_step = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(), P()))
    )
    x, y = (jax.device_put(a, jax.NamedSharding(mesh, P("data"))) for a in _data())
    got = _train(Model(), params, x, y, step=sharded_step)
    _assert_same_training(got, want)
