"""Ring attention (sequence-parallel, shard_map + ppermute) on up to 8 virtual CPU devices."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import reference, sharding
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason=f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
    f"is imported; tests/conftest.py sets it), found {len(jax.devices())}",
)


def seq_mesh(devices: int, **other_axes):
    total = devices * max(1, other_axes.get("data", 1))
    return sharding.make_mesh(seq=devices, devices=jax.devices()[:total], **other_axes)


def random_qkv(B, T, N, K, H, dtype=jnp.float32, seed=0):
    """q, k, v and an output cotangent drawn with numpy (no PRNG kernel to compile)."""
    rng = np.random.default_rng(seed)
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
    return tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype) for shape in shapes
    )


def value_and_grads(attention):
    """jit of (out, dq, dk, dv) for a fixed output cotangent."""

    @jax.jit
    def run(q, k, v, d_out):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(d_out))

    return run


ORACLE = {
    is_causal: value_and_grads(
        lambda q, k, v, is_causal=is_causal: reference.dot_product_attention(
            q, k, v, is_causal=is_causal
        )
    )
    for is_causal in (False, True)
}


# Slow: test_ring_implementation_equals_one_device_and_passes_kv_by_collective_permute[2-True]
# runs the same ring (sharding.ring_attention, forward and custom VJP) on 2 devices, fast.
@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ring_attention_matches_reference_forward_and_gradients(devices, is_causal):
    mesh = seq_mesh(devices)
    q, k, v, d_out = random_qkv(B=2, T=16, N=4, K=2, H=8, seed=devices)
    ring = value_and_grads(
        lambda q, k, v: sharding.ring_attention(
            q, k, v, mesh=mesh, axis_name="seq", is_causal=is_causal
        )
    )
    oracle = ORACLE[is_causal]
    names = ("out", "dq", "dk", "dv")
    for name, got, want in zip(names, ring(q, k, v, d_out), oracle(q, k, v, d_out), strict=True):
        assert jnp.all(jnp.isfinite(got)), name
        assert jnp.allclose(got, want, rtol=1e-5, atol=2e-5), (name, jnp.abs(got - want).max())


@pytest.mark.slow
def test_ring_attention_output_is_sequence_sharded():
    mesh = seq_mesh(4)
    q, k, v, _ = random_qkv(B=1, T=16, N=2, K=2, H=4)
    out = jax.jit(
        lambda q, k, v: sharding.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    )(q, k, v)
    shard_shapes = {shard.data.shape for shard in out.addressable_shards}
    assert shard_shapes == {(1, 4, 2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("other_axes", "B", "T", "S", "seeds", "kwargs"),
    [
        # batch_axis_name adds data parallelism
        pytest.param(
            {"data": 2},
            2,
            32,
            32,
            (3, 3),
            {"is_causal": True, "batch_axis_name": "data"},
            id="causal with a batch axis",
        ),
        # not causal, T != S: queries and keys each split over the ring, then in blocks
        pytest.param({}, 1, 16, 32, (5, 6), {}, id="cross-attention lengths"),
    ],
)
def test_ring_attention_inner_blocks_match_reference(other_axes, B, T, S, seeds, kwargs):
    """block_size splits each ring step into query and key blocks."""
    mesh = seq_mesh(4, **other_axes)
    q, _, _, d_out = random_qkv(B=B, T=T, N=2, K=1, H=4, seed=seeds[0])
    _, k, v, _ = random_qkv(B=B, T=S, N=2, K=1, H=4, seed=seeds[1])
    ring = value_and_grads(
        lambda q, k, v: sharding.ring_attention(
            q, k, v, mesh=mesh, axis_name="seq", block_size=2, **kwargs
        )
    )
    oracle = ORACLE[kwargs.get("is_causal", False)]
    for got, want in zip(ring(q, k, v, d_out), oracle(q, k, v, d_out), strict=True):
        assert jnp.allclose(got, want, rtol=1e-5, atol=2e-5), jnp.abs(got - want).max()


@pytest.mark.slow
def test_ring_attention_bfloat16_keeps_dtype():
    mesh = seq_mesh(2)
    q, k, v, _ = random_qkv(B=1, T=16, N=2, K=2, H=8, dtype=jnp.bfloat16)
    out = jax.jit(
        lambda q, k, v: sharding.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    )(q, k, v)
    want = jax.jit(lambda q, k, v: reference.dot_product_attention(q, k, v, is_causal=True))(
        q, k, v
    )
    assert out.dtype == jnp.bfloat16
    assert jnp.allclose(out.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)


def per_device_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


@pytest.mark.slow
def test_ring_attention_per_device_memory_falls_with_devices():
    shape = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.float32)
    footprints = []
    for devices in (1, 2, 4, 8):
        mesh = seq_mesh(devices)
        compiled = (
            jax.jit(
                lambda q, k, v, mesh=mesh: sharding.ring_attention(
                    q, k, v, mesh=mesh, axis_name="seq", is_causal=True
                )
            )
            .lower(shape, shape, shape)
            .compile()
        )
        footprints.append(per_device_bytes(compiled))
        hlo = compiled.as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, "sequence was gathered"
    assert all(a > b for a, b in zip(footprints, footprints[1:], strict=False)), footprints
    # Inputs and outputs alone shrink by 8x; the logits block by more.
    assert footprints[-1] * 8 <= footprints[0], footprints


@pytest.mark.parametrize(
    "kwargs, T, match",
    [
        (dict(axis_name="sequence"), 16, "axis_name must be one of"),
        (dict(axis_name="seq", is_causal=True), 20, "divisible by 8"),
        (dict(axis_name="seq"), 18, "divisible by 4"),
        (dict(axis_name="seq", block_size=3), 16, "block_size must divide the keys and queries"),
        (dict(axis_name="seq", batch_axis_name="seq"), 16, "batch_axis_name"),
    ],
)
def test_ring_attention_rejects_bad_arguments(kwargs, T, match):
    mesh = seq_mesh(4)
    q = jnp.zeros((1, T, 2, 4))
    with pytest.raises(ValueError, match=match):
        sharding.ring_attention(q, q, q, mesh=mesh, **kwargs)


@pytest.mark.parametrize(
    "keys, want", [(16, 16), (1024, 512), (1536, 512), (3000, 500), (1031, 1031)]
)
def test_default_block_size_divides_the_chunk(keys, want):
    assert sharding.default_block_size(keys) == want


def test_ring_attention_causal_needs_self_attention_lengths():
    mesh = seq_mesh(2)
    q, kv = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 16, 2, 4))
    with pytest.raises(ValueError, match="T == S"):
        sharding.ring_attention(q, kv, kv, mesh=mesh, axis_name="seq", is_causal=True)


# --- implementation="ring": the dispatcher's entry, mesh from jax.set_mesh ---------------


def ring_loss(implementation, **options):
    def loss(q, k, v):
        out = ja.dot_product_attention(q, k, v, implementation=implementation, **options)
        return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_ring_equals_reference(context, q, k, v, **options):
    """Compiles implementation="ring" inside ``context()`` (a mesh, ring_axes): its loss,
    output and gradients equal the reference's at 1e-5 and the program passes K/V with
    collective-permute, never an all-gather. Returns the ring's output."""
    (loss, out), grads = ring_loss("reference", **options)(q, k, v)
    with context():
        compiled = ring_loss("ring", **options).lower(q, k, v).compile()
        (got_loss, got_out), got_grads = compiled(q, k, v)
    hlo = compiled.as_text()
    assert jnp.allclose(got_loss, loss, rtol=1e-5, atol=1e-5)
    names = ("out", "dq", "dk", "dv")
    for name, got, want in zip(names, (got_out, *got_grads), (out, *grads), strict=True):
        assert jnp.allclose(got, want, rtol=1e-5, atol=1e-5), (name, jnp.abs(got - want).max())
    assert "collective-permute" in hlo
    # No array of numbers is gathered. The NaN policy's branch (taken only for inputs
    # holding NaN or Inf) gathers which keys hold one: a bool per (batch, key, head).
    gathers = re.findall(r"= (\w+)\[[^\]]*\][^ ]* all-gather\(", hlo)
    assert set(gathers) <= {"pred"}, gathers
    return got_out


