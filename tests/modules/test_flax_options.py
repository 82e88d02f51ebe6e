"""The Flax options of the book's modules, Linen and NNX alike: keyword-only
``deterministic``, ``mask=``, ``x_kv=`` with ``is_causal``, ``dtype``/``param_dtype``,
``sow_weights``, ``init`` with one key, NNX ``init_cache(input_shape, dtype)``. Each is
checked against the reference oracle on the module's own parameters, or Flax's own
functions, inside the code a Flax user writes (jitted steps, ``nnx.jit``, optax)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_attn as ja
from jax_attn import nnx_modules as ja_nnx
from jax_attn import reference
from jax_attn.functional import merge_heads, split_heads

D_IN, D_OUT, CONTEXT, HEADS = 6, 4, 8, 2
B, T, S = 2, 5, 3
CLOSE = {"rtol": 1e-5, "atol": 1e-6}
# nnx.capture arrived in flax 0.12.6 (the dev extra's floor), after the library's minimum
# flax 0.12.4, where .ci/run's minimum-versions step runs this file
NEEDS_NNX_CAPTURE = pytest.mark.skipif(
    not hasattr(nnx, "capture"), reason="nnx.capture needs flax>=0.12.6"
)


def linen_mha(dropout=0.0, **options):
    return ja.MultiHeadAttention(D_IN, D_OUT, CONTEXT, dropout, HEADS, True, **options)


def nnx_mha(dropout=0.0, seed=0, **options):
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    return ja_nnx.MultiHeadAttention(
        D_IN, D_OUT, CONTEXT, dropout, HEADS, True, rngs=rngs, **options
    )


def inputs(shape=(B, T, D_IN), seed=0, dtype=jnp.float32):
    """Standard normal values drawn with numpy (no per-shape PRNG compile), then ``dtype``."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x).astype(dtype)


def dense(x, params):
    out = x @ params["kernel"]
    return out + jnp.expand_dims(params["bias"], tuple(range(out.ndim - 1)))


def oracle(params, x, x_kv=None, *, mask=None, is_causal=True):
    """MultiHeadAttention rebuilt from its params and the reference kernel."""
    x_kv = x if x_kv is None else x_kv
    # [B, T, N, H]
    q = split_heads(dense(x, params["W_query"]), HEADS)
    # [B, S, N, H]
    k = split_heads(dense(x_kv, params["W_key"]), HEADS)
    v = split_heads(dense(x_kv, params["W_value"]), HEADS)
    context = reference.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return dense(merge_heads(context), params["out_proj"])


@pytest.fixture(scope="module")
def params():
    return linen_mha().init(jax.random.key(1), inputs())["params"]


def padding_mask():
    """Keys past each sequence's length masked; every query keeps key 0."""
    return ja.make_padding_mask(None, jnp.array([T, 3]), T, T)


# --- deterministic is keyword-only; the second positional input is x_kv -------------------


def test_second_positional_input_is_x_kv_and_deterministic_is_keyword_only(params):
    x = inputs()
    module = linen_mha(dropout=0.5)
    same = module.apply({"params": params}, x, x, deterministic=True)
    np.testing.assert_allclose(same, oracle(params, x), **CLOSE)
    with pytest.raises(TypeError, match="deterministic is keyword-only"):
        module.apply({"params": params}, x, True)
    with pytest.raises(TypeError, match="deterministic is keyword-only"):
        nnx_mha(dropout=0.5)(x, True)


# --- mask= combined with causal, in training -----------------------------------------------


