"""Partition metadata (``model_axis="model"``): heads split over the mesh's ``"model"``
axis, read the Flax way (``nn.get_partition_spec``, ``nnx.get_partition_spec``), and a
model placed from it on a ``("data", "model")`` mesh of the 8 virtual CPU devices computes
what the single-device model computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import interop
from jax_attn import nnx_modules as ja_nnx

D_IN, D_OUT, CONTEXT, HEADS = 6, 8, 8, 4
B, T = 2, 5
CLOSE = {"rtol": 1e-5, "atol": 1e-6}

HEADS_SPLIT = {
    "W_query": {"kernel": P(None, "model"), "bias": P("model")},
    "W_key": {"kernel": P(None, "model"), "bias": P("model")},
    "W_value": {"kernel": P(None, "model"), "bias": P("model")},
    "out_proj": {"kernel": P("model", None), "bias": P(None)},
}


def linen_mha(**options):
    return ja.MultiHeadAttention(D_IN, D_OUT, CONTEXT, 0.0, HEADS, True, **options)


def nnx_mha(seed=0, **options):
    return ja_nnx.MultiHeadAttention(
        D_IN, D_OUT, CONTEXT, 0.0, HEADS, True, rngs=nnx.Rngs(seed), **options
    )


def inputs(shape=(B, T, D_IN), seed=0):
    """Standard normal float32 drawn with numpy: no per-shape PRNG compile."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip(
            f"needs 8 devices (tests/conftest.py sets 8 CPU ones), found {len(jax.devices())}"
        )
    return jax.make_mesh((2, 4), ("data", "model"))


def test_linen_specs_split_heads():
    abstract = jax.eval_shape(linen_mha(model_axis="model").init, jax.random.key(0), inputs())
    assert nn.get_partition_spec(abstract) == {"params": HEADS_SPLIT}


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("SelfAttentionV1", ()),
        ("SelfAttentionV2", (True,)),
        ("CausalAttention", (CONTEXT, 0.0, True)),
        ("MultiHeadAttentionWrapper", (CONTEXT, 0.0, 2, True)),
    ],
)
def test_every_class_splits_its_projections(name, args):
    module = getattr(ja, name)(D_IN, D_OUT, *args, model_axis="model")
    abstract = jax.eval_shape(module.init, jax.random.key(0), inputs())
    flat = nn.get_partition_spec(abstract)["params"]
    heads = [flat[f"heads_{i}"] for i in range(2)] if name.endswith("Wrapper") else [flat]
    for head in heads:
        for projection in ("W_query", "W_key", "W_value"):
            spec = head[projection]
            if name == "SelfAttentionV1":
                assert spec == P(None, "model")
            else:
                assert spec == HEADS_SPLIT[projection]


def test_without_model_axis_the_params_are_plain_arrays():
    variables = linen_mha().init(jax.random.key(0), inputs())
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    plain = nnx_mha()
    assert nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(plain)))["W_query"] == {
        "kernel": P(),
        "bias": P(),
    }


def test_linen_sharded_forward_and_grads_equal_single_device(mesh):
    module = linen_mha(model_axis="model")
    x, target = inputs(), inputs((B, T, D_OUT), seed=1)
    key = jax.random.key(0)
    abstract = jax.eval_shape(module.init, key, x)
    variables = jax.jit(module.init, out_shardings=nn.get_sharding(abstract, mesh))(key, x)
    kernel = nn.unbox(variables)["params"]["W_query"]["kernel"]
    assert kernel.sharding.spec == P(None, "model")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(D_IN, D_OUT // 4)}

    def loss(variables, x):
        return jnp.mean((module.apply(variables, x) - target) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded_loss, sharded_grads = step(variables, x_sharded)
    single = jax.device_get(nn.unbox(variables))
    # the same step on one device (jitted: one compile instead of op-by-op dispatch)
    single_loss, single_grads = jax.jit(jax.value_and_grad(loss))(single, x)
    np.testing.assert_allclose(sharded_loss, single_loss, **CLOSE)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **CLOSE),
        nn.unbox(sharded_grads),
        single_grads,
    )
    np.testing.assert_allclose(
        jax.jit(module.apply)(variables, x_sharded), jax.jit(module.apply)(single, x), **CLOSE
    )


def test_nnx_specs_and_eager_sharding_under_a_mesh(mesh):
    x = inputs()
    reference_model = nnx_mha(model_axis="model")
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(reference_model)))
    assert specs == HEADS_SPLIT
    with jax.set_mesh(mesh):
        model = nnx_mha(model_axis="model")
        y = nnx.jit(lambda m, x: m(x))(model, jax.device_put(x, P("data")))
    assert model.W_key.kernel[...].sharding.spec == P(None, "model")
    assert model.out_proj.kernel[...].sharding.spec == P("model", None)
    np.testing.assert_allclose(y, reference_model(x), **CLOSE)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="model_axis='heads' must be an axis"):
        nnx_mha(model_axis="heads")


def test_nnx_grads_on_the_mesh_equal_linen_grads(mesh):
    x = inputs()
    with jax.set_mesh(mesh):
        model = nnx_mha(model_axis="model")
        grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(model, x)
    params = jax.device_get(ja_nnx.linen_params_from_nnx(model))  # single device
    linen_grads = jax.jit(jax.grad(lambda p: jnp.sum(linen_mha().apply({"params": p}, x) ** 2)))(
        params
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **CLOSE),
        nnx.to_pure_dict(grads),
        linen_grads,
    )


def test_boxed_params_go_through_interop_and_the_converters(mesh):
    module = linen_mha(model_axis="model")
    boxed = module.init(jax.random.key(0), inputs())
    plain = nn.unbox(boxed)
    state_dict = interop.params_to_torch(module, boxed)
    jax.tree.map(np.testing.assert_array_equal, state_dict, interop.params_to_torch(module, plain))
    model = ja_nnx.nnx_from_linen_params(nnx_mha(seed=3, model_axis="model"), boxed)
    np.testing.assert_allclose(model(inputs()), module.apply(boxed, inputs()), **CLOSE)
    round_trip = interop.params_from_torch(module, state_dict)
    abstract = jax.eval_shape(module.init, jax.random.key(0), inputs())
    placed = jax.device_put(round_trip, nn.get_sharding(abstract, mesh)["params"])
    assert placed["out_proj"]["kernel"].sharding.spec == P("model", None)
    np.testing.assert_allclose(
        module.apply({"params": round_trip}, inputs()), module.apply(plain, inputs()), **CLOSE
    )
