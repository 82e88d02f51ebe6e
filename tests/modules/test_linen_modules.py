"""The book's Flax modules (jax_attn.linen_modules): each equals the einsum reference applied to its
own projections, and keeps the properties a user relies on (batching, dropout RNG,
``deterministic``, causality, jit) and the argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import reference

D_IN, D_OUT, CONTEXT, HEADS = 6, 4, 8, 2
B, T = 2, 5
NAMES = [
    "SelfAttentionV1",
    "SelfAttentionV2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
]
DROPOUT_NAMES = ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention"]
CLOSE = {"rtol": 1e-5, "atol": 1e-6}
SLOW = pytest.mark.slow


def cases(fast, every):
    """``every`` case as a param; those not in ``fast`` marked slow (CI's slow step runs
    them). The fast set keeps one case per code path, so the default run compiles few
    programs."""
    return [c if c in fast else pytest.param(*c, marks=SLOW) for c in every]


def names(fast, every=NAMES):
    return [n if n in fast else pytest.param(n, marks=SLOW) for n in every]


@pytest.fixture(autouse=True)
def float32_matmuls():
    """True float32 matmuls: GPUs default to TF32, which the 1e-5 tolerances do not allow."""
    with jax.default_matmul_precision("float32"):
        yield


def make(name, dropout=0.0, qkv_bias=False, **options):
    module = getattr(ja, name)
    if name == "SelfAttentionV1":
        return module(D_IN, D_OUT)
    if name == "SelfAttentionV2":
        return module(D_IN, D_OUT, qkv_bias)
    if name == "CausalAttention":
        return module(D_IN, D_OUT, CONTEXT, dropout, qkv_bias, **options)
    return module(D_IN, D_OUT, CONTEXT, dropout, HEADS, qkv_bias, **options)


def inputs(shape=(B, T, D_IN), seed=0):
    """Standard normal float32 drawn with numpy: no per-shape PRNG compile."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def init(module, seed=1):
    return module.init(jax.random.key(seed), inputs((1, T, D_IN)))["params"]


def project(x, params):
    """``x @ kernel + bias`` for a Dense, ``x @ W`` for a bare matrix."""
    if not isinstance(params, dict):
        return x @ params
    out = x @ params["kernel"]
    if "bias" in params:
        out = out + jnp.expand_dims(params["bias"], tuple(range(out.ndim - 1)))
    return out


def single_head(x, params, is_causal):
    """[B, T, d_out] through the reference with one head."""
    q, k, v = (project(x, params[n])[:, :, None, :] for n in ("W_query", "W_key", "W_value"))
    return reference.dot_product_attention(q, k, v, is_causal=is_causal)[:, :, 0, :]


def expected_output(name, params, x):
    """The module's output rebuilt from its params and the reference, ``x [B, T, d_in]``."""
    if name in ("SelfAttentionV1", "SelfAttentionV2"):
        return single_head(x, params, is_causal=False)
    if name == "CausalAttention":
        return single_head(x, params, is_causal=True)
    if name == "MultiHeadAttentionWrapper":
        heads = [single_head(x, params[f"heads_{i}"], is_causal=True) for i in range(HEADS)]
        return jnp.concatenate(heads, axis=-1)
    head_dim = D_OUT // HEADS
    q, k, v = (
        project(x, params[n]).reshape(B, T, HEADS, head_dim)
        for n in ("W_query", "W_key", "W_value")
    )
    context = reference.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, D_OUT)
    return project(context, params["out_proj"])


def out_width(name):
    return D_OUT * HEADS if name == "MultiHeadAttentionWrapper" else D_OUT


# each class once, qkv_bias both ways; the other (class, qkv_bias) pairs run in the slow set
@pytest.mark.parametrize(
    ("name", "qkv_bias"),
    cases(
        {
            ("SelfAttentionV1", False),
            ("SelfAttentionV2", True),
            ("CausalAttention", False),
            ("MultiHeadAttentionWrapper", True),
            ("MultiHeadAttention", True),
        },
        [(name, qkv_bias) for name in NAMES for qkv_bias in (False, True)],
    ),
)
def test_module_equals_reference_on_its_projections(name, qkv_bias):
    module = make(name, qkv_bias=qkv_bias)
    params = init(module)
    x = inputs()
    out = module.apply({"params": params}, x)
    assert out.shape == (B, T, out_width(name)) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_output(name, params, x), **CLOSE)


# each implementation once (the field is passed the same way by every class)
@pytest.mark.parametrize(
    ("name", "implementation"),
    cases(
        {("CausalAttention", "reference"), ("MultiHeadAttention", "xla")},
        [(name, impl) for name in DROPOUT_NAMES for impl in ("reference", "xla")],
    ),
)
def test_named_implementation_equals_reference(name, implementation):
    module = make(name, implementation=implementation)
    params = init(module)
    x = inputs()
    np.testing.assert_allclose(
        module.apply({"params": params}, x), expected_output(name, params, x), **CLOSE
    )