def test_padding_mask_in_a_jitted_optax_step_equals_the_reference_step(params):
    optax = pytest.importorskip("optax")
    x, target = inputs(), inputs((B, T, D_OUT), seed=5)
    mask = padding_mask()
    module = linen_mha()
    optimizer = optax.sgd(0.1, momentum=0.9)

    def loss_with(forward):
        return lambda p: jnp.mean((forward(p) - target) ** 2)

    module_loss = loss_with(lambda p: module.apply({"params": p}, x, mask=mask, deterministic=True))
    oracle_loss = loss_with(lambda p: oracle(p, x, mask=mask))

    def step(loss_fn):
        @jax.jit
        def train_step(p, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss, grads

        return train_step

    got = step(module_loss)(params, optimizer.init(params))
    want = step(oracle_loss)(params, optimizer.init(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    # the padded keys change nothing: their inputs get no gradient through attention
    unmasked = module.apply({"params": params}, x, deterministic=True)
    assert not np.allclose(got[2], loss_with(lambda p: unmasked)(params))


def test_nnx_mask_under_nnx_jit_equals_reference():
    model = nnx_mha()
    x, mask = inputs(), padding_mask()
    forward = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    p = ja_nnx.linen_params_from_nnx(model)
    np.testing.assert_allclose(forward(model, x, mask), oracle(p, x, mask=mask), **CLOSE)


def test_bad_masks_are_clear_errors(params):
    module, x = linen_mha(), inputs()
    # float and int masks are Flax's (nonzero = may attend); complex ones are refused
    with pytest.raises(TypeError, match=r"MultiHeadAttention\.apply: mask must be a bool"):
        module.apply({"params": params}, x, mask=jnp.ones((T, T), jnp.complex64))
    with pytest.raises(ValueError, match=r"mask must broadcast to \[B, N, T, S\]"):
        module.apply({"params": params}, x, mask=jnp.ones((B, 1, T, T + 1), bool))


# --- cross-attention: x_kv and is_causal=False -------------------------------------------


def test_cross_attention_linen_and_nnx_equal_reference(params):
    x, x_kv = inputs(), inputs((B, S, D_IN), seed=3)
    key_mask = ja.make_padding_mask(None, jnp.array([S, 2]), T, S)
    want = oracle(params, x, x_kv, mask=key_mask, is_causal=False)
    linen_out = linen_mha(is_causal=False).apply({"params": params}, x, x_kv, mask=key_mask)
    np.testing.assert_allclose(linen_out, want, **CLOSE)
    model = ja_nnx.nnx_from_linen_params(nnx_mha(is_causal=False), params)
    np.testing.assert_allclose(model(x, x_kv=x_kv, mask=key_mask), want, **CLOSE)
    # unbatched: [T, d_in] with [S, d_in]
    np.testing.assert_allclose(model(x[0], x_kv[0], mask=key_mask[0]), want[0], **CLOSE)


def test_causal_cross_attention_is_bottom_right_aligned(params):
    x, x_kv = inputs((B, S, D_IN)), inputs((B, T, D_IN), seed=3)
    out = linen_mha().apply({"params": params}, x, x_kv)
    np.testing.assert_allclose(out, oracle(params, x, x_kv, is_causal=True), **CLOSE)


def test_x_kv_must_match_x(params):
    module, x = linen_mha(), inputs()
    with pytest.raises(ValueError, match="x_kv must have shape"):
        module.apply({"params": params}, x, inputs((B + 1, S, D_IN)))
    with pytest.raises(TypeError, match="x_kv must have x's dtype"):
        module.apply({"params": params}, x, inputs((B, S, D_IN), dtype=jnp.bfloat16))


# --- dtype / param_dtype ------------------------------------------------------------------


def test_bfloat16_compute_with_float32_params(params):
    x = inputs()
    module = linen_mha(dtype=jnp.bfloat16)
    fresh = module.init(jax.random.key(1), x)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}
    out = module.apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), oracle(params, x), atol=3e-2, rtol=3e-2)
    model = ja_nnx.nnx_from_linen_params(nnx_mha(dtype=jnp.bfloat16), params)
    assert model.W_query.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(model(x), out)