@pytest.mark.parametrize(
    "devices, is_causal",
    [
        (2, True),
        pytest.param(4, True, marks=pytest.mark.slow),
        pytest.param(4, False, marks=pytest.mark.slow),
    ],
)
def test_ring_implementation_equals_one_device_and_passes_kv_by_collective_permute(
    devices, is_causal
):
    """GQA, key padding and query padding; inputs arrive unsharded. One compiled program
    gives the values and the HLO checked."""
    q, k, v, _ = random_qkv(B=2, T=16, N=4, K=2, H=8, seed=7)
    options = {
        "is_causal": is_causal,
        "key_value_seq_lengths": jnp.array([16, 9]),
        "query_seq_lengths": jnp.array([16, 11]),
    }
    assert_ring_equals_reference(lambda: jax.set_mesh(seq_mesh(devices)), q, k, v, **options)


def test_ring_implementation_needs_a_mesh_with_a_seq_axis():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"implementation='ring'.*jax.set_mesh"):
        ja.dot_product_attention(q, q, q, implementation="ring")
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        with pytest.raises(ValueError, match=r"'seq' axis .* got axes \['data'\]"):
            ja.dot_product_attention(q, q, q, implementation="ring")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": jnp.ones((8, 8), bool)}, "no mask"),
        ({"local_window_size": 2}, "no local_window_size"),
        ({"is_causal": True, "key": jnp.zeros((1, 16, 2, 4))}, "T == S"),
    ],
)
def test_ring_implementation_says_what_it_declines(kwargs, match):
    q = jnp.zeros((1, 8, 2, 4))
    kv = kwargs.pop("key", q)
    with jax.set_mesh(seq_mesh(2)):
        with pytest.raises(ValueError, match=match):
            ja.dot_product_attention(q, kv, kv, implementation="ring", **kwargs)
        # Never picked unless named.
        assert (
            ja.dispatch.select_implementation(check_attention_args(q, q, q, is_causal=True))
            != "ring"
        )


