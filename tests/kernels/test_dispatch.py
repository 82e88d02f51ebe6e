"""``dot_product_attention(implementation=None)`` picks a supporting implementation,
falls back in order, and a named implementation that cannot serve a call says why."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn import dispatch, reference
from jax_attn.kernels import cpu_flash, cudnn
from jax_attn.validation import check_attention_args


def _inputs(T, S=None, N=4, K=2, H=8, dtype=jnp.float32):
    S = T if S is None else S
    rng = np.random.default_rng(0)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((2, T, N, H), (2, S, K, H), (2, S, K, H))
    )


def _call(T, S=None, **kwargs):
    q, k, v = _inputs(T, S)
    return check_attention_args(q, k, v, **kwargs)


# float32: the compiled kernel where it builds (also where devices may be partitioned: this
# process has 8 CPU devices, see conftest), else chunked from T = 8 on and xla below
CPU_FLASH_DEFAULT = cpu_flash.build_reason() is None
FLOAT32_DEFAULT = "cpu_flash" if CPU_FLASH_DEFAULT else "chunked"


@pytest.mark.parametrize(
    "T, kwargs, expected",
    [
        (16, {"is_causal": True}, FLOAT32_DEFAULT),
        (1, {}, "cpu_flash" if CPU_FLASH_DEFAULT else "xla"),  # decoding: one query
        # a key-padding mask and a bias: the compiled kernel serves both
        (16, {"mask": np.arange(12) < np.array([12, 7])[:, None, None, None]}, FLOAT32_DEFAULT),
        (
            16,
            {"bias": np.linspace(-1.0, 1.0, 16 * 12, dtype=np.float32).reshape(16, 12)},
            FLOAT32_DEFAULT,
        ),
        # xla: no dropout; cpu_flash serves it (the library's hash, in the kernel)
        (1, {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}, FLOAT32_DEFAULT),
        (16, {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}, FLOAT32_DEFAULT),
    ],
)
def test_default_picks_a_supporting_implementation_and_matches_reference(T, kwargs, expected):
    call = _call(T, 12, **kwargs)
    assert dispatch.select_implementation(call, "cpu") == expected
    q, k, v = _inputs(T, 12)
    kwargs = dict(kwargs)
    rng = kwargs.pop("dropout_rng", None)

    def both(q, k, v, rng):
        extra = {} if rng is None else {"dropout_rng": rng}
        return (
            dispatch.dot_product_attention(q, k, v, **kwargs, **extra),
            reference.dot_product_attention(q, k, v, **kwargs, **extra),
        )

    out, expected = jax.jit(both)(q, k, v, rng)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"logit_soft_cap": 3.0}, FLOAT32_DEFAULT),
        ({"alibi_slopes": jnp.array([0.5, 0.25, 0.125, 0.0625])}, FLOAT32_DEFAULT),
        # the caller's own score_fn beside the options: only the score_fn kernels
        ({"logit_soft_cap": 3.0, "score_fn": lambda s, b, h, i, j: s + 1.0}, "chunked"),
    ],
)
def test_score_options_go_to_the_kernel_that_serves_them(monkeypatch, kwargs, expected):
    picked = []
    select = dispatch.select_implementation

    def spy(call, platform=None):
        picked.append(select(call, platform))
        return picked[-1]

    monkeypatch.setattr(dispatch, "select_implementation", spy)
    q, k, v = _inputs(16, 12)
    out = dispatch.dot_product_attention(q, k, v, is_causal=True, **kwargs)
    assert picked == [expected]
    want = reference.dot_product_attention(q, k, v, is_causal=True, **kwargs)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    # the kernels that take no score_fn and do not serve the options still decline
    with pytest.raises(ValueError, match="'xla'.*takes no score_fn"):
        dispatch.dot_product_attention(q, k, v, implementation="xla", **kwargs)


def test_float64_falls_back_to_reference():
    call = dataclasses.replace(_call(16), dtype=np.dtype("float64"))
    assert dispatch.unsupported_reason("chunked", call, "cpu") is not None
    assert dispatch.unsupported_reason("xla", call, "cpu") is not None
    assert dispatch.select_implementation(call, "cpu") == "reference"


def test_falls_back_in_preference_order(monkeypatch):
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ["cudnn", "xla", "chunked", "reference"])
    call = _call(16, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    # cudnn: not on CPU; xla: no dropout; so chunked.
    assert dispatch.select_implementation(call, "cpu") == "chunked"


def test_no_supporting_implementation_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(dispatch.PREFERENCE, "cpu", ["cudnn"])
    with pytest.raises(ValueError, match="no implementation supports.*cudnn.*gpu only"):
        dispatch.select_implementation(_call(16), "cpu")


@pytest.mark.parametrize(
    "implementation, kwargs, match",
    [
        (
            "cudnn",
            {},
            "'cudnn' cannot serve this call: runs on gpu only, not on cpu"
            if jax.default_backend() == "cpu"
            else r"'cudnn' cannot serve this call: dtype float32 \(bfloat16 and float16 only\)",
        ),
        ("xla", {"dropout_rate": 0.2, "dropout_rng": jax.random.key(0)}, "'xla'.*no dropout"),
        ("flash", {}, "implementation must be None or one of"),
    ],
)
def test_named_implementation_that_cannot_serve_raises(implementation, kwargs, match):
    q, k, v = _inputs(8)
    with pytest.raises(ValueError, match=match):
        dispatch.dot_product_attention(q, k, v, implementation=implementation, **kwargs)


def test_gpu_preference_puts_cudnn_first_and_chunked_before_xla_for_huge_logits():
    small = _call(16)
    assert dispatch.preference_order(small, "gpu")[:4] == ["cudnn", "pallas_gpu", "xla", "chunked"]
    huge = dataclasses.replace(small, B=1, N=16, T=65536, S=65536)
    assert dispatch.preference_order(huge, "gpu")[:4] == ["cudnn", "pallas_gpu", "chunked", "xla"]


def test_cpu_preference_puts_xla_before_chunked_when_decoding(monkeypatch):
    monkeypatch.setattr(dispatch, "_may_partition", lambda platform: False)  # one device
    order = ["cpu_flash", "chunked", "xla", "reference"]
    assert dispatch.preference_order(_call(16), "cpu") == order
    decoding = ["cpu_flash", "xla", "chunked", "reference"]
    assert dispatch.preference_order(_call(1, 64), "cpu") == decoding


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs conftest's 8 CPU devices as default")
def test_cpu_flash_stays_in_the_default_where_devices_may_be_partitioned():
    # it splits over batch and heads (kernels/partitioned.py, tests/sharding)
    assert dispatch._may_partition("cpu")
    assert "cpu_flash" in dispatch.preference_order(_call(16), "cpu")
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        assert "cpu_flash" in dispatch.preference_order(_call(16), "cpu")


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs conftest's 8 CPU devices as default")
def test_custom_calls_leave_the_default_where_devices_may_be_partitioned(monkeypatch):
    # a kernel that runs whole on each device goes on dispatch.CUSTOM_CALLS
    monkeypatch.setattr(dispatch, "CUSTOM_CALLS", ("cpu_flash",))
    assert dispatch._may_partition("cpu")
    assert "cpu_flash" not in dispatch.preference_order(_call(16), "cpu")
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        assert "cpu_flash" not in dispatch.preference_order(_call(16), "cpu")
    seen = []

    def per_device(x):  # inside shard_map over every axis: nothing is partitioned
        seen.append(dispatch.preference_order(_call(16), "cpu"))
        return x

    x = jax.device_put(jnp.zeros(8), NamedSharding(mesh, P("data")))
    jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)
    assert seen == [["cpu_flash", "chunked", "xla", "reference"]]


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({}, None),
        ({"dtype": np.dtype("float32")}, "bfloat16 and float16 only"),
        ({"H": 12, "H_v": 12}, "multiple of 8"),
        ({"H": 512, "H_v": 512}, "<= 256"),
        ({"dropout_rate": 0.1}, "no dropout"),
        ({"H_v": 32}, "value head dim"),
        ({"has_mask": True, "T": 7}, "even T and S"),
    ],
)
def test_cudnn_declares_what_it_supports(monkeypatch, changes, reason):
    fake_h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    monkeypatch.setattr(cudnn, "_nvidia_device", lambda: fake_h100)
    fields = {"dtype": np.dtype(jnp.bfloat16), "H": 64, "H_v": 64, **changes}
    call = dataclasses.replace(_call(16), **fields)
    got = dispatch.unsupported_reason("cudnn", call, "gpu")
    assert got == reason if reason is None else reason in got


def test_cudnn_needs_an_nvidia_gpu(monkeypatch):
    monkeypatch.setattr(cudnn, "_nvidia_device", lambda: None)
    call = dataclasses.replace(_call(16), dtype=np.dtype(jnp.bfloat16))
    assert "NVIDIA" in dispatch.unsupported_reason("cudnn", call, "gpu")


def test_available_implementations_on_cpu():
    names = dispatch.available_implementations()
    assert {"chunked", "xla", "reference"} <= set(names)
    assert "cudnn" not in names or jax.default_backend() == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(cudnn._nvidia_device() is None, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T, S", [(128, 128), (64, 128)])
def test_cudnn_matches_reference_on_gpu(T, S):
    q, k, v = _inputs(T, S, H=64, dtype=jnp.bfloat16)
    lengths = {"key_value_seq_lengths": jnp.array([S, S // 2])}
    out = dispatch.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn", **lengths)
    expected = reference.dot_product_attention(q, k, v, is_causal=True, **lengths)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2, rtol=2e-2
    )
