"""Meshes and tensor-parallel MultiHeadAttention on 8 virtual CPU devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_attn as ja
from jax_attn import sharding

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason=f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
    f"is imported; tests/conftest.py sets it), found {len(jax.devices())}",
)

COLLECTIVE = re.compile(
    r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)


def test_eight_virtual_devices():
    assert len(jax.devices()) == 8


def test_make_mesh_axes_and_shape():
    mesh = sharding.make_mesh(data=2, model=4)
    assert mesh.axis_names == ("data", "model", "seq")
    assert dict(mesh.shape) == {"data": 2, "model": 4, "seq": 1}
    subset = sharding.make_mesh(seq=2, devices=jax.devices()[:2])
    assert dict(subset.shape) == {"data": 1, "model": 1, "seq": 2}


@pytest.mark.parametrize(
    "sizes, error, match",
    [
        (dict(data=2, model=2), ValueError, r"data=2 \* model=2 \* seq=1 = 4 must equal .* 8"),
        (dict(data=4, model=4), ValueError, r"= 16 must equal the number of devices, 8"),
        (dict(seq=0), ValueError, "seq must be >= 1, got 0"),
        (dict(model=2.0), TypeError, "model must be a positive int"),
    ],
)
def test_make_mesh_rejects_sizes_that_do_not_match_the_devices(sizes, error, match):
    with pytest.raises(error, match=match):
        sharding.make_mesh(**sizes)


MODULE = ja.MultiHeadAttention(16, 32, 16, 0.0, 8, qkv_bias=True)


def loss(params, x):
    return jnp.sum(MODULE.apply({"params": params}, x) ** 2)


@pytest.fixture(scope="module")
def module_params():
    """MODULE's parameters, their shapes from eval_shape and values from numpy (no compile)."""
    x = jax.ShapeDtypeStruct((8, 16, 16), jnp.float32)
    shapes = jax.eval_shape(MODULE.init, jax.random.key(1), x)["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[0]), s.dtype), shapes
    )