# --- ring_axes: other mesh axis names for implementation="ring" ---------------------------

BATCH_SEQUENCE = (("batch", "sequence"), {"batch": "batch", "seq": "sequence"})


@pytest.mark.parametrize(
    "axis_types",
    [
        None,  # jax.make_mesh's default: Explicit
        pytest.param((jax.sharding.AxisType.Auto,) * 2, marks=pytest.mark.slow),
    ],
)
def test_ring_axes_names_the_mesh_axes_of_implementation_ring(axis_types):
    """A ("batch", "sequence") mesh: forward and gradient equal one device, causal, and the
    compiled program passes K/V with collective-permute. One compile."""
    names, axes = BATCH_SEQUENCE
    kwargs = {} if axis_types is None else {"axis_types": axis_types}
    mesh = jax.make_mesh((2, 4), names, **kwargs)
    q, k, v, _ = random_qkv(B=2, T=16, N=4, K=2, H=8, seed=11)

    @contextlib.contextmanager
    def context():
        with jax.set_mesh(mesh), sharding.ring_axes(**axes):
            yield

    got_out = assert_ring_equals_reference(context, q, k, v, is_causal=True)
    if axis_types is None:
        # Explicit axes: the output's type says it is batch- and sequence-parallel.
        assert tuple(got_out.sharding.spec)[:2] == ("batch", "sequence"), got_out.sharding


