"""The shape annotations (jax_attn.shapes) agree with what the functions take and return.

Every annotated public function is called on valid inputs through a jaxtyping check:
each argument and the result must match its annotation, with one binding of the shape
letters per call (q's ``T`` is the output's ``T``). jaxtyping is a dev extra; the
library never imports it at run time.
"""

import ast
import functools
import inspect
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jaxtyping = pytest.importorskip("jaxtyping")

from flax import nnx  # noqa: E402
from processes import run_python  # noqa: E402

from jax_attn import dispatch, functional, masks, reference  # noqa: E402
from jax_attn import nnx_modules as ja_nnx  # noqa: E402
from jax_attn.shapes import resolve_hints  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[2] / "jax_attn"


def _array_types(hint):
    """The jaxtyping array types in ``hint`` (a type or a union with None)."""
    members = typing.get_args(hint) if typing.get_args(hint) else (hint,)
    return [m for m in members if isinstance(m, type) and issubclass(m, jaxtyping.AbstractArray)]


def shape_checked(fn):
    """``fn`` with its arguments and result checked against its jaxtyping annotations."""
    hints = resolve_hints(fn)
    signature = inspect.signature(fn)

    def check(name, value):
        hint = hints.get(name)
        if not _array_types(hint) or value is None and type(None) in typing.get_args(hint):
            return
        if not isinstance(value, hint):
            shape = getattr(value, "shape", None)
            raise TypeError(f"{fn.__name__}: {name} = {type(value).__name__}{shape} is not {hint}")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jaxtyping.jaxtyped("context"):
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                check(name, value)
            out = fn(*args, **kwargs)
            check("return", out)
        return out

    return wrapper


B, T, S, N, K, H, D = 2, 3, 5, 4, 2, 8, 6
_rng = np.random.default_rng(0)


def _normal(*shape):
    """Standard normal values drawn with numpy (no per-shape PRNG compile)."""
    return jnp.asarray(_rng.standard_normal(shape).astype(np.float32))


x = _normal(T, D)
q = _normal(B, T, N, H)
k = _normal(B, S, K, H)
v = _normal(B, S, K, 2 * H)
_kernel = _normal(D, D)
params = {name: {"kernel": _kernel} for name in ("W_query", "W_key", "W_value", "out_proj")}


@functools.cache
def calls():
    """name -> ``(fn, args, kwargs)``: built on first use, not while pytest collects (every
    xdist worker collects; only those that run these tests build them)."""
    return {
        "attention_scores_for_query": (functional.attention_scores_for_query, (x[1], x), {}),
        "normalize_by_sum": (functional.normalize_by_sum, (jnp.ones((T, S)),), {}),
        "naive_softmax": (functional.naive_softmax, (x,), {}),
        "softmax": (functional.softmax, (q,), {}),
        "context_vector": (functional.context_vector, (jnp.ones(T) / T, x), {}),
        "attention_scores": (functional.attention_scores, (x, x[:2]), {}),
        "attention_weights": (functional.attention_weights, (jnp.ones((N, T, S)),), {}),
        "context_vectors": (functional.context_vectors, (jnp.ones((T, 2)) / 2, x[:2]), {}),
        "simplified_self_attention": (functional.simplified_self_attention, (x,), {}),
        "dense": (functional.dense, (q[..., :D], params["W_query"]), {}),
        "scaled_attention_scores": (functional.scaled_attention_scores, (x, x), {}),
        "self_attention": (functional.self_attention, (x, params), {}),
        "causal_weights_by_renormalizing": (
            functional.causal_weights_by_renormalizing,
            (jnp.ones((T, T)),),
            {},
        ),
        "causal_weights_by_masking": (
            functional.causal_weights_by_masking,
            (jnp.ones((T, S)),),
            {},
        ),
        "masked_softmax": (
            functional.masked_softmax,
            (jnp.ones((B, N, T, S)), masks.make_causal_mask(T, S)),
            {},
        ),
        "dropout": (functional.dropout, (jnp.ones((B, N, T, S)), 0.5, jax.random.key(5)), {}),
        "split_heads": (functional.split_heads, (q[..., :D], 2), {}),
        "merge_heads": (functional.merge_heads, (q,), {}),
        "single_head_attention": (
            functional.single_head_attention,
            (x, params),
            {"is_causal": True},
        ),
        "multi_head_attention_stacked": (
            functional.multi_head_attention_stacked,
            (
                x,
                jax.tree.map(
                    lambda a: jnp.stack([a, a]),
                    {n: params[n] for n in ("W_query", "W_key", "W_value")},
                ),
            ),
            {},
        ),
        "multi_head_attention": (functional.multi_head_attention, (x[None], params, 2), {}),
        "dot_product_attention_weights": (
            functional.dot_product_attention_weights,
            (q, k),
            {"mask": masks.make_causal_mask(T, S)},
        ),
        "dot_product_attention_weights[unbatched]": (
            functional.dot_product_attention_weights,
            (q[0], k[0]),
            {"bias": jnp.zeros((T, S))},
        ),
        "dot_product_attention": (dispatch.dot_product_attention, (q, k, v), {"is_causal": True}),
        "dot_product_attention[unbatched]": (
            dispatch.dot_product_attention,
            (q[0], k[0], v[0]),
            {},
        ),
        "reference.dot_product_attention": (reference.dot_product_attention, (q, k, v), {}),
        "nnx.MultiHeadAttention": (
            ja_nnx.MultiHeadAttention.__call__,
            (ja_nnx.MultiHeadAttention(D, 4, T, 0.0, 2, rngs=nnx.Rngs(0)), x),
            {"deterministic": True},
        ),
        "nnx.MultiHeadAttentionWrapper[batched]": (
            ja_nnx.MultiHeadAttentionWrapper.__call__,
            (ja_nnx.MultiHeadAttentionWrapper(D, 4, T, 0.0, 1, rngs=nnx.Rngs(0)), x[None]),
            {"deterministic": True},
        ),
        "make_causal_mask": (masks.make_causal_mask, (T, S), {}),
        "make_sliding_window_mask": (masks.make_sliding_window_mask, (T, 1, S), {}),
        "make_padding_mask": (
            masks.make_padding_mask,
            (jnp.array([1, 3]), jnp.array([5, 2]), T, S),
            {},
        ),
    }


