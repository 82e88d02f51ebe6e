"""Flax's lifted transforms and user subclasses on every module class, Linen and NNX.

``nn.remat(cls)`` (Flax's idiom: a transformed class is a subclass with another name),
``nn.jit``, ``nn.vmap`` over a batch axis, ``nn.scan`` over remat'd blocks, a subclass
adding a field; ``nnx.remat``, ``nnx.jit``, ``nnx.vmap`` and NNX subclasses. Each is
compared with the untransformed module on the same parameters (itself checked against
the reference in test_linen_modules.py / test_nnx.py), or with the reference directly.
Also: NNX decoding in bfloat16, Flax's float/int masks, complex inputs refused.
``nnx.vmap`` + ``nnx.scan`` stacks are in test_flax_options.py.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_attn as ja
from jax_attn import linen_modules as ja_linen
from jax_attn import nnx_modules as ja_nnx
from jax_attn import reference
from jax_attn.functional import merge_heads, split_heads

D_IN, D_OUT, T, HEADS, B = 4, 4, 4, 2, 2
CLOSE = {"rtol": 1e-5, "atol": 1e-6}
CLASSES = (
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
)
# MultiHeadAttention (the class models use) in the default suite, every class in the slow step.
EVERY_CLASS = [
    name if name == "MultiHeadAttention" else pytest.param(name, marks=pytest.mark.slow)
    for name in CLASSES
]


def book_arguments(name: str, dropout: float = 0.0) -> tuple:
    """The book's positional arguments of class ``name`` at this file's sizes."""
    return {
        "SelfAttentionV1": (D_IN, D_OUT),
        "SelfAttentionV2": (D_IN, D_OUT, True),
        "CausalAttention": (D_IN, D_OUT, T, dropout, True),
        "MultiHeadAttentionWrapper": (D_IN, D_OUT // HEADS, T, dropout, HEADS),
        "MultiHeadAttention": (D_IN, D_OUT, T, dropout, HEADS, True),
    }[name]


def inputs(shape=(B, T, D_IN), seed=0, dtype=jnp.float32):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x).astype(dtype)


def assert_trees_close(got, want, **tolerance):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance), got, want)


def sum_of_squares(apply):
    """``params -> sum(apply(params) ** 2)``, a loss whose gradient reaches every weight."""
    return lambda params: jnp.sum(apply(params) ** 2)


# --- Linen ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVERY_CLASS)
def test_linen_remat_of_every_class_equals_the_class(name):
    cls = getattr(ja_linen, name)
    plain, remat = cls(*book_arguments(name)), nn.remat(cls)(*book_arguments(name))
    x = inputs()
    variables = plain.init(jax.random.key(0), x)
    assert_trees_close(remat.init(jax.random.key(0), x), variables, rtol=0, atol=0)
    np.testing.assert_allclose(remat.apply(variables, x), plain.apply(variables, x), **CLOSE)
    grads = [
        jax.grad(sum_of_squares(lambda p, m=m: m.apply({"params": p}, x)))(variables["params"])
        for m in (remat, plain)
    ]
    assert_trees_close(*grads, rtol=1e-5, atol=1e-6)


def test_linen_remat_keeps_dropout_and_names_a_traced_flag():
    args = book_arguments("MultiHeadAttention", dropout=0.5)
    plain = ja.MultiHeadAttention(*args, deterministic=False)
    remat = nn.remat(ja.MultiHeadAttention)(*args, deterministic=False)
    x, rngs = inputs(), {"dropout": jax.random.key(3)}
    variables = plain.init(jax.random.key(0), x)
    want = plain.apply(variables, x, rngs=rngs)
    np.testing.assert_allclose(remat.apply(variables, x, rngs=rngs), want, **CLOSE)
    assert not np.allclose(want, plain.apply(variables, x, deterministic=True))
    # nn.remat traces keyword arguments, so a call-time flag cannot steer Python control flow
    with pytest.raises(TypeError, match="deterministic must be a Python bool .* at construction"):
        remat.apply(variables, x, deterministic=True)


def test_linen_jit_of_the_class_equals_the_class():
    args = book_arguments("MultiHeadAttention")
    plain, jitted = ja.MultiHeadAttention(*args), nn.jit(ja.MultiHeadAttention)(*args)
    x = inputs()
    mask = ja.make_padding_mask(None, jnp.array([T, 2]), T, T)
    variables = jitted.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        jitted.apply(variables, x, mask=mask), plain.apply(variables, x, mask=mask), **CLOSE
    )


@pytest.mark.slow
def test_linen_vmap_over_a_batch_axis_shares_params_and_splits_dropout():
    def vmapped(cls):
        return nn.vmap(
            cls,
            in_axes=0,
            out_axes=0,
            variable_axes={"params": None},
            split_rngs={"params": False, "dropout": True},
        )

    args = book_arguments("MultiHeadAttention", dropout=0.5)
    x = inputs()  # each [T, d_in] slice is one unbatched call
    plain = ja.MultiHeadAttention(*args, deterministic=True)
    variables = vmapped(ja.MultiHeadAttention)(*args, deterministic=True).init(jax.random.key(0), x)
    assert variables["params"]["W_query"]["kernel"].shape == (D_IN, D_OUT)  # shared
    got = vmapped(ja.MultiHeadAttention)(*args, deterministic=True).apply(variables, x)
    want = jnp.stack([plain.apply(variables, x[b]) for b in range(B)])
    np.testing.assert_allclose(got, want, **CLOSE)
    # dropout: the same input in both slices is dropped with a different key per slice
    same = jnp.stack([x[0], x[0]])
    train = vmapped(ja.MultiHeadAttention)(*args, deterministic=False)
    dropped = train.apply(variables, same, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped[0], dropped[1])


class Block(nn.Module):
    """A residual attention block, as Flax users remat and scan them."""

    @nn.compact
    def __call__(self, h, _):
        attention = ja.MultiHeadAttention(D_IN, D_IN, T, 0.0, HEADS, name="attention")
        return h + attention(h), None


@pytest.mark.slow
def test_linen_scan_over_remat_blocks_equals_the_blocks_one_by_one():
    layers = 2
    Stack = nn.scan(
        nn.remat(Block),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=layers,
    )
    x = inputs()
    variables = Stack().init(jax.random.key(0), x, None)
    out, _ = Stack().apply(variables, x, None)
    stacked = variables["params"]["attention"]
    h = x
    for i in range(layers):
        layer = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
        h = h + ja.MultiHeadAttention(D_IN, D_IN, T, 0.0, HEADS).apply({"params": layer}, h)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)


def linen_scaled(cls):
    """A user's subclass: one more field, ``__call__`` overridden and calling ``super``."""

    class Scaled(cls):
        scale: float = 2.0

        def __call__(self, x, *args, **kwargs):
            return self.scale * super().__call__(x, *args, **kwargs)

    return Scaled