@pytest.mark.parametrize("name", names({"SelfAttentionV1", "MultiHeadAttention"}))
def test_unbatched_equals_batched_and_vmap(name):
    module = make(name)
    params = init(module)
    x = inputs()
    batched = module.apply({"params": params}, x)
    np.testing.assert_allclose(module.apply({"params": params}, x[0]), batched[0], **CLOSE)
    vmapped = jax.vmap(lambda xi: module.apply({"params": params}, xi))(x)
    np.testing.assert_allclose(vmapped, batched, **CLOSE)


@pytest.mark.parametrize("name", names({"MultiHeadAttention"}))
def test_jit_equals_no_jit(name):
    module = make(name, dropout=0.5 if name in DROPOUT_NAMES else 0.0)
    variables = {"params": init(module)}
    rngs = {"dropout": jax.random.key(3)}
    x = inputs()
    jitted = jax.jit(module.apply, static_argnames="deterministic")
    for deterministic in (True, False):
        np.testing.assert_allclose(
            jitted(variables, x, deterministic=deterministic, rngs=rngs),
            module.apply(variables, x, deterministic=deterministic, rngs=rngs),
            **CLOSE,
        )


# --- dropout and `deterministic` -----------------------------------------------------------


@pytest.mark.parametrize("name", names({"CausalAttention", "MultiHeadAttention"}, DROPOUT_NAMES))
def test_dropout_same_key_same_output_different_key_different(name):
    module = make(name, dropout=0.5)
    variables = {"params": init(module)}
    x = inputs()

    def train(seed):
        return module.apply(
            variables, x, deterministic=False, rngs={"dropout": jax.random.key(seed)}
        )

    evaluation = module.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    assert not np.allclose(train(0), evaluation)
    assert np.all(np.isfinite(train(0)))


@pytest.mark.parametrize("name", names({"MultiHeadAttention"}, DROPOUT_NAMES))
def test_deterministic_ignores_the_rng(name):
    module = make(name, dropout=0.5)
    variables = {"params": init(module)}
    x = inputs()
    without_rng = module.apply(variables, x, deterministic=True)
    for seed in (0, 1):
        with_rng = module.apply(
            variables, x, deterministic=True, rngs={"dropout": jax.random.key(seed)}
        )
        np.testing.assert_array_equal(with_rng, without_rng)
    np.testing.assert_allclose(without_rng, expected_output(name, variables["params"], x), **CLOSE)


@pytest.mark.parametrize("name", names({"MultiHeadAttention"}, DROPOUT_NAMES))
def test_call_flag_wins_over_constructor_flag(name):
    x = inputs()
    rngs = {"dropout": jax.random.key(0)}
    evaluation_module = make(name, dropout=0.5, deterministic=True)
    training_module = make(name, dropout=0.5, deterministic=False)
    variables = {"params": init(evaluation_module)}
    no_dropout = expected_output(name, variables["params"], x)
    # constructor alone decides when the call says nothing
    np.testing.assert_allclose(evaluation_module.apply(variables, x), no_dropout, **CLOSE)
    trained = training_module.apply(variables, x, rngs=rngs)
    assert not np.allclose(trained, no_dropout)
    # the call overrides it, both ways
    np.testing.assert_array_equal(
        evaluation_module.apply(variables, x, deterministic=False, rngs=rngs), trained
    )
    np.testing.assert_allclose(
        training_module.apply(variables, x, deterministic=True), no_dropout, **CLOSE
    )


