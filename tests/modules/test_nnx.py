"""Flax NNX modules: parity with the Linen modules, dropout keys, modes and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from jax.experimental import checkify

from jax_attn import nnx_modules as ja_nnx
from jax_attn import reference
from jax_attn.functional import merge_heads, split_heads

D_IN, D_OUT, T, B, HEADS = 6, 4, 5, 2, 2

MODULES = {
    "SelfAttentionV1": lambda rngs, **kw: ja_nnx.SelfAttentionV1(D_IN, D_OUT, rngs=rngs),
    "SelfAttentionV2": lambda rngs, **kw: ja_nnx.SelfAttentionV2(D_IN, D_OUT, True, rngs=rngs),
    "CausalAttention": lambda rngs, dropout=0.0, **kw: ja_nnx.CausalAttention(
        D_IN, D_OUT, T, dropout, rngs=rngs, **kw
    ),
    "MultiHeadAttentionWrapper": lambda rngs, dropout=0.0, **kw: ja_nnx.MultiHeadAttentionWrapper(
        D_IN, D_OUT, T, dropout, HEADS, True, rngs=rngs, **kw
    ),
    "MultiHeadAttention": lambda rngs, dropout=0.0, **kw: ja_nnx.MultiHeadAttention(
        D_IN, D_OUT, T, dropout, HEADS, rngs=rngs, **kw
    ),
    "MultiHeadAttention-MQA": lambda rngs, dropout=0.0, **kw: ja_nnx.MultiHeadAttention(
        D_IN, D_OUT, T, dropout, HEADS, True, num_kv_heads=1, rngs=rngs, **kw
    ),
}
WITH_DROPOUT = ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention"]


def inputs(batched=True, seed=0):
    """Standard normal float32 drawn with numpy: no per-shape PRNG compile."""
    shape = (B, T, D_IN) if batched else (T, D_IN)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def only(fast, every):
    """``every`` as params, those not in ``fast`` marked slow (CI's `-m slow` step)."""
    slow = pytest.mark.slow
    return [
        c if c in fast else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=slow)
        for c in every
    ]


def oracle(p, x):
    """MultiHeadAttention (no qkv bias) rebuilt from Linen-layout params and the reference."""
    # [B, T, N, H]
    q, k, v = (split_heads(x @ p[n]["kernel"], HEADS) for n in ("W_query", "W_key", "W_value"))
    context = reference.dot_product_attention(q, k, v, is_causal=True)
    out = merge_heads(context) @ p["out_proj"]["kernel"]
    return out + jnp.expand_dims(p["out_proj"]["bias"], (0, 1))


class _KeyProbe(nn.Module):
    """Returns the key Linen's ``make_rng('dropout')`` gives a module at this path."""

    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


class _HeadsProbe(nn.Module):
    num_heads: int

    def setup(self):
        self.heads = [_KeyProbe() for _ in range(self.num_heads)]

    def __call__(self):
        return [head() for head in self.heads]


# fast: MQA batched and both unbatched cases; every class's batched Linen parity also runs
# fast in test_linen_params_load_into_nnx, so the other batched cases are in the slow set
@pytest.mark.parametrize(
    ("name", "batched"),
    only(
        {
            ("MultiHeadAttention-MQA", True),
            ("SelfAttentionV1", False),
            ("MultiHeadAttention", False),
        },
        [(name, True) for name in MODULES]
        + [("SelfAttentionV1", False), ("MultiHeadAttention", False)],
    ),
)
def test_nnx_params_in_linen_give_same_output(name, batched):
    module = MODULES[name](nnx.Rngs(params=0))
    x = inputs(batched)
    params = ja_nnx.linen_params_from_nnx(module)
    expected = module.linen_module().apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(module(x, deterministic=True), expected, rtol=1e-6, atol=1e-6)
    assert module(x, deterministic=True).shape == expected.shape