@pytest.fixture(scope="module")
def single_device():
    """Params, input, and the unsharded output and gradients (computed once; slow tests)."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16))
    params = jax.jit(MODULE.init)(jax.random.key(1), x)["params"]
    out = jax.jit(MODULE.apply)({"params": params}, x)
    grads = jax.jit(jax.grad(loss))(params, x)
    return params, x, out, grads


def test_shard_params_layout(module_params):
    params = module_params
    mesh = sharding.make_mesh(data=2, model=4)
    placed = sharding.shard_params({"params": params}, mesh, num_heads=8)["params"]
    assert placed["W_query"]["kernel"].sharding.spec == P(None, "model")
    assert placed["W_value"]["bias"].sharding.spec == P("model")
    assert placed["out_proj"]["kernel"].sharding.spec == P("model", None)
    assert placed["out_proj"]["bias"].sharding.spec == P()
    # [d_in, d_out / model] per device
    assert {s.data.shape for s in placed["W_key"]["kernel"].addressable_shards} == {(16, 8)}
    assert jnp.array_equal(placed["W_key"]["kernel"], params["W_key"]["kernel"])


def collectives(hlo: str) -> list[tuple[str, str]]:
    return COLLECTIVE.findall(hlo)


# Slow (with the gradient, metadata and bench_mesh tests below): compiles of the sharded
# module; the fast shard_params tests check the layouts they rely on.
@pytest.mark.slow
@pytest.mark.parametrize("data, model", [(2, 4), (8, 1)])
def test_sharded_multi_head_attention_equals_single_device(single_device, data, model):
    params, x, want, _ = single_device
    mesh = sharding.make_mesh(data=data, model=model)
    placed = sharding.shard_params(params, mesh, num_heads=8)
    x_sharded = sharding.shard_batch(x, mesh)
    apply = jax.jit(
        lambda p, x: MODULE.apply({"params": p}, x),
        out_shardings=sharding.batch_sharding(mesh),
    )
    got = apply(placed, x_sharded)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-6), jnp.abs(got - want).max()

    ops = collectives(apply.lower(placed, x_sharded).compile().as_text())
    assert not [op for op in ops if op[1] == "all-gather"], ops
    if model == 1:
        assert ops == []
    else:
        # out_proj's partial sums are reduced once over "model", on the local batch only.
        assert [op[1] for op in ops] == ["all-reduce"], ops
        assert ops[0][0].startswith(f"f32[{x.shape[0] // data},16,32]"), ops


@pytest.mark.slow
def test_sharded_multi_head_attention_gradients_equal_single_device(single_device):
    params, x, _, want = single_device
    mesh = sharding.make_mesh(data=2, model=4)
    got = jax.jit(jax.grad(loss))(
        sharding.shard_params(params, mesh), sharding.shard_batch(x, mesh)
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.allclose(g, w, rtol=1e-5, atol=1e-5)
    assert got["W_query"]["kernel"].sharding.spec == P(None, "model")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, mesh: sharding.shard_params(p, mesh, num_heads=6), "num_heads=6"),
        (lambda p, mesh: sharding.shard_batch(jnp.zeros((3, 4, 16)), mesh), "batch dim"),
    ],
)
def test_sharding_rejects_bad_layouts(module_params, call, match):
    params = module_params
    mesh = sharding.make_mesh(data=2, model=4)
    with pytest.raises(ValueError, match=match):
        call(params, mesh)


def test_shard_params_lays_out_every_attention_module_of_any_tree(module_params):
    """A model's tree: two attention blocks found wherever they are, the rest replicated."""
    params = module_params
    tree = {
        "params": {
            "embed": {"embedding": jnp.ones((10, 16))},
            "block_0": {"attn": params, "norm": {"scale": jnp.ones((16,))}},
            "block_1": {"attn": params},
            "wrapper": {"W_query": {"kernel": jnp.ones((16, 4))}},  # no out_proj: not MHA
        }
    }
    placed = sharding.shard_params(tree, sharding.make_mesh(data=2, model=4))["params"]
    for block in ("block_0", "block_1"):
        assert placed[block]["attn"]["W_query"]["kernel"].sharding.spec == P(None, "model")
        assert placed[block]["attn"]["W_key"]["bias"].sharding.spec == P("model")
        assert placed[block]["attn"]["out_proj"]["kernel"].sharding.spec == P("model", None)
    for leaf in (
        placed["embed"]["embedding"],
        placed["block_0"]["norm"]["scale"],
        placed["wrapper"]["W_query"]["kernel"],
        placed["block_1"]["attn"]["out_proj"]["bias"],
    ):
        assert leaf.sharding.is_fully_replicated
    same = jax.tree.map(jnp.array_equal, placed, tree["params"])
    assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_shard_params_honours_partition_metadata(single_device):
    """Boxes from nn.with_partitioning win, stay boxed, and name only the mesh's axes."""
    import flax.linen as nn

    params, x, want, _ = single_device
    module = ja.MultiHeadAttention(16, 32, 16, 0.0, 8, qkv_bias=True, model_axis="model")
    boxed = jax.jit(module.init)(jax.random.key(1), x)
    boxed = jax.tree.map(
        lambda box, value: box.replace_boxed(value),
        boxed,
        {"params": params},
        is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned),
    )
    boxed["params"]["mlp"] = {"kernel": nn.Partitioned(jnp.ones((32, 8)), ("embed", "model"))}
    placed = sharding.shard_params(boxed, sharding.make_mesh(data=2, model=4))
    assert isinstance(placed["params"]["mlp"]["kernel"], nn.Partitioned)
    assert placed["params"]["mlp"]["kernel"].value.sharding.spec == P(None, "model")
    specs = nn.get_partition_spec(placed)["params"]
    for name in ("W_query", "W_key", "W_value", "out_proj"):
        kernel = placed["params"][name]["kernel"].value
        assert kernel.sharding.spec == specs[name]["kernel"], name
    del placed["params"]["mlp"]
    got = jax.jit(module.apply)(placed, x)
    assert jnp.allclose(got, want, rtol=1e-5, atol=1e-6), jnp.abs(got - want).max()


def test_shard_params_needs_width_divisible_by_model_axis():
    # MultiHeadAttention(4, 12, 8, 0.0, num_heads=3)'s parameter shapes
    params = {name: {"kernel": jnp.zeros((4, 12))} for name in ("W_query", "W_key", "W_value")}
    params["out_proj"] = {"kernel": jnp.zeros((12, 12)), "bias": jnp.zeros((12,))}
    with pytest.raises(ValueError, match="d_out=12 must be divisible by .* model axis size 8"):
        sharding.shard_params(params, sharding.make_mesh(model=8))


@pytest.mark.parametrize(
    "spec, want",
    [
        ("data=2,model=4", {"data": 2, "model": 4, "seq": 1}),
        ("seq=8", {"data": 1, "model": 1, "seq": 8}),
    ],
)
def test_bench_mesh_parses_mesh_specs(spec, want):
    from jax_attn.apps import bench_mesh

    assert bench_mesh.parse_mesh(spec) == want


