"""The compiled ``cpu_flash`` kernel splits over batch and heads under a plain ``jax.jit`` of
sharded arrays and under ``jax.set_mesh`` (``kernels/partitioned.py``): the default takes
it on a partitioned mesh, the compiled program gathers no q/k/v, and its results,
gradients and forward-mode derivatives equal the reference on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import dispatch, reference
from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

pytestmark = [
    pytest.mark.skipif(
        len(jax.devices()) < 8,
        reason=f"needs 8 devices (tests/conftest.py sets them), found {len(jax.devices())}",
    ),
    pytest.mark.skipif(cpu_flash.build_reason() is not None, reason=str(cpu_flash.build_reason())),
]

B, T, N, K, H = 8, 16, 4, 2, 8
# (mesh shape, axis names, spec of q/k/v): data parallel over 8 devices, data x heads
MESHES = {
    "data": ((8,), ("data",), P("data")),
    "data x heads": ((4, 2), ("data", "heads"), P("data", None, "heads")),
}


def _inputs():
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=K, H=H)
    lengths = jnp.asarray(np.random.default_rng(3).integers(1, T + 1, B), jnp.int32)
    return q, k, v, lengths


def _loss(attention):
    def loss(q, k, v, lengths):
        out = attention(q, k, v, key_value_seq_lengths=lengths, is_causal=True)
        return jnp.sum(jnp.sin(out)), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _sharded(mesh, spec, q, k, v, lengths):
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    return put(q, spec), put(k, spec), put(v, spec), put(lengths, P(spec[0]))


def _gathers(compiled_text: str) -> list[str]:
    return [line for line in compiled_text.splitlines() if "all-gather" in line]


def test_the_default_is_cpu_flash_where_devices_may_be_partitioned():
    call = check_attention_args(*_inputs()[:3], is_causal=True)
    assert dispatch._may_partition("cpu")  # 8 devices, no mesh set
    assert dispatch.select_implementation(call, "cpu") == "cpu_flash"
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4, 2), ("data", "heads"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            assert dispatch.select_implementation(call, "cpu") == "cpu_flash"


@pytest.mark.parametrize("layout", MESHES)
def test_plain_jit_of_sharded_arrays_splits_the_kernel(layout):
    shape, names, spec = MESHES[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    inputs = _sharded(mesh, spec, *_inputs())
    step = jax.jit(_loss(ja.dot_product_attention))  # the default implementation
    compiled = step.lower(*inputs).compile().as_text()
    # the default took the compiled kernel, forward and backward, and gathered nothing
    assert "jax_attn_cpu_flash_forward" in compiled
    assert "jax_attn_cpu_flash_backward" in compiled
    assert _gathers(compiled) == []
    got = step(*inputs)
    _assert_close(got, jax.jit(_loss(reference.dot_product_attention))(*_inputs()))
    (_, out), grads = got
    # each device keeps its own batch rows (and heads): nothing moved to other devices
    for x in (out, *grads):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)


@pytest.mark.parametrize("kv_heads", [K, 1])  # 1: MQA, the query heads split alone
def test_explicit_axes_split_the_kernel_in_forward_mode(kv_heads):
    shape, names, spec = MESHES["data x heads"]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * 2)
    q, k, v = make_qkv(B=B, T=T, S=T, N=N, K=kv_heads, H=H)
    lengths = _inputs()[3]
    tangents = make_qkv(B=B, T=T, S=T, N=N, K=kv_heads, H=H, seed=7)
    kv_spec = spec if kv_heads > 1 else P("data")

    def attention(attention_fn):
        return lambda q, k, v: attention_fn(q, k, v, key_value_seq_lengths=lengths, is_causal=True)

    def jvp(q, k, v, dq, dk, dv):
        return jax.jvp(attention(ja.dot_product_attention), (q, k, v), (dq, dk, dv))

    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    specs = (spec, kv_spec, kv_spec) * 2
    args = [put(x, s) for x, s in zip((q, k, v, *tangents), specs, strict=True)]
    with jax.set_mesh(mesh):
        step = jax.jit(jvp)
        compiled = step.lower(*args).compile().as_text()
        got = step(*args)
    assert "jax_attn_cpu_flash_tangent" in compiled
    assert _gathers(compiled) == []
    _assert_close(got, jax.jvp(attention(reference.dot_product_attention), (q, k, v), tangents))
    assert got[1].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)


def test_declines_inside_a_shard_map_over_some_axes_only():
    """custom_partitioning cannot split a call whose mesh is part manual, part partitioned:
    the default falls to a kernel that can."""
    mesh = jax.make_mesh((4, 2), ("data", "heads"), axis_types=(AxisType.Explicit,) * 2)
    call = check_attention_args(*_inputs()[:3], is_causal=True)
    seen = {}

    def per_device(x):
        seen["reason"] = dispatch.unsupported_reason("cpu_flash", call, "cpu")
        seen["selected"] = dispatch.select_implementation(call, "cpu")
        return x

    x = jnp.zeros((8, 2))
    with jax.set_mesh(mesh):
        jax.eval_shape(
            jax.shard_map(per_device, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}),
            x,
        )
    assert "heads" in seen["reason"] and "shard_map" in seen["reason"]
    assert seen["selected"] == "chunked"


def test_a_mask_fns_tiles_split_with_the_kernel():
    """A mask reading ``b`` and ``h``: its tile table splits over batch and heads with the
    queries (the bitmasks over batch), and nothing is gathered."""

    def mask_fn(b, h, q_idx, kv_idx):
        return (q_idx + kv_idx + b + h) % 3 != 1

    def attention(q, k, v, **options):
        return ja.dot_product_attention(q, k, v, mask_fn=mask_fn, **options)

    def oracle(q, k, v, **options):
        return reference.dot_product_attention(q, k, v, mask_fn=mask_fn, **options)

    shape, names, spec = MESHES["data x heads"]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
    q, k, v, lengths = _inputs()
    inputs = _sharded(mesh, spec, q, k, v, lengths)
    step = jax.jit(_loss(attention))
    compiled = step.lower(*inputs).compile().as_text()
    assert "jax_attn_cpu_flash_forward" in compiled
    assert "jax_attn_cpu_flash_backward" in compiled
    assert not _gathers(compiled), _gathers(compiled)
    _assert_close(step(*inputs), jax.jit(_loss(oracle))(q, k, v, lengths))