# fast: V2 and the multi-head classes. In the slow set: MQA (Linen parity fast in
# test_nnx_params_in_linen_give_same_output), SelfAttentionV1 (likewise, unbatched) and
# CausalAttention (Linen parity fast in test_dropout_same_key_same_mask_as_linen); all three
# load through the same converter, which test_torch_state_dict_round_trip_through_interop
# runs fast for every class
@pytest.mark.parametrize(
    "name",
    only({"SelfAttentionV2", "MultiHeadAttentionWrapper", "MultiHeadAttention"}, list(MODULES)),
)
def test_linen_params_load_into_nnx(name):
    module = MODULES[name](nnx.Rngs(params=0))
    x = inputs()
    linen_module = module.linen_module()
    params = linen_module.init(jax.random.key(7), x, deterministic=True)["params"]
    ja_nnx.nnx_from_linen_params(module, params)
    np.testing.assert_allclose(
        module(x, deterministic=True),
        linen_module.apply({"params": params}, x, deterministic=True),
        rtol=1e-6,
        atol=1e-6,
    )
    round_trip = ja_nnx.linen_params_from_nnx(module)
    jax.tree.map(np.testing.assert_array_equal, round_trip, params)


def test_multi_head_attention_matches_reference():
    module = MODULES["MultiHeadAttention"](nnx.Rngs(params=3))
    x = inputs()
    p = ja_nnx.linen_params_from_nnx(module)
    np.testing.assert_allclose(module(x, deterministic=True), oracle(p, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["CausalAttention", "MultiHeadAttention"])
def test_dropout_same_key_same_mask_as_linen(name):
    module = MODULES[name](nnx.Rngs(params=0), dropout=0.5)
    x = inputs()
    root = jax.random.key(42)
    params = ja_nnx.linen_params_from_nnx(module)
    linen_out = module.linen_module().apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": root}
    )
    linen_key = _KeyProbe().apply({}, rngs={"dropout": root})
    np.testing.assert_array_equal(
        jax.random.key_data(ja_nnx.linen_dropout_rng(root)), jax.random.key_data(linen_key)
    )
    nnx_out = module(x, deterministic=False, rngs=linen_key)
    np.testing.assert_allclose(nnx_out, linen_out, rtol=1e-6, atol=1e-6)
    assert not np.allclose(nnx_out, module(x, deterministic=True))