@pytest.mark.parametrize("name", DROPOUT_NAMES)
def test_dropout_without_a_mode_or_an_rng_is_a_clear_error(name):
    module = make(name, dropout=0.5)
    variables = {"params": init(module)}
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(variables, inputs())
    with pytest.raises(ValueError, match=r"dropout=0\.5.*rngs=\{'dropout': key\}"):
        module.apply(variables, inputs(), deterministic=False)
    # dropout=0.0 needs neither
    np.testing.assert_allclose(
        make(name).apply(variables, inputs(), deterministic=False),
        expected_output(name, variables["params"], inputs()),
        **CLOSE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", DROPOUT_NAMES)
def test_dropout_preserves_the_mean_over_many_keys(name):
    module = make(name, dropout=0.3)
    variables = {"params": init(module)}
    x = inputs()
    keys = jax.random.split(jax.random.key(11), 2000)

    @jax.jit
    def samples(keys):
        return jax.vmap(
            lambda k: module.apply(variables, x, deterministic=False, rngs={"dropout": k})
        )(keys)

    draws = np.asarray(samples(keys), np.float64)
    expected = np.asarray(module.apply(variables, x, deterministic=True), np.float64)
    standard_error = draws.std(axis=0) / np.sqrt(len(keys))
    assert np.all(standard_error > 0)  # every output actually varies with the key
    z = np.abs(draws.mean(axis=0) - expected) / standard_error
    assert z.max() < 5.0, z.max()


# --- causality -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "deterministic"),
    cases(
        # the wrapper (slow set) is a list of CausalAttention heads
        {("MultiHeadAttention", True), ("CausalAttention", False)},
        [(name, d) for name in DROPOUT_NAMES for d in (True, False)],
    ),
)
def test_no_future_leakage(name, deterministic):
    module = make(name, dropout=0.5)
    variables = {"params": init(module)}
    rngs = {"dropout": jax.random.key(2)}

    def forward(x):
        return module.apply(variables, x, deterministic=deterministic, rngs=rngs)

    # [T_out, width, T_in, d_in]
    jacobian = np.asarray(jax.jit(jax.jacrev(forward))(inputs((T, D_IN))))
    for t in range(T):
        assert np.all(jacobian[t, :, t + 1 :, :] == 0.0), f"output {t} sees the future"
    # the past and present do flow in (with dropout, some of them may be dropped)
    if deterministic:
        for t in range(T):
            assert np.all(np.any(jacobian[t, :, : t + 1, :] != 0, axis=(0, 2))), t
    else:
        assert np.any(jacobian != 0)


# --- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_input_width_and_rank_are_checked(name):
    module = make(name)
    variables = {"params": init(module)}
    with pytest.raises(ValueError, match=rf"d_in={D_IN}.*\[{B}, {T}, {D_IN + 1}\]"):
        module.apply(variables, inputs((B, T, D_IN + 1)))
    with pytest.raises(ValueError, match=r"x must have shape .*\[1, 2, 5, 6\]"):
        module.apply(variables, inputs((1, 2, T, D_IN)))


@pytest.mark.parametrize("name", names({"CausalAttention", "MultiHeadAttention"}, DROPOUT_NAMES))
def test_more_tokens_than_context_length_is_an_error(name):
    module = make(name)
    variables = {"params": init(module)}
    with pytest.raises(ValueError, match=rf"{CONTEXT + 1} tokens.*context_length={CONTEXT}"):
        module.apply(variables, inputs((B, CONTEXT + 1, D_IN)))
    full = jax.eval_shape(lambda x: module.apply(variables, x), inputs((B, CONTEXT, D_IN)))
    assert full.shape[:2] == (B, CONTEXT)


def test_d_out_not_divisible_by_num_heads_is_an_error():
    with pytest.raises(ValueError, match=r"d_out=5.*num_heads=2"):
        ja.MultiHeadAttention(D_IN, 5, CONTEXT, 0.0, 2)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", DROPOUT_NAMES)
def test_dropout_outside_unit_interval_is_an_error(name, rate):
    with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got {rate}"):
        make(name, dropout=rate)


@pytest.mark.parametrize("name", DROPOUT_NAMES)
def test_non_numeric_dropout_and_non_int_sizes_are_type_errors(name):
    with pytest.raises(TypeError, match="dropout"):
        make(name, dropout="0.1")
    with pytest.raises(TypeError, match="context_length"):
        getattr(ja, name)(D_IN, D_OUT, 8.0, 0.0, *([HEADS] if name != "CausalAttention" else []))


@pytest.mark.parametrize("name", NAMES)
def test_non_positive_sizes_are_errors(name):
    with pytest.raises(ValueError, match="d_in must be > 0, got 0"):
        getattr(ja, name)(
            0,
            D_OUT,
            *([CONTEXT, 0.0] if name in DROPOUT_NAMES else []),
            *([HEADS] if name in DROPOUT_NAMES[1:] else []),
        )


# --- parameters --------------------------------------------------------------------------


def count_parameters(module, x_shape):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(x_shape))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_gpt2_small_multi_head_attention_has_the_books_parameter_count():
    # Exercise 3.3: 2,360,064 parameters.
    module = ja.MultiHeadAttention(768, 768, 1024, 0.0, 12)
    assert count_parameters(module, (1, 768)) == 2_360_064


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parameter_counts_follow_the_layers(qkv_bias):
    linear = D_IN * D_OUT + (D_OUT if qkv_bias else 0)
    counts = {name: count_parameters(make(name, qkv_bias=qkv_bias), (1, D_IN)) for name in NAMES}
    assert counts["SelfAttentionV1"] == 3 * D_IN * D_OUT
    assert counts["SelfAttentionV2"] == counts["CausalAttention"] == 3 * linear
    assert counts["MultiHeadAttentionWrapper"] == HEADS * 3 * linear
    assert counts["MultiHeadAttention"] == 3 * linear + D_OUT * D_OUT + D_OUT