# Every public function of the book's layer (large_negative returns a Python float, no
# array to annotate), then the other annotated entry points.
CALL_NAMES = (
    *(name for name in functional.__all__ if name != "large_negative"),
    "dot_product_attention_weights[unbatched]",
    "dot_product_attention",
    "dot_product_attention[unbatched]",
    "reference.dot_product_attention",
    "nnx.MultiHeadAttention",
    "nnx.MultiHeadAttentionWrapper[batched]",
    "make_causal_mask",
    "make_sliding_window_mask",
    "make_padding_mask",
)


def abstract_call(fn, args, kwargs):
    """``fn(*args, **kwargs)`` traced with ``jax.eval_shape``: arrays abstract, the rest as is
    (shapes are all the check needs, and nothing compiles)."""
    is_array = [isinstance(a, jax.Array) for a in args]
    arrays = [a for a, flag in zip(args, is_array, strict=True) if flag]
    array_kwargs = {n: v for n, v in kwargs.items() if isinstance(v, jax.Array)}
    other_kwargs = {n: v for n, v in kwargs.items() if n not in array_kwargs}

    def call(arrays, array_kwargs):
        remaining = iter(arrays)
        full = [next(remaining) if flag else a for a, flag in zip(args, is_array, strict=True)]
        return fn(*full, **array_kwargs, **other_kwargs)

    return jax.eval_shape(call, arrays, array_kwargs)


def test_every_call_is_named():
    assert tuple(calls()) == CALL_NAMES


@pytest.mark.parametrize("name", CALL_NAMES)
def test_annotations_match_calls(name):
    fn, args, kwargs = calls()[name]
    hints = resolve_hints(fn)
    assert any(_array_types(h) for h in hints.values()), f"{name} has no shape annotations"
    abstract_call(shape_checked(fn), args, kwargs)


def test_the_check_catches_a_wrong_shape():
    def wrong(q: "Queries") -> "Weights":  # noqa: F821 - resolved from jax_attn.shapes
        return jnp.zeros(q.shape[:-1])

    with pytest.raises(TypeError, match="return"):
        shape_checked(wrong)(q)
    with pytest.raises(TypeError, match="key"):
        shape_checked(dispatch.dot_product_attention)(q, k[:, :, :, :4], v)


@pytest.mark.slow  # a fresh interpreter importing the whole package
def test_the_package_imports_without_jaxtyping():
    code = (
        "import sys; sys.modules['jaxtyping'] = None\n"
        "import jax_attn, jax_attn.nnx_modules\n"
        "import jax_attn.functional, jax_attn.shapes\n"
        "assert not jax_attn.shapes.HAVE_JAXTYPING\n"
        "print('ok')"
    )
    result = run_python(code, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_only_the_shapes_module_imports_jaxtyping():
    """So every module, the apps' too, imports without it as ``jax_attn.shapes`` does."""
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "jaxtyping" for name in names):
                importers.add(str(path.relative_to(PACKAGE)))
    assert importers == {"shapes.py"}