def test_wrapper_dropout_same_keys_same_masks_as_linen():
    module = MODULES["MultiHeadAttentionWrapper"](nnx.Rngs(params=0), dropout=0.5)
    x = inputs()
    root = jax.random.key(42)
    params = ja_nnx.linen_params_from_nnx(module)
    linen_out = module.linen_module().apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": root}
    )
    head_keys = _HeadsProbe(HEADS).apply({}, rngs={"dropout": root})
    nnx_out = jnp.concatenate(
        [
            head(x, deterministic=False, rngs=key)
            for head, key in zip(module.heads, head_keys, strict=True)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(nnx_out, linen_out, rtol=1e-6, atol=1e-6)
    helper_keys = [ja_nnx.linen_dropout_rng(root, f"heads_{i}") for i in range(HEADS)]
    for helper_key, probe_key in zip(helper_keys, head_keys, strict=True):
        np.testing.assert_array_equal(
            jax.random.key_data(helper_key), jax.random.key_data(probe_key)
        )
    np.testing.assert_array_equal(module(x, deterministic=False, rngs=helper_keys), nnx_out)
    with pytest.raises(ValueError, match="one key per head"):
        module(x, deterministic=False, rngs=helper_keys[:1])


# Causal and Wrapper (slow set) draw from the same stream code as MultiHeadAttention; the
# wrapper's per-head keys are checked fast in test_wrapper_dropout_same_keys_same_masks_as_linen
@pytest.mark.parametrize("name", only({"MultiHeadAttention"}, WITH_DROPOUT))
def test_same_rngs_seed_reproduces(name):
    x = inputs()
    first = MODULES[name](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    second = MODULES[name](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    a1, a2 = (first(x, deterministic=False) for _ in range(2))
    b1, b2 = (second(x, deterministic=False) for _ in range(2))
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2), "the dropout stream must advance between calls"


def test_explicit_key_at_call_wins_over_stream():
    module = MODULES["MultiHeadAttention"](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    x = inputs()
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        module(x, deterministic=False, rngs=key), module(x, deterministic=False, rngs=key)
    )
    from_rngs = module(x, deterministic=False, rngs=nnx.Rngs(dropout=9))
    np.testing.assert_array_equal(
        from_rngs, module(x, deterministic=False, rngs=nnx.Rngs(dropout=9))
    )


# the mode flags live in the shared base; the other classes run in the slow set
@pytest.mark.parametrize("name", only({"MultiHeadAttention"}, WITH_DROPOUT))
def test_deterministic_at_construction_call_and_eval(name):
    x = inputs()
    rngs = nnx.Rngs(params=0, dropout=1)
    module = MODULES[name](rngs, dropout=0.5, deterministic=True)
    clean = module(x)
    assert not np.allclose(module(x, deterministic=False), clean), "the call wins"
    module.train()
    assert not np.allclose(module(x), clean)
    module.eval()
    np.testing.assert_array_equal(module(x), clean)
    params = ja_nnx.linen_params_from_nnx(module)
    linen_clean = module.linen_module().apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(clean, linen_clean, rtol=1e-6, atol=1e-6)


def test_dropout_without_mode_or_key_is_an_error():
    x = inputs()
    module = MODULES["MultiHeadAttention"](nnx.Rngs(params=0), dropout=0.5)
    with pytest.raises(ValueError, match="deterministic"):
        module(x)
    with pytest.raises(ValueError, match="dropout needs a key"):
        module(x, deterministic=False)
    with pytest.raises(TypeError, match="rngs must be"):
        module(x, deterministic=False, rngs=3)


def test_nnx_jit_grads_equal_linen_and_reference_grads():
    module = MODULES["MultiHeadAttention"](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    x = inputs()
    target = jax.random.normal(jax.random.key(8), (B, T, D_OUT))

    @nnx.jit
    def forward(model, x):
        return model(x, deterministic=True)

    # atol: on a GPU the jitted and eager programs fuse differently (4e-8 apart on an H200)
    eager = module(x, deterministic=True)
    np.testing.assert_allclose(forward(module, x), eager, rtol=1e-6, atol=1e-7)

    def loss(out):
        return jnp.mean((out - target) ** 2)

    grads = nnx.jit(nnx.grad(lambda model: loss(model(x, deterministic=True))))(module)
    grads = nnx.to_pure_dict(grads)  # the same tree as the Linen params (no heads list)
    params = ja_nnx.linen_params_from_nnx(module)
    linen_module = module.linen_module()
    linen_grads = jax.jit(
        jax.grad(lambda p: loss(linen_module.apply({"params": p}, x, deterministic=True)))
    )(params)
    oracle_grads = jax.jit(jax.grad(lambda p: loss(oracle(p, x))))(params)
    for want in (linen_grads, oracle_grads):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want
        )
    assert np.all(np.abs(grads["W_query"]["kernel"]) > 0)


# fast: the wrapper (heads list); MultiHeadAttention's grads run fast in
# test_nnx_jit_grads_equal_linen_and_reference_grads
@pytest.mark.parametrize(
    "name",
    only(
        {"MultiHeadAttentionWrapper"},
        ["SelfAttentionV1", "MultiHeadAttentionWrapper", "MultiHeadAttention-MQA"],
    ),
)
def test_nnx_grads_equal_linen_grads(name):
    module = MODULES[name](nnx.Rngs(params=2))
    x = inputs()
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x, deterministic=True)))))(module)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(grads))
    # NNX keeps the wrapper's heads in a list: ("heads", 0, ...) is Linen's ("heads_0", ...)
    as_linen = {
        ((f"heads_{path[1]}", *path[2:]) if path[0] == "heads" else path): g
        for path, g in flat.items()
    }
    linen_module, params = module.linen_module(), ja_nnx.linen_params_from_nnx(module)
    linen_grads = jax.jit(
        jax.grad(lambda p: jnp.sum(jnp.sin(linen_module.apply({"params": p}, x))))
    )(params)
    want = traverse_util.flatten_dict(linen_grads)
    assert as_linen.keys() == want.keys()
    for path, g in want.items():
        np.testing.assert_allclose(as_linen[path], g, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_dropout_stream_under_nnx_jit_matches_eager():
    x = inputs()
    eager = MODULES["MultiHeadAttention"](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    jitted = MODULES["MultiHeadAttention"](nnx.Rngs(params=0, dropout=1), dropout=0.5)
    step = nnx.jit(lambda model, x: model(x, deterministic=False))
    first, second = step(jitted, x), step(jitted, x)
    np.testing.assert_allclose(first, eager(x, deterministic=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second, eager(x, deterministic=False), rtol=1e-6, atol=1e-6)
    assert not np.allclose(first, second), "the stream must advance inside nnx.jit too"


def test_causal_modules_do_not_see_the_future():
    module = MODULES["MultiHeadAttention"](nnx.Rngs(params=0))
    x = inputs(batched=False)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(module(x, deterministic=True)[1])))(x)
    np.testing.assert_array_equal(grad[2:], 0.0)
    assert np.all(grad[:2] != 0.0)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: ja_nnx.MultiHeadAttention(6, 5, 4, 0.0, 2, rngs=nnx.Rngs(0)),
            ValueError,
            "divisible",
        ),
        (lambda: ja_nnx.CausalAttention(6, 4, 4, 1.5, rngs=nnx.Rngs(0)), ValueError, "dropout"),
        (lambda: ja_nnx.SelfAttentionV2(6, 0, rngs=nnx.Rngs(0)), ValueError, "d_out"),
        (lambda: ja_nnx.SelfAttentionV1(6, 4, rngs=0), TypeError, "nnx.Rngs"),
    ],
)
def test_bad_arguments_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_input_checks_match_linen():
    module = MODULES["CausalAttention"](nnx.Rngs(0))
    with pytest.raises(ValueError, match="context_length"):
        module(jnp.ones((T + 1, D_IN)), deterministic=True)
    with pytest.raises(ValueError, match="d_in"):
        module(jnp.ones((T, D_IN + 1)), deterministic=True)