def test_ring_axes_without_the_context_says_which_axis_and_how_to_name_it():
    names, _ = BATCH_SEQUENCE
    q = jnp.zeros((2, 16, 2, 4))
    with jax.set_mesh(jax.make_mesh((2, 4), names)):
        with pytest.raises(ValueError, match=r"'seq' axis .* got axes \['batch', 'sequence'\]"):
            ja.dot_product_attention(q, q, q, implementation="ring")
        with pytest.raises(ValueError, match=r"ring_axes\(seq=\.\.\.\)"):
            ja.dot_product_attention(q, q, q, implementation="ring")
        # The dispatcher's decline reason is the same.
        call = check_attention_args(q, q, q)
        assert "ring_axes(seq=...)" in ja.dispatch.unsupported_reason("ring", call, "cpu")
        with sharding.ring_axes(seq="seq"):  # named, but not in the mesh
            with pytest.raises(ValueError, match=r"'seq' axis .*ring_axes\(seq=\.\.\.\)"):
                ja.dot_product_attention(q, q, q, implementation="ring")
    # No mesh: the configured axis is named.
    with sharding.ring_axes(seq="sequence"):
        with pytest.raises(ValueError, match=r"'sequence' axis set with jax.set_mesh.*ring_axes"):
            ja.dot_product_attention(q, q, q, implementation="ring")


def test_ring_axes_is_part_of_the_jit_cache_key():
    """Read at trace time, and a jitted function traced under one setting is traced again
    under another (lowering only, no compile)."""
    names, axes = BATCH_SEQUENCE
    q = jnp.zeros((2, 16, 2, 4))
    f = jax.jit(lambda q: ja.dot_product_attention(q, q, q, implementation="ring"))
    with jax.set_mesh(jax.make_mesh((2, 4), names)):
        with sharding.ring_axes(**axes):
            f.lower(q)
        with pytest.raises(ValueError, match="'seq' axis"):
            f.lower(q)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seq": None}, TypeError, "seq must be a non-empty str"),
        ({"seq": 3}, TypeError, "seq must be a non-empty str"),
        ({"seq": ""}, TypeError, "seq must be a non-empty str"),
        ({"batch": 0}, TypeError, "batch must be a non-empty str or None"),
        ({"heads": ("model",)}, TypeError, "heads must be a non-empty str or None"),
    ],
)
def test_ring_axes_rejects_bad_names_before_tracing(kwargs, error, match):
    with pytest.raises(error, match=match):
        sharding.ring_axes(**kwargs)


def test_ring_axes_nest_and_restore():
    from jax_attn.kernels.ring import RingAxes, current_ring_axes

    assert current_ring_axes() == RingAxes("seq", "data", "model")
    with sharding.ring_axes(seq="sequence", batch="batch") as outer:
        assert outer == current_ring_axes() == RingAxes("sequence", "batch", "model")
        with sharding.ring_axes(heads=None):  # the others kept
            assert current_ring_axes() == RingAxes("sequence", "batch", None)
        assert current_ring_axes() == outer
        with pytest.raises(ValueError, match="seq and batch must name different mesh axes"):
            with sharding.ring_axes(batch="sequence"):
                pass
        with pytest.raises(RuntimeError), sharding.ring_axes(seq="x"):
            raise RuntimeError
        assert current_ring_axes() == outer
    assert current_ring_axes() == RingAxes()


@pytest.mark.slow
def test_multi_head_attention_ring_under_ring_axes_equals_one_device():
    """MultiHeadAttention(implementation="ring") goes through dispatch, so ring_axes covers
    it when the module is applied inside the jitted function."""
    names, axes = BATCH_SEQUENCE
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 8)), jnp.float32)
    module = ja.MultiHeadAttention(8, 16, 16, 0.0, 4)
    ring_module = ja.MultiHeadAttention(8, 16, 16, 0.0, 4, implementation="ring")
    params = module.init(jax.random.key(0), x)
    want = jax.jit(module.apply)(params, x)
    with jax.set_mesh(jax.make_mesh((2, 4), names)), sharding.ring_axes(**axes):
        got = jax.jit(ring_module.apply)(params, x)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-5), jnp.abs(got - want).max()