@pytest.mark.parametrize("name", EVERY_CLASS)
def test_linen_subclass_of_every_class(name):
    cls = getattr(ja_linen, name)
    plain, scaled = cls(*book_arguments(name)), linen_scaled(cls)(*book_arguments(name), scale=3.0)
    x = inputs()
    variables = plain.init(jax.random.key(0), x)
    assert_trees_close(scaled.init(jax.random.key(0), x), variables, rtol=0, atol=0)
    np.testing.assert_allclose(scaled.apply(variables, x), 3.0 * plain.apply(variables, x), **CLOSE)
    remat = nn.remat(linen_scaled(cls))(*book_arguments(name), scale=3.0)
    np.testing.assert_allclose(remat.apply(variables, x), 3.0 * plain.apply(variables, x), **CLOSE)


# --- NNX -----------------------------------------------------------------------------------


def nnx_model(name, cls=None, dropout=0.0, **options):
    cls = cls or getattr(ja_nnx, name)
    return cls(*book_arguments(name, dropout), **options, rngs=nnx.Rngs(params=0, dropout=1))


@pytest.mark.parametrize("name", EVERY_CLASS)
def test_nnx_remat_of_every_class_equals_the_module(name):
    model, x = nnx_model(name), inputs()

    def plain(m, x):
        return m(x)

    rematted = nnx.remat(plain)
    np.testing.assert_allclose(rematted(model, x), model(x), **CLOSE)
    grads = [nnx.grad(lambda m, f=f: jnp.sum(f(m, x) ** 2))(model) for f in (rematted, plain)]
    assert_trees_close(nnx.to_pure_dict(grads[0]), nnx.to_pure_dict(grads[1]), **CLOSE)