def test_nnx_from_linen_params_rejects_mismatch():
    module = MODULES["MultiHeadAttention"](nnx.Rngs(0))
    params = ja_nnx.linen_params_from_nnx(module)
    wrong_shape = {**params, "out_proj": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match="out_proj/kernel must have shape"):
        ja_nnx.nnx_from_linen_params(module, wrong_shape)
    missing = {k: v for k, v in params.items() if k != "W_key"}
    with pytest.raises(ValueError, match="missing \\['W_key/kernel'\\]"):
        ja_nnx.nnx_from_linen_params(module, missing)
    with pytest.raises(TypeError, match="jax_attn.nnx_modules module"):
        ja_nnx.linen_params_from_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_state_dict_round_trip_through_interop(name):
    interop = pytest.importorskip("jax_attn.interop")
    source = MODULES[name](nnx.Rngs(params=0))
    state_dict = interop.params_to_torch(source, ja_nnx.linen_params_from_nnx(source))
    target = MODULES[name](nnx.Rngs(params=1))
    ja_nnx.nnx_from_linen_params(target, interop.params_from_torch(target, state_dict))
    x = inputs()
    np.testing.assert_array_equal(target(x, deterministic=True), source(x, deterministic=True))


# --- decoding -----------------------------------------------------------------------------

CONTEXT = 8


def decoder(num_kv_heads=None, dropout=0.0):
    return ja_nnx.MultiHeadAttention(
        D_IN,
        D_OUT,
        CONTEXT,
        dropout,
        HEADS,
        num_kv_heads=num_kv_heads,
        decode=True,
        rngs=nnx.Rngs(params=0, dropout=1),
    )


def linen_decode(module, params, chunks, lengths=None):
    """Linen ``decode=True`` over ``chunks`` (a list of ``[B, T_i, D]``): the outputs."""
    linen_module = module.linen_module()
    cache = linen_module.init(jax.random.key(0), chunks[0], deterministic=True)["cache"]
    outs = []
    for i, chunk in enumerate(chunks):
        kwargs = {"lengths": lengths} if (lengths is not None and i == 0) else {}
        out, updated = linen_module.apply(
            {"params": params, "cache": cache},
            chunk,
            deterministic=True,
            mutable=["cache"],
            **kwargs,
        )
        cache = updated["cache"]
        outs.append(out)
    return outs


