"""Property tests: every implementation equals attention in numpy float64 on random calls.

Hypothesis draws the structure of a call — shape (from a small set, so kernels compile
once), dtype, mask (with all-false rows and whole all-false sequences), lengths
(0 included), window, bias (with ``-inf``), scale, causal, dropout, batched or not —
and a seed for the values. Each implementation that serves the call must agree with
``attention_float64`` (numpy, independent of ``jax_attn.reference``), return no NaN, and
give exact zeros on rows with nothing to attend. The allowed error (``allowed_error`` in
``tests/conftest.py``) is float32's 1e-5 x max(1, max|v|), or in half precision
``HALF_ERROR_RATIO`` x the error the reference itself makes in that dtype on the call.

Default profile (the README's test command): tens of random examples (``FAST_EXAMPLES``,
new ones every run) over two fixed shapes; another profile (``HYPOTHESIS_PROFILE``) sets its
own.
Thorough (``-m slow``, CI's slow step): the ``thorough`` profile's examples over more
shapes (``THOROUGH_SHAPES``).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_attn import dispatch
from jax_attn.validation import check_attention_args

IMPLEMENTATIONS = dispatch.available_implementations()
DTYPES = ("float32", "bfloat16", "float16")
QUICK_SHAPES = ((2, 3, 4, 2, 1, 4), (1, 4, 4, 2, 2, 8))  # (B, T, S, N, K, H)
# one key, T < S, T > S, GQA, an odd batch: few and small, so each compiles once
THOROUGH_SHAPES = (
    (1, 1, 1, 1, 1, 4),
    (2, 4, 4, 2, 1, 8),
    (2, 3, 5, 4, 2, 8),
    (1, 6, 4, 2, 2, 4),
    (3, 5, 7, 3, 1, 16),
)
# The shapes come from QUICK_SHAPES, so after the first few examples most programs are
# already compiled: the first example costs ~2 s CPU, later ones ~0.2-0.3 s (measured: 6
# examples 9.8 s, 30 examples 16 s, load ~2.5 on 2 cores). The float64 test jits each
# implementation with the call closed over (a compile per example, ~0.8 s): it draws few.
# Under the default profile the fast tests draw this many; other profiles their own.
_DEFAULT_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default") == "default"
FAST_EXAMPLES = 30 if _DEFAULT_PROFILE else settings.default.max_examples
FLOAT64_EXAMPLES = 2 if _DEFAULT_PROFILE else 4


@st.composite
def attention_calls(draw, shapes, dtypes=DTYPES):
    """Keyword arguments of a valid ``dot_product_attention`` call."""
    B, T, S, N, K, H = draw(st.sampled_from(shapes))
    dtype = jnp.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    H_v = draw(st.sampled_from([H, max(1, H // 2)]))
    size = draw(st.sampled_from([0.3, 1.0, 4.0]))

    def normal(shape, scale=1.0):
        return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)

    call = dict(
        query=normal((B, T, N, H), size),
        key=normal((B, S, K, H), size),
        value=normal((B, S, K, H_v)),
    )
    mask_kind = draw(st.sampled_from(["none", "random", "empty row", "empty sequence"]))
    if mask_kind != "none":
        shape = draw(st.sampled_from([(B, N, T, S), (B, 1, T, S), (T, S), (1, N, 1, S)]))
        mask = rng.random(shape) < draw(st.sampled_from([0.2, 0.6, 0.9]))
        if mask_kind == "empty row":
            mask[..., draw(st.integers(0, shape[-2] - 1)), :] = False
        if mask_kind == "empty sequence":
            mask[..., draw(st.integers(0, shape[-1] - 1))] = False
            if shape[0] == B:
                mask[draw(st.integers(0, B - 1))] = False
        call["mask"] = jnp.asarray(mask)
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(B, N, T, S), (N, T, S), (T, S), (1, 1, 1, S)]))
        bias = rng.standard_normal(shape).astype(np.float32) * draw(st.sampled_from([0.5, 5.0]))
        bias[rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -np.inf
        call["bias"] = jnp.asarray(bias)
    if draw(st.booleans()):
        call["is_causal"] = True
    scale = draw(st.sampled_from([None, 0.05, 0.7, 2.0]))
    if scale is not None:
        call["scale"] = scale
    if draw(st.booleans()):
        call["query_seq_lengths"] = jnp.asarray(
            draw(st.lists(st.integers(0, T), min_size=B, max_size=B)), jnp.int32
        )
    if draw(st.booleans()):
        call["key_value_seq_lengths"] = jnp.asarray(
            draw(st.lists(st.integers(0, S), min_size=B, max_size=B)), jnp.int32
        )
    window = draw(st.sampled_from([None, 0, 1, (0, 2), (S, 0)]))
    if window is not None:
        call["local_window_size"] = window
    rate = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    if rate:
        call["dropout_rate"] = rate
        call["dropout_rng"] = jax.random.key(draw(st.integers(0, 2**31 - 1)))
    if B == 1 and not any("lengths" in name for name in call) and draw(st.booleans()):
        call = _unbatched(call)
    return call


def _unbatched(call):
    """The call with ``B == 1`` dropped from the inputs and from 4-d masks and biases."""
    call = dict(call)
    for name in ("query", "key", "value"):
        call[name] = call[name][0]
    for name in ("mask", "bias"):
        if name in call and call[name].ndim == 4:
            call[name] = call[name][0]
    return call


def _split(call):
    q, k, v = call["query"], call["key"], call["value"]
    return (q, k, v), {name: x for name, x in call.items() if name not in ("query", "key", "value")}


def check_against_float64(call, attention_float64, empty_rows_float64, allowed_error):
    (q, k, v), args = _split(call)
    expected = attention_float64(q, k, v, **args)
    empty = empty_rows_float64(call)
    tolerance = allowed_error(q, k, v, expected, **args)
    meta = check_attention_args(q, k, v, **args)
    served = []
    for name in IMPLEMENTATIONS:
        if dispatch.unsupported_reason(name, meta) is not None:
            continue
        served.append(name)
        out = dispatch.dot_product_attention(q, k, v, implementation=name, **args)
        assert out.dtype == q.dtype and out.shape == expected.shape
        got = np.asarray(out, np.float64)
        assert not np.isnan(got).any(), f"{name} returned NaN"
        np.testing.assert_array_equal(got[empty], 0.0, err_msg=f"{name}: empty rows not zero")
        error = float(np.abs(got - expected).max(initial=0.0))
        assert error <= tolerance, f"{name}: error {error:.3e} > {tolerance:.3e}"
    assert "reference" in served


@settings(max_examples=FAST_EXAMPLES)
@given(call=attention_calls(QUICK_SHAPES))
def test_every_implementation_matches_float64(
    attention_float64, empty_rows_float64, allowed_error, call
):
    check_against_float64(call, attention_float64, empty_rows_float64, allowed_error)


@settings(max_examples=FLOAT64_EXAMPLES)
@given(call=attention_calls(QUICK_SHAPES[:1], dtypes=("float32",)))
def test_float64_calls_match_numpy_float64(attention_float64, call):
    # the same call in float64, through the dispatcher and every implementation serving it
    with jax.enable_x64(True):
        (q, k, v), args = _split(call)
        q, k, v = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
        expected = attention_float64(q, k, v, **args)
        meta = check_attention_args(q, k, v, **args)
        names = [n for n in IMPLEMENTATIONS if dispatch.unsupported_reason(n, meta) is None]

        # under jax.jit (the other arguments closed over, concrete as in an eager call): one
        # program per implementation; op by op, x64 compiles every op anew (~2x the time)
        def attend(q, k, v, implementation=None):
            return dispatch.dot_product_attention(q, k, v, implementation=implementation, **args)

        outputs = {
            name: jax.jit(attend, static_argnames="implementation")(q, k, v, implementation=name)
            for name in [*names, None]
        }
        outputs["default"] = outputs.pop(None)
    for name, out in outputs.items():
        assert out.dtype == jnp.float64, name
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-12, rtol=0, err_msg=name)


@pytest.mark.slow
@settings(settings.get_profile("thorough"))
@given(call=attention_calls(THOROUGH_SHAPES))
def test_thorough_every_shape_matches_float64(
    attention_float64, empty_rows_float64, allowed_error, call
):
    check_against_float64(call, attention_float64, empty_rows_float64, allowed_error)
