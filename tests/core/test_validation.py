"""Every user mistake is refused in Python with a ValueError/TypeError naming the argument.

The mistakes come from the catalogue in ``jax_attn.apps.fuzz`` (``MISTAKES`` for the attention
entry points, ``module_mistakes()`` for masks and Flax modules): the same catalogue makes
``docs/errors.md`` and the bad-input cases of ``jax-attn check --fuzz``.
"""

import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.apps import fuzz
from jax_attn.validation import FUNCTION_ARGUMENTS, AttentionCall, check_attention_args

ERRORS_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "errors.md"
CALL = fuzz.base_call()
SMALL = (2, 3, 4, 2, 1, 4)  # (B, T, S, N, K, H) as in test_numerics: compiled ops are reused
ENTRIES = ["dot_product_attention", "reference", "dot_product_attention_weights"]
CASES = [
    pytest.param(mistake, entry, id=f"{entry}-{mistake.description}")
    for mistake in fuzz.MISTAKES
    for entry in ENTRIES
    if entry != "dot_product_attention_weights" or mistake.weights_too
]


def test_catalogue_covers_every_argument():
    arguments = {mistake.argument for mistake in fuzz.MISTAKES}
    assert arguments == set(inspect.signature(dispatch.dot_product_attention).parameters)


@pytest.mark.parametrize("mistake, entry", CASES)
def test_mistake_raises_clear_error(mistake, entry):
    error = fuzz.run_mistake(mistake, CALL, entry)
    assert isinstance(error, mistake.error), f"got {type(error).__name__}: {error}"
    assert mistake.argument in str(error)


@pytest.mark.parametrize(
    "entry, argument, description, expected, make",
    [pytest.param(*case, id=f"{case[0]}-{case[2]}") for case in fuzz.module_mistakes()],
)
def test_mask_and_module_mistakes_raise_clear_errors(entry, argument, description, expected, make):
    with pytest.raises(expected) as info:
        make()
    assert argument in str(info.value)


# bfloat16 fast, float16 slow: the same checks, another half dtype
@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
def test_mistakes_refused_in_half_precision_too(dtype):
    call = fuzz.base_call(dtype)
    for mistake in fuzz.MISTAKES:
        assert fuzz.is_clear(fuzz.run_mistake(mistake, call), mistake), mistake.description


def test_mistakes_inside_jit_raise_the_same_errors():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    with pytest.raises(ValueError, match="key"):
        jax.jit(lambda q, k, v: ja.dot_product_attention(q, k[..., :4], v))(q, k, v)
    with pytest.raises(ValueError, match="mask"):
        jax.jit(lambda q, m: ja.dot_product_attention(q, k, v, mask=m))(q, jnp.ones((3, 5), bool))
    with pytest.raises(TypeError, match="dropout_rate"):
        jax.grad(
            lambda p: ja.dot_product_attention(
                q, k, v, dropout_rate=p, dropout_rng=jax.random.key(0)
            ).sum()
        )(0.1)


def test_traced_lengths_pass_validation_under_jit():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    lengths = jnp.asarray([5, 2])
    jitted = jax.jit(lambda n: ja.dot_product_attention(q, k, v, key_value_seq_lengths=n))
    expected = ja.reference.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(jitted(lengths), expected, atol=1e-6)


def test_concrete_scalar_arrays_are_accepted_like_python_numbers():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    rng = jax.random.key(1)
    expected = ja.reference.dot_product_attention(
        q, k, v, scale=0.5, is_causal=True, dropout_rate=0.25, dropout_rng=rng
    )
    got = ja.reference.dot_product_attention(
        q,
        k,
        v,
        scale=jnp.float32(0.5),
        is_causal=np.bool_(True),
        dropout_rate=np.float32(0.25),
        dropout_rng=rng,
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_check_attention_args_summary_is_compatible():
    q, k, v = CALL["query"], CALL["key"], CALL["value"]
    call = check_attention_args(q, k, v, is_causal=True, local_window_size=2)
    assert isinstance(call, AttentionCall)
    assert (call.B, call.T, call.S, call.N, call.K, call.H, call.H_v, call.G) == (
        2,
        4,
        5,
        4,
        2,
        8,
        8,
        2,
    )
    assert call.window == (2, 2) and call.is_causal and call.batched
    assert call.scale == pytest.approx(8**-0.5)
    weights_only = check_attention_args(q, k)  # no value: an attention-weights call
    assert weights_only.H_v == weights_only.H
    unbatched = check_attention_args(q[0], k[0], v[0])
    assert not unbatched.batched and unbatched.B == 1


def test_error_table_is_up_to_date():
    generated = fuzz.error_table()
    assert ERRORS_MD.exists(), "run: python -m jax_attn.apps.fuzz --error-table docs/errors.md"
    assert ERRORS_MD.read_text() == generated, (
        "docs/errors.md is stale: python -m jax_attn.apps.fuzz --error-table docs/errors.md"
    )


def test_fuzz_small_run_agrees_and_counts_add_up(capsys):
    report = fuzz.run_fuzz(6, seed=3, bad_fraction=0.5, shapes=[SMALL], dtypes=["float32"])
    assert report.ok, report.failures
    assert report.valid + report.bad_inputs == report.cases == 6
    assert report.agreed == report.comparisons > 0
    assert report.rejected_clearly == report.bad_inputs > 0
    assert fuzz.main(["--fuzz", "2", "--seed", "5", "--bad-fraction", "1"]) == 0
    assert "NaNs seen" in capsys.readouterr().out


def test_fuzz_reports_a_wrong_implementation():
    from jax_attn import dispatch

    wrong = dispatch.Implementation(
        name="off_by_one",
        fn=lambda q, k, v, **kwargs: jnp.ones((*q.shape[:-1], v.shape[-1]), q.dtype),
        unsupported=lambda call, platform: None,
        # it takes every case the fuzz draws (score options fold into a score_fn)
        functions=frozenset(FUNCTION_ARGUMENTS),
    )
    dispatch.register_implementation(wrong)
    try:
        report = fuzz.run_fuzz(
            3,
            seed=0,
            bad_fraction=0.0,
            implementations=["off_by_one"],
            shapes=[SMALL],
            dtypes=["float32"],
        )
    finally:
        dispatch._REGISTRY.pop("off_by_one")
    assert not report.ok and report.disagreed == 3
