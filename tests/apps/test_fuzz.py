"""The mistakes catalogue of ``jax_attn.apps.fuzz`` (``MISTAKES`` for the attention entry
points, ``module_mistakes()`` for masks and Flax modules): every mistake is refused in
Python with a ValueError/TypeError naming the argument; the same catalogue makes
``docs/errors.md`` and the bad-input cases of ``jax-attn check --fuzz``, whose small runs
are tested here too.
"""

import inspect
import pathlib

import jax.numpy as jnp
import pytest

from jax_attn import dispatch
from jax_attn.apps import fuzz
from jax_attn.validation import FUNCTION_ARGUMENTS

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