def test_param_dtype_sets_the_parameters_dtype():
    module = linen_mha(param_dtype=jnp.bfloat16)
    shapes = jax.eval_shape(module.init, jax.random.key(0), inputs())["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(TypeError, match="param_dtype must be a floating dtype"):
        linen_mha(param_dtype=jnp.int32)


# --- sow_weights --------------------------------------------------------------------------


def flax_weights(params, x, mask):
    """The weights Flax's own ``nn.dot_product_attention_weights`` gives, causal + mask."""
    q = split_heads(dense(x, params["W_query"]), HEADS)
    k = split_heads(dense(x, params["W_key"]), HEADS)
    causal = nn.make_causal_mask(jnp.ones((B, T)), dtype=bool)
    return nn.dot_product_attention_weights(q, k, mask=jnp.logical_and(causal, mask))


def test_linen_sow_weights_equal_flax_weights(params):
    x, mask = inputs(), padding_mask()
    module = linen_mha()
    apply = jax.jit(
        lambda p, x: module.apply({"params": p}, x, mask=mask, sow_weights=True, mutable=True)
    )
    out, state = apply(params, x)
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (B, HEADS, T, T)
    np.testing.assert_allclose(weights, flax_weights(params, x, mask), **CLOSE)
    np.testing.assert_allclose(out, oracle(params, x, mask=mask), **CLOSE)
    # off by default, as in Flax
    _, state = module.apply({"params": params}, x, mutable=["intermediates"])
    assert "intermediates" not in state or not state["intermediates"]


@NEEDS_NNX_CAPTURE
def test_nnx_sow_weights_equal_flax_weights(params):
    x, mask = inputs(), padding_mask()
    model = ja_nnx.nnx_from_linen_params(nnx_mha(), params)
    forward = nnx.jit(nnx.capture(lambda m, x: m(x, mask=mask, sow_weights=True), nnx.Intermediate))
    out, intermediates = forward(model, x)
    (weights,) = intermediates["attention_weights"].get_value()
    np.testing.assert_allclose(out, oracle(params, x, mask=mask), **CLOSE)
    np.testing.assert_allclose(weights, flax_weights(params, x, mask), **CLOSE)


def test_sow_weights_must_be_a_bool(params):
    x = inputs()
    with pytest.raises(TypeError, match=r"MultiHeadAttention\.apply: sow_weights must be a bool"):
        linen_mha().apply({"params": params}, x, sow_weights=1)
    with pytest.raises(TypeError, match=r"MultiHeadAttention\.__call__: sow_weights must be a"):
        nnx_mha()(x, sow_weights="yes")


# --- init with a single key; errors say init or apply ------------------------------------


# MultiHeadAttention fast; the other classes (slow set) share its dropout/init base
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("CausalAttention", marks=pytest.mark.slow),
        pytest.param("MultiHeadAttentionWrapper", marks=pytest.mark.slow),
        "MultiHeadAttention",
    ],
)
def test_init_with_one_key_and_dropout_in_training_mode(name):
    x = inputs()
    extra = () if name == "CausalAttention" else (HEADS,)
    training = getattr(ja, name)(D_IN, D_OUT, CONTEXT, 0.5, *extra, deterministic=False)
    evaluation = getattr(ja, name)(D_IN, D_OUT, CONTEXT, 0.5, *extra)
    key = jax.random.key(0)
    trained = training.init(key, x)["params"]
    jax.tree.map(np.testing.assert_array_equal, trained, evaluation.init(key, x)["params"])
    with pytest.raises(ValueError, match=rf"{name}\.apply: dropout=0\.5 .*no 'dropout' rng"):
        training.apply({"params": trained}, x)


def test_errors_say_init_or_apply(params):
    module = linen_mha()
    with pytest.raises(ValueError, match=r"MultiHeadAttention\.init: x's last dim"):
        module.init(jax.random.key(0), inputs((B, T, D_IN + 1)))
    with pytest.raises(ValueError, match=r"MultiHeadAttention\.apply: x's last dim"):
        module.apply({"params": params}, inputs((B, T, D_IN + 1)))


# --- NNX init_cache in Flax's (input_shape, dtype) form -----------------------------------