@pytest.mark.parametrize("spec", ["tensor=2", "seq=0", "data=two", "model=2,seq=4"])
def test_bench_mesh_rejects_bad_mesh_specs(spec):
    from jax_attn.apps import bench_mesh

    with pytest.raises(ValueError, match="--mesh"):
        bench_mesh.parse_mesh(spec)


def test_bench_mesh_reports_min_median_max_and_flags_noise(capsys):
    from jax_attn.apps import bench_mesh, timing

    # measure: a trivial program (one tiny compile), its runs summarised as jax-attn bench does
    row = bench_mesh.measure(lambda x: x + 1, (jnp.zeros(3),), repeats=3)
    assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and len(row["times_ms"]) == 3
    assert row["noisy"] == (row["spread"] > 0.2)
    compiled_only = bench_mesh.measure(lambda x: x + 1, (jnp.zeros(3),), repeats=0)
    assert all(compiled_only[key] is None for key in bench_mesh.TIMING_KEYS)

    memory = {"total": 2**20, "temp": 0}
    base = dict(memory_bytes=memory, collectives={}, compile_s=0.1)
    steady = dict(base, name="one device", mesh="1", **timing.summary_ms([0.010, 0.0105, 0.011]))
    noisy = dict(base, name="ring_attention", mesh="seq=2", **timing.summary_ms([0.01, 0.02]))
    bench_mesh.print_table([steady, noisy], steady)
    lines = capsys.readouterr().out.splitlines()
    assert all(column in lines[0] for column in ("min ms", "median ms", "max ms", "spread"))
    assert "10.00" in lines[1] and "10.50" in lines[1] and "11.00" in lines[1]
    assert "10% " in lines[1] and "!" not in lines[1]
    assert "67%!" in lines[2]
    assert lines[3] == timing.noisy_note(["ring_attention [seq=2]"])
    assert bench_mesh.noisy_rows([steady, noisy]) == ["ring_attention [seq=2]"]


# Slow: a ring compile; test_ring_attention.py's fast ring test checks collective-permute.
@pytest.mark.slow
def test_bench_mesh_ring_reports_memory_falling_with_devices(tmp_path):
    import json

    from jax_attn.apps import bench_mesh

    out = tmp_path / "mesh.json"
    argv = [
        "--mesh",
        "seq=2",
        "--seq-len",
        "64",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert bench_mesh.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["mesh"] for row in rows] == ["1", "1", "seq=2"]
    for row in rows:
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
    assert result["noisy"] == bench_mesh.noisy_rows(rows)
    ring_1, ring_2 = (row["memory_bytes"]["total"] for row in rows[1:])
    assert ring_2 < ring_1
    assert rows[2]["collectives"].get("collective-permute", 0) > 0


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_fewer_kv_heads_than_the_model_axis_under_explicit_axes(num_kv_heads):
    """num_kv_heads % model != 0 on a (data=2, model=4) jax.make_mesh (Explicit axes): no
    key/value head is cut across devices (MQA: K/V replicated, queries split; otherwise the
    module replicated), and the forward equals one device. It failed with ShardingTypeError."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 32)), jnp.float32)
    module = ja.MultiHeadAttention(32, 32, 16, 0.0, 4, num_kv_heads=num_kv_heads)
    variables = module.init(jax.random.key(0), x)
    want = module.apply(variables, x, deterministic=True)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    placed = sharding.shard_params(variables, mesh, num_heads=4)
    layers = placed["params"]
    assert layers["W_key"]["kernel"].sharding.spec == P()
    assert layers["W_value"]["kernel"].sharding.spec == P()
    want_query = P(None, "model") if num_kv_heads == 1 else P()
    assert layers["W_query"]["kernel"].sharding.spec == want_query
    with jax.set_mesh(mesh):
        got = jax.jit(lambda v, x: module.apply(v, x, deterministic=True))(
            placed, sharding.shard_batch(x, mesh)
        )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_partition_metadata_that_would_cut_a_kv_head_is_an_error():
    x = jnp.ones((4, 16, 32), jnp.float32)
    module = ja.MultiHeadAttention(32, 32, 16, 0.0, 4, num_kv_heads=2, model_axis="model")
    variables = module.init(jax.random.key(0), x)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"num_kv_heads=2 .* model axis size 4"):
        sharding.shard_params(variables, mesh, num_heads=4)