@pytest.mark.slow
def test_nnx_jit_and_vmap_over_a_batch_axis():
    model, x = nnx_model("MultiHeadAttention", dropout=0.5), inputs()
    eval_step = nnx.jit(lambda m, x: m(x, deterministic=True))
    np.testing.assert_allclose(eval_step(model, x), model(x, deterministic=True), **CLOSE)
    # vmap over the batch (module broadcast), one explicit dropout key per slice
    keys = jax.random.split(jax.random.key(2), B)
    per_slice = nnx.vmap(
        lambda m, x, key: m(x, deterministic=False, rngs=key), in_axes=(None, 0, 0)
    )
    want = jnp.stack([model(x[b], deterministic=False, rngs=keys[b]) for b in range(B)])
    np.testing.assert_allclose(per_slice(model, x, keys), want, **CLOSE)


def nnx_scaled(cls):
    """A user's NNX subclass: one more attribute, ``__call__`` overridden calling ``super``."""

    class Scaled(cls):
        def __init__(self, *args, scale: float = 2.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = scale

        def __call__(self, x, *args, **kwargs):
            return self.scale * super().__call__(x, *args, **kwargs)

    return Scaled


@pytest.mark.parametrize("name", EVERY_CLASS)
def test_nnx_subclass_of_every_class(name):
    model, x = nnx_model(name), inputs()
    scaled = nnx_model(name, nnx_scaled(getattr(ja_nnx, name)), scale=3.0)
    np.testing.assert_allclose(scaled(x), 3.0 * model(x), **CLOSE)
    # the subclass keeps the parameter tree, the Linen twin and interop
    params = ja_nnx.linen_params_from_nnx(scaled)
    assert_trees_close(params, ja_nnx.linen_params_from_nnx(model), rtol=0, atol=0)
    linen_out = scaled.linen_module().apply({"params": params}, x)
    np.testing.assert_allclose(3.0 * linen_out, scaled(x), **CLOSE)
    np.testing.assert_allclose(nnx.remat(lambda m, x: m(x))(scaled, x), scaled(x), **CLOSE)


# --- signatures written out, the same in both APIs ----------------------------------------


@pytest.mark.parametrize("name", CLASSES)
def test_nnx_signatures_are_written_out_and_match_linen(name):
    """The NNX constructor takes the Linen fields (same order, kinds and defaults) plus
    ``rngs``; ``__call__`` has named parameters only. Nothing is generated at import."""
    nnx_cls, linen_cls = getattr(ja_nnx, name), getattr(ja_linen, name)
    assert "__signature__" not in vars(nnx_cls.__init__)
    init = list(inspect.signature(nnx_cls.__init__).parameters.values())
    linen_fields = inspect.signature(linen_cls).parameters.values()
    fields = [p for p in linen_fields if p.name not in ("parent", "name")]
    assert [(p.name, p.kind, p.default) for p in init[1:-1]] == [
        (p.name, p.kind, p.default) for p in fields
    ]
    assert init[-1].name == "rngs" and init[-1].kind is inspect.Parameter.KEYWORD_ONLY
    for cls in (nnx_cls, linen_cls):
        kinds = {p.kind for p in inspect.signature(cls.__call__).parameters.values()}
        assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


# --- NNX decoding in the compute dtype -----------------------------------------------------


BF16_CLOSE = {"rtol": 2e-2, "atol": 2e-2}  # a few bfloat16 roundings (eps 2**-8) apart


@pytest.mark.parametrize("cache_dtype", [None, pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_nnx_bfloat16_decode_allocates_in_the_compute_dtype(cache_dtype):
    model = nnx_model("MultiHeadAttention", dtype=jnp.bfloat16, decode=True)
    x = inputs(dtype=jnp.bfloat16)
    full = model(x, decode=False)
    if cache_dtype is None:
        model.init_cache(B)  # the compute dtype
        assert model.cached_key.dtype == model.cached_value.dtype == jnp.bfloat16
        model.init_cache((B, T, D_IN))  # Flax's form, its dtype left out: the same
        assert model.cached_key.dtype == jnp.bfloat16
    else:
        model.init_cache((B, T, D_IN), cache_dtype)  # a float32 cache for bfloat16 compute
        assert model.cached_key.dtype == jnp.float32
    steps = [model(x[:, :2])] + [model(x[:, t : t + 1]) for t in range(2, T)]
    assert all(step.dtype == jnp.bfloat16 for step in steps)
    got = jnp.concatenate(steps, axis=1).astype(jnp.float32)
    np.testing.assert_allclose(got, full.astype(jnp.float32), **BF16_CLOSE)


def test_linen_bfloat16_decode_cache_is_in_the_compute_dtype():
    module = ja.MultiHeadAttention(*book_arguments("MultiHeadAttention"), dtype=jnp.bfloat16)
    decoder = module.clone(decode=True)
    x = inputs(dtype=jnp.bfloat16)
    variables = decoder.init(jax.random.key(0), x)
    assert variables["cache"]["cached_key"].dtype == jnp.bfloat16
    step, _ = decoder.apply(variables, x, mutable=["cache"])
    np.testing.assert_allclose(
        step.astype(jnp.float32),
        module.apply({"params": variables["params"]}, x).astype(jnp.float32),
        **BF16_CLOSE,
    )


# --- masks as Flax writes them; complex inputs -------------------------------------------


def mha_oracle(params, x, mask):
    """MultiHeadAttention from its params and the reference kernel."""

    def dense(h, p):
        return h @ p["kernel"] + p["bias"][None, None]

    q, k, v = (split_heads(dense(x, params[n]), HEADS) for n in ("W_query", "W_key", "W_value"))
    context = reference.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    return dense(merge_heads(context), params["out_proj"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32])
def test_float_and_int_masks_mean_nonzero_may_attend(dtype):
    module, x = ja.MultiHeadAttention(*book_arguments("MultiHeadAttention")), inputs()
    keep = ja.make_padding_mask(None, jnp.array([T, 2]), T, T)  # [B, 1, T, S] bool
    flax_mask = jnp.where(keep, jnp.asarray(3, dtype), jnp.asarray(0, dtype))  # nonzero
    params = module.init(jax.random.key(0), x)["params"]
    want = mha_oracle(params, x, keep)
    np.testing.assert_allclose(module.apply({"params": params}, x, mask=flax_mask), want, **CLOSE)
    model = ja_nnx.nnx_from_linen_params(nnx_model("MultiHeadAttention"), params)
    np.testing.assert_allclose(model(x, mask=flax_mask), want, **CLOSE)


def test_complex_inputs_are_refused_naming_the_argument():
    module = ja.MultiHeadAttention(*book_arguments("MultiHeadAttention"), is_causal=False)
    model = nnx_model("MultiHeadAttention", is_causal=False)
    x = inputs()
    variables = module.init(jax.random.key(0), x)
    complex_x = x.astype(jnp.complex64)
    cases = [
        ((complex_x,), {}, r"x must hold real numbers, got dtype complex64"),
        ((x, complex_x), {}, r"x_kv must have x's dtype float32, got complex64"),
        ((x,), {"mask": jnp.ones((T, T), jnp.complex64)}, r"mask must be a bool array"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(TypeError, match=rf"MultiHeadAttention\.apply: {match}"):
            module.apply(variables, *args, **kwargs)
        with pytest.raises(TypeError, match=rf"MultiHeadAttention\.__call__: {match}"):
            model(*args, **kwargs)
    # flax_attention_fn, for Flax's own modules (which accept complex inputs), refuses them too
    q = jnp.ones((B, T, HEADS, D_OUT // HEADS), jnp.complex64)
    with pytest.raises(TypeError, match="query must have a floating dtype, got complex64"):
        ja.flax_attention_fn(q, q, q)