def test_nnx_init_cache_flax_form_decodes_like_the_full_pass():
    model = nnx_mha(decode=True)
    x = inputs((B, T, D_IN), seed=4)
    full = model(x, decode=False)
    model.init_cache((B, T, D_IN), jnp.float32)
    assert model.cached_key.shape == (B, T, HEADS, D_OUT // HEADS)
    step = nnx.jit(lambda m, chunk: m(chunk))
    steps = [step(model, x[:, :2])] + [step(model, x[:, t : t + 1]) for t in range(2, T)]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"input_shape must be \(B, S_max, d_in=6\)"):
        model.init_cache((B, CONTEXT + 1, D_IN))
    with pytest.raises(TypeError, match="exactly one"):
        model.init_cache()


# --- inside a user's model: nn.scan over blocks ---------------------------------------------


class Block(nn.Module):
    """A residual attention block, scanned over layers the way Flax users stack blocks."""

    @nn.compact
    def __call__(self, x, mask):
        attention = ja.MultiHeadAttention(D_IN, D_IN, CONTEXT, 0.5, HEADS, name="attention")
        return x + attention(x, mask=mask, deterministic=True), None


# slow: the fast test_nnx_scan_over_vmapped_layers_equals_the_layers_one_by_one runs the
# same stacked MultiHeadAttention with a mask through scan (NNX's lift instead of Linen's)
@pytest.mark.slow
def test_nn_scan_over_blocks_equals_the_blocks_one_by_one():
    layers = 3
    Stack = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=layers,
    )
    x, mask = inputs(), padding_mask()
    variables = Stack().init(jax.random.key(0), x, mask)
    out, _ = jax.jit(Stack().apply)(variables, x, mask)
    stacked = variables["params"]["attention"]
    assert stacked["W_query"]["kernel"].shape == (layers, D_IN, D_IN)
    np.testing.assert_allclose(out, layers_one_by_one(stacked, x, mask), rtol=1e-5, atol=1e-5)


@jax.jit
def layers_one_by_one(stacked, x, mask):
    """The residual blocks applied in a Python loop, layer ``i`` from ``leaf[i]``, through
    ``oracle_square`` (jitted: one compile, not op-by-op dispatch)."""
    h = x
    for i in range(stacked["W_query"]["kernel"].shape[0]):
        h = h + oracle_square(jax.tree.map(lambda leaf, i=i: leaf[i], stacked), h, mask)
    return h


def oracle_square(params, x, mask):
    """``oracle`` for a ``d_out = d_in`` block (no qkv bias)."""
    q, k, v = (
        split_heads(x @ params[name]["kernel"], HEADS) for name in ("W_query", "W_key", "W_value")
    )
    context = reference.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return dense(merge_heads(context), params["out_proj"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"x_kv": jnp.ones((B, S, D_IN))}, "x_kv .* cannot be used with decode=True"),
        ({"mask": jnp.ones((B, 1, 1, CONTEXT), bool)}, "mask= cannot be used with decode=True"),
        ({"sow_weights": True}, "sow_weights=True cannot be used with decode=True"),
    ],
)
def test_decoding_refuses_options_it_cannot_honour(options, match):
    model = nnx_mha(decode=True)
    model.init_cache(B)
    with pytest.raises(ValueError, match=rf"MultiHeadAttention\.__call__: {match}"):
        model(inputs((B, 1, D_IN)), **options)
    with pytest.raises(ValueError, match=rf"MultiHeadAttention\.init: {match}"):
        linen_mha(decode=True).init(jax.random.key(0), inputs((B, 1, D_IN)), **options)


def test_nnx_scan_over_vmapped_layers_equals_the_layers_one_by_one():
    layers = 3

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return ja_nnx.MultiHeadAttention(D_IN, D_IN, CONTEXT, 0.0, HEADS, rngs=rngs)

    @nnx.jit
    def forward(stack, x, mask):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return h + layer(h, mask=mask)

        return body(x, stack)

    stack = create(nnx.Rngs(0))
    x, mask = inputs(), padding_mask()
    stacked = ja_nnx.linen_params_from_nnx(stack)
    assert stacked["W_query"]["kernel"].shape == (layers, D_IN, D_IN)
    np.testing.assert_allclose(
        forward(stack, x, mask), layers_one_by_one(stacked, x, mask), rtol=1e-5, atol=1e-5
    )