# GQA (slow set) decodes through the same cache code; Linen's GQA decoding has its own tests
@pytest.mark.parametrize("num_kv_heads", [None, pytest.param(1, marks=pytest.mark.slow)])
def test_nnx_decode_equals_full_pass_and_linen_decode(num_kv_heads):
    module = decoder(num_kv_heads)
    x = jax.random.normal(jax.random.key(3), (B, 5, D_IN))
    full = module(x, decode=False, deterministic=True)
    module.init_cache(B)
    chunks = [x[:, :3], x[:, 3:4], x[:, 4:5]]
    steps = [module(chunk, deterministic=True) for chunk in chunks]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)
    assert module.cache_index[...].tolist() == [5] * B
    if num_kv_heads is None:  # GQA decoding in Linen has its own tests; one parity run here
        expected = linen_decode(module, ja_nnx.linen_params_from_nnx(module), chunks)
        for step, linen_step in zip(steps, expected, strict=True):
            np.testing.assert_allclose(step, linen_step, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_nnx_decode_under_jit_matches_eager_and_checks_overflow():
    eager, jitted = decoder(), decoder()
    x = jax.random.normal(jax.random.key(4), (B, CONTEXT, D_IN))
    eager.init_cache(B)
    jitted.init_cache(B)
    step = nnx.checkify(nnx.jit(lambda model, chunk: model(chunk, deterministic=True)))

    def checked_step(model, chunk):
        error, out = step(model, chunk)
        error.throw()
        return out

    for chunk in (x[:, :2], x[:, 2:3], x[:, 3:CONTEXT]):
        np.testing.assert_allclose(checked_step(jitted, chunk), eager(chunk), rtol=1e-6, atol=1e-6)
    assert jitted.cache_index[...].tolist() == [CONTEXT] * B
    with pytest.raises(checkify.JaxRuntimeError, match="overflow"):
        checked_step(jitted, x[:, :1])


@pytest.mark.slow
def test_nnx_decode_padded_prompts_match_linen():
    module = decoder()
    x = jax.random.normal(jax.random.key(5), (B, 4, D_IN))
    lengths = jnp.array([4, 2])
    module.init_cache(B)
    prompt = module(x, deterministic=True, lengths=lengths)
    expected = linen_decode(module, ja_nnx.linen_params_from_nnx(module), [x], lengths)[0]
    np.testing.assert_allclose(prompt, expected, rtol=1e-6, atol=1e-6)
    assert module.cache_index[...].tolist() == [4, 2]
    short = module(x[1:2, :2], decode=False, deterministic=True)
    np.testing.assert_allclose(prompt[1, :2], short[0], rtol=1e-5, atol=1e-6)


def test_nnx_decode_errors():
    module = decoder()
    with pytest.raises(ValueError, match="init_cache"):
        module(jnp.ones((B, 1, D_IN)), deterministic=True)
    module.init_cache(B)
    with pytest.raises(ValueError, match="batch"):
        module(jnp.ones((B + 1, 1, D_IN)), deterministic=True)
    module(jnp.ones((B, CONTEXT - 1, D_IN)), deterministic=True)
    with pytest.raises(ValueError, match="overflow"):
        module(jnp.ones((B, 2, D_IN)), deterministic=True)


class TinyModel(nnx.Module):
    """A user's NNX model with the library's MultiHeadAttention inside."""

    def __init__(self, rngs: nnx.Rngs):
        self.attention = ja_nnx.MultiHeadAttention(D_IN, D_OUT, T, 0.1, HEADS, rngs=rngs)
        self.head = nnx.Linear(D_OUT, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attention(x))[..., 0]


@pytest.mark.slow
def test_nnx_module_trains_inside_a_users_model():
    optax = pytest.importorskip("optax")
    model = TinyModel(nnx.Rngs(params=0, dropout=1))
    # adam counts steps in int32 and mixes them with floats, which strict promotion refuses
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x = inputs()
    target = jax.random.normal(jax.random.key(9), (B, T))

    @nnx.jit
    def train_step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(train_step(model, optimizer, x, target)) for _ in range(40)]
    model.eval()
    final = float(jnp.mean((model(x) - target) ** 2))
    assert np.isfinite(losses).all()
    assert final < 0.5 * losses[0], (losses[0], final)
