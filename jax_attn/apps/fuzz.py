"""``jax-attn check --fuzz N``: random cases on this device, every implementation against
the float64 reference, and random user mistakes that must be refused clearly.

A *valid* case draws shapes from a small fixed set (so compiled kernels are reused),
a dtype, masks (including all-false rows and whole all-false sequences), lengths
(including 0), a window, a bias (with ``-inf`` entries), a scale and dropout. Each
implementation that serves the case must agree with :func:`jax_attn.reference`
evaluated in float64 within a dtype-aware tolerance, and never return NaN.

A *bad-input* case takes a valid call and applies one :data:`MISTAKES` entry; the
library must raise ``ValueError``/``TypeError`` whose message names the argument.

``python -m jax_attn.apps.fuzz --error-table [PATH]`` writes the error table
(``docs/errors.md``) by running every mistake, so the table cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import tomllib
from collections.abc import Callable
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn.apps.arguments import add_name_list

_TABLES_FILE = "data/fuzz_cases.toml"

__all__ = [
    "MISTAKES",
    "Mistake",
    "agrees",
    "base_call",
    "empty_rows",
    "error_table",
    "is_clear",
    "load_kernels",
    "module_mistakes",
    "run_mistake",
    "add_fuzz_arguments",
    "build_parser",
    "main",
    "max_error",
    "random_call",
    "reference_float64",
    "run_fuzz",
    "run_kernel_fuzz",
    "tolerance",
]

#: The case tables (``jax_attn/apps/data/fuzz_cases.toml``): shapes, dtypes, windows,
#: probabilities, tolerances and the mistakes.
TABLES = tomllib.loads(resources.files(__package__).joinpath(_TABLES_FILE).read_text())
_RANDOM = TABLES["random"]
_P = _RANDOM["probability"]
# (B, T, S, N, K, H): few and small, so each compiles once and is reused.
SHAPES = tuple(tuple(shape) for shape in _RANDOM["shapes"])
DTYPES = tuple(_RANDOM["dtypes"])
# Largest allowed |implementation - reference64| as a fraction of max|value|.
_TOLERANCE = TABLES["tolerance"]


def load_kernels() -> list[str]:
    """Imports the optional kernel modules (so they register) and returns
    :func:`jax_attn.available_implementations`."""
    import importlib

    from jax_attn import dispatch

    for name in _KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    return dispatch.available_implementations()


_KERNEL_MODULES = ("jax_attn.kernels.chunked", "jax_attn.pallas")


def tolerance(dtype) -> float:
    """Allowed error relative to ``max |value|`` for outputs in ``dtype``."""
    return _TOLERANCE[np.dtype(dtype).name]


def reference_float64(query, key, value, **kwargs) -> np.ndarray:
    """The oracle evaluated in float64 on the given (already rounded) inputs."""
    from jax_attn import reference

    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x, np.float64)) for x in (query, key, value))
        if kwargs.get("bias") is not None:
            kwargs = dict(kwargs, bias=jnp.asarray(np.asarray(kwargs["bias"], np.float64)))
        return np.asarray(reference.dot_product_attention(q, k, v, **kwargs))


def max_error(out, expected, value) -> float:
    """``max |out - expected| / max(1, max |value|)``; ``inf`` if ``out`` has a NaN."""
    out = np.asarray(out, np.float64)
    if np.isnan(out).any():
        return float("inf")
    scale = max(1.0, float(np.abs(np.asarray(value, np.float64)).max(initial=0.0)))
    return float(np.abs(out - expected).max(initial=0.0)) / scale


def empty_rows(call: dict) -> np.ndarray:
    """Bool ``[B, T, N]`` (or ``[T, N]`` unbatched): query rows with no key to attend.

    Computed from the masks alone (``mask``, causal, window, lengths, ``-inf`` bias);
    attention must give these rows exact zeros.
    """
    from jax_attn.masks import build_attention_mask

    query = call["query"]
    batched = query.ndim == 4
    T, N = query.shape[-3], query.shape[-2]
    S = call["key"].shape[-3]
    B = query.shape[0] if batched else 1
    allowed = build_attention_mask(
        T,
        S,
        mask=call.get("mask"),
        is_causal=call.get("is_causal", False),
        query_seq_lengths=call.get("query_seq_lengths"),
        key_value_seq_lengths=call.get("key_value_seq_lengths"),
        local_window_size=call.get("local_window_size"),
    )
    allowed = np.ones((1, 1, T, S), bool) if allowed is None else np.asarray(allowed)
    if call.get("bias") is not None:
        bias = np.asarray(call["bias"], np.float32)
        allowed = allowed & (bias.reshape((1,) * (4 - bias.ndim) + bias.shape) > -np.inf)
    # [B, N, T] -> [B, T, N]
    empty = np.broadcast_to(~allowed.any(axis=-1), (B, N, T)).transpose(0, 2, 1)
    return empty if batched else empty[0]


def agrees(out, expected, value, dtype) -> bool:
    """Whether ``out`` matches the float64 ``expected`` within ``tolerance(dtype)``."""
    return max_error(out, expected, value) <= tolerance(dtype)


# --- random valid calls -------------------------------------------------------------------


def _normal(rng: np.random.Generator, shape, dtype, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def _random_mask(rng: np.random.Generator, B, N, T, S):
    dims = dict(B=B, N=N, T=T, S=S)
    shape = sizes(_RANDOM["mask_shapes"][rng.integers(len(_RANDOM["mask_shapes"]))], dims)
    mask = rng.random(shape) < rng.uniform(*_RANDOM["mask_density"])
    if len(shape) == 4 and rng.random() < _P["mask_empty_row"]:
        mask[..., rng.integers(shape[-2]), :] = False  # an all-false row
    if shape[0] == B and B > 1 and rng.random() < _P["mask_empty_sequence"]:
        mask[rng.integers(B)] = False  # a whole sequence with nothing to attend
    return jnp.asarray(mask)


def _random_bias(rng: np.random.Generator, B, N, T, S):
    dims = dict(B=B, N=N, T=T, S=S)
    shape = sizes(_RANDOM["bias_shapes"][rng.integers(len(_RANDOM["bias_shapes"]))], dims)
    bias = rng.standard_normal(shape).astype(np.float32) * rng.choice(_RANDOM["bias_scales"])
    if rng.random() < _P["bias_minus_inf"]:
        bias[rng.random(shape) < _P["bias_minus_inf_share"]] = -np.inf
    return jnp.asarray(bias)


def random_call(rng: np.random.Generator, shape=None, dtype=None) -> dict:
    """Keyword arguments for one random valid ``dot_product_attention`` call."""
    B, T, S, N, K, H = SHAPES[rng.integers(len(SHAPES))] if shape is None else shape
    dtype = jnp.dtype(DTYPES[rng.integers(len(DTYPES))] if dtype is None else dtype)
    H_v = H if rng.random() < 1.0 - _P["half_value_dim"] else H // 2
    qk_scale = float(rng.choice(_RANDOM["qk_scales"]))
    call = dict(
        query=_normal(rng, (B, T, N, H), dtype, qk_scale),
        key=_normal(rng, (B, S, K, H), dtype, qk_scale),
        value=_normal(rng, (B, S, K, H_v), dtype),
    )
    if rng.random() < _P["mask"]:
        call["mask"] = _random_mask(rng, B, N, T, S)
    if rng.random() < _P["bias"]:
        call["bias"] = _random_bias(rng, B, N, T, S)
    if rng.random() < _P["is_causal"]:
        call["is_causal"] = True
    if rng.random() < _P["scale"]:
        call["scale"] = float(rng.choice(_RANDOM["scales"]))
    if rng.random() < _P["query_seq_lengths"]:
        call["query_seq_lengths"] = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32)
    if rng.random() < _P["key_value_seq_lengths"]:
        call["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, S + 1, B), jnp.int32)
    if rng.random() < _P["local_window_size"]:
        window = _RANDOM["windows"][rng.integers(len(_RANDOM["windows"]))]
        call["local_window_size"] = sizes(window, dict(S=S)) if isinstance(window, list) else window
    if rng.random() < _P["dropout"]:
        call["dropout_rate"] = float(rng.choice(_RANDOM["dropout_rates"]))
        call["dropout_rng"] = jax.random.key(int(rng.integers(2**31)))
    if rng.random() < _P.get("logit_soft_cap", 0.0):
        call["logit_soft_cap"] = float(rng.choice(_RANDOM["soft_caps"]))
    if rng.random() < _P.get("alibi_slopes", 0.0):
        lead = (N,) if rng.random() < 0.5 else (B, N)
        call["alibi_slopes"] = jnp.asarray(rng.uniform(0.0, 1.0, lead), jnp.float32)
    if B == 1 and rng.random() < _P["unbatched"] and not any("lengths" in n for n in call):
        call = _unbatched(call)
    return call


def size(expression, dims: dict) -> int:
    """A size of the tables: an int, or a dimension letter with an optional offset
    (``"N+1"``, ``"S-1"``) looked up in ``dims``."""
    if isinstance(expression, int):
        return expression
    match = re.fullmatch(r"([A-Za-z_]+)([+-]\d+)?", expression)
    if match is None or match.group(1) not in dims:
        raise ValueError(
            f"size must be an int or one of {sorted(dims)} with an optional +/- offset, "
            f"got {expression!r}"
        )
    return dims[match.group(1)] + int(match.group(2) or 0)


def sizes(expressions, dims: dict) -> tuple[int, ...]:
    return tuple(size(e, dims) for e in expressions)


def _unbatched(call: dict) -> dict:
    call = dict(call)
    for name in ("query", "key", "value"):
        call[name] = call[name][0]
    for name in ("mask", "bias"):
        if name in call and call[name].ndim == 4:
            call[name] = call[name][0]
    if "alibi_slopes" in call and call["alibi_slopes"].ndim == 2:  # [1, N] -> [N]
        call["alibi_slopes"] = call["alibi_slopes"][0]
    return call


# --- user mistakes ------------------------------------------------------------------------


def base_call(dtype="float32") -> dict:
    """A small valid batched call: B=2, T=4, S=5, N=4, K=2, H=8."""
    return _plain(random_call(np.random.default_rng(0), (2, 4, 5, 4, 2, 8), dtype))


def _plain(call: dict) -> dict:
    """Only query, key and value of ``call`` (batched)."""
    return {name: call[name] for name in ("query", "key", "value")}


def _traced_scale(call: dict):
    from jax_attn import dispatch

    def attend(scale):
        return dispatch.dot_product_attention(**_plain(call), scale=scale)

    return lambda: jax.jit(attend)(0.5)


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One thing a user can get wrong in ``dot_product_attention`` (a ``[[mistake]]`` of
    the tables).

    ``change(call)`` returns the keyword arguments of the wrong call, built from a
    valid batched ``call``; ``error`` is the exception the library must raise and
    ``argument`` the name its message must contain.
    """

    argument: str
    description: str
    error: type[Exception]
    change: Callable[[dict], dict]
    weights_too: bool = False  # also applies to dot_product_attention_weights(q, k, ...)


_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}
# Mask and score functions the tables name ({ function = NAME }), right and wrong.
FUNCTIONS: dict[str, Callable] = {
    "causal": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
    "causal_copy": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
    "three_indices": lambda b, q_idx, kv_idx: q_idx >= kv_idx,
    "distance": lambda b, h, q_idx, kv_idx: q_idx - kv_idx,
    "positive_score": lambda score, b, h, q_idx, kv_idx: score > 0,
    # the [kernel] table's mask_fns: documents that move with b, stripes leaving every
    # block partial, a window as wide as the head index says
    "documents": lambda b, h, q_idx, kv_idx: (q_idx + 7 * b) // 40 == (kv_idx + 7 * b) // 50,
    "stripes": lambda b, h, q_idx, kv_idx: (q_idx + 2 * kv_idx + b + h) % 5 != 0,
    "head_window": lambda b, h, q_idx, kv_idx: (
        (kv_idx <= q_idx + 3) & (kv_idx + 8 * (h + 1) > q_idx)
    ),
}
_SPECIAL_CALLS = {"traced_scale": _traced_scale}


def _array_op(x, spec: dict, dims: dict):
    """The ``{like = ..., op = ...}`` values of the tables, applied to the array ``x``."""
    op = spec["op"]
    if op == "expand":
        return x[None]
    if op == "index":
        return x[tuple(spec["index"])]
    if op == "double":
        return jnp.concatenate([x, x], spec["axis"])
    if op == "heads":
        return jnp.repeat(x[:, :, :1], size(spec["count"], dims), 2)
    if op == "shorten":
        return jax.lax.slice_in_dim(x, 0, x.shape[spec["axis"]] - 1, axis=spec["axis"])
    if op == "to_list":
        return np.asarray(x, np.float32).tolist()
    if op == "astype":
        return x.astype(spec["dtype"])
    if op == "other_dtype":
        return x.astype(next(d for d in spec["dtypes"] if jnp.dtype(d) != x.dtype))
    raise ValueError(f"op must be one of the ops listed in {_TABLES_FILE}, got {op!r}")


def table_value(spec, dims: dict, call: dict | None = None):
    """A value of the tables (see the head of ``fuzz_cases.toml``) made concrete."""
    if isinstance(spec, list):
        return tuple(spec)
    if not isinstance(spec, dict):
        return spec
    if "like" in spec:
        assert call is not None, f"{spec} needs the call it is like"
        return _array_op(call[spec["like"]], spec, dims)
    fills: tuple[tuple[str, Any], ...] = (("ones", 1), ("zeros", 0), ("full", spec.get("fill")))
    for fill_name, fill in fills:
        if fill_name in spec:
            fill = size(fill, dims) if isinstance(fill, str) else fill
            return jnp.full(sizes(spec[fill_name], dims), fill, spec["dtype"])
    if "list" in spec:
        value = spec["fill"]
        for n in reversed(sizes(spec["list"], dims)):
            value = [value] * n
        return value
    if "key" in spec:
        return jax.random.key(spec["key"])
    if "keys" in spec:
        return jax.random.split(jax.random.key(0), spec["keys"])
    if "block_mask" in spec:
        from jax_attn.mask_functions import make_block_mask

        return make_block_mask(FUNCTIONS[spec["function"]], *sizes(spec["block_mask"], dims))
    if "function" in spec:
        return FUNCTIONS[spec["function"]]
    if spec.get("none"):
        return None
    raise ValueError(f"unknown value {spec!r} in {_TABLES_FILE}")


def _call_dims(call: dict) -> dict:
    B, T, N, H = call["query"].shape
    _, S, K, H_v = call["value"].shape
    return dict(B=B, T=T, S=S, N=N, K=K, H=H, H_v=H_v)


def _mistake_change(row: dict) -> Callable[[dict], dict]:
    if "call" in row:
        special = _SPECIAL_CALLS[row["call"]]
        return lambda call: {"_call": special(call)}

    def change(call: dict) -> dict:
        dims = _call_dims(call)
        changes = {name: table_value(v, dims, call) for name, v in row["set"].items()}
        return _plain(call) | changes

    return change


def _mistake(row: dict) -> Mistake:
    return Mistake(
        row["argument"],
        row["description"],
        _ERRORS[row["error"]],
        _mistake_change(row),
        row.get("weights_too", False),
    )


MISTAKES: tuple[Mistake, ...] = tuple(_mistake(row) for row in TABLES["mistake"])


def run_mistake(mistake: Mistake, call: dict, entry: str = "dot_product_attention"):
    """Makes the wrong call; returns the exception raised, or ``None`` if none was."""
    from jax_attn import dispatch, functional, reference

    kwargs = mistake.change(call)
    try:
        if "_call" in kwargs:
            kwargs["_call"]()
        elif entry == "dot_product_attention":
            dispatch.dot_product_attention(**kwargs)
        elif entry == "reference":
            reference.dot_product_attention(**kwargs)
        elif entry == "dot_product_attention_weights":
            kwargs.pop("value", None)
            query, key = kwargs.pop("query"), kwargs.pop("key")
            functional.dot_product_attention_weights(query, key, **kwargs)
        else:
            raise ValueError(f"unknown entry {entry!r}")
    except Exception as error:  # noqa: BLE001 - classified by the caller
        return error
    return None


def is_clear(error, mistake: Mistake) -> bool:
    """A clear refusal: ``ValueError``/``TypeError`` whose message names the argument."""
    return isinstance(error, ValueError | TypeError) and mistake.argument in str(error)


# --- other entry points: masks and modules (for the error table and tests) ----------------


def _module_call(row: dict) -> Callable[[], object]:
    import jax_attn as ja

    def arg(spec):
        return table_value(spec, {})

    if not row["entry"].endswith(".apply"):
        entry = getattr(ja, row["entry"])
        return lambda: entry(*map(arg, row["args"]))
    module = getattr(ja, row["entry"].removesuffix(".apply"))(*row["module"])

    def apply():
        params = module.init(jax.random.key(0), arg(row["init"]), deterministic=True)
        return module.apply(params, arg(row["x"]), **row["kwargs"])

    return apply


def module_mistakes() -> tuple[tuple[str, str, str, type, Callable[[], object]], ...]:
    """``(entry, argument, description, error, call)`` for masks and the Flax modules."""
    return tuple(
        (
            row["entry"],
            row["argument"],
            row["description"],
            _ERRORS[row["error"]],
            _module_call(row),
        )
        for row in TABLES["module_mistake"]
    )


# --- error table ----------------------------------------------------------------------


def _message(error) -> str:
    if error is None:
        return "(no error raised)"
    return f"`{type(error).__name__}: {str(error).splitlines()[0]}`".replace("|", "\\|")


def error_table() -> str:
    """The Markdown error table, made by running every mistake."""
    load_kernels()
    call = base_call()
    lines = [
        "# Errors: each mistake and the message it gets",
        "",
        "Generated by `python -m jax_attn.apps.fuzz --error-table docs/errors.md` from the",
        "mistake tables in `jax_attn/apps/data/fuzz_cases.toml`; the test suite regenerates",
        "it and fails if this file is stale. Every message below is the one",
        "the code raises today. Attention calls start from a valid call with",
        "q `[2, 4, 4, 8]` (B, T, N, H), k and v `[2, 5, 2, 8]` (B, S, K, H), float32.",
        "",
        "Every check runs in Python before tracing, so these errors also come out of",
        "`jax.jit`/`jax.grad`-wrapped calls. Sequence lengths are range-checked only when",
        "they are concrete (not traced).",
        "",
        "## `dot_product_attention` (and `reference.dot_product_attention`)",
        "",
        "| argument | mistake | message |",
        "|---|---|---|",
    ]
    for mistake in MISTAKES:
        error = run_mistake(mistake, call)
        lines.append(f"| `{mistake.argument}` | {mistake.description} | {_message(error)} |")
    lines += [
        "",
        "## Masks and Flax modules",
        "",
        "| call | argument | mistake | message |",
        "|---|---|---|---|",
    ]
    for entry, argument, description, _, make in module_mistakes():
        try:
            make()
            error = None
        except Exception as caught:  # noqa: BLE001 - recorded in the table
            error = caught
        lines.append(f"| `{entry}` | `{argument}` | {description} | {_message(error)} |")
    return "\n".join(lines) + "\n"


# --- the fuzz run ---------------------------------------------------------------------------


@dataclasses.dataclass
class FuzzReport:
    cases: int = 0
    valid: int = 0
    comparisons: int = 0
    agreed: int = 0
    disagreed: int = 0
    nans: int = 0
    unsupported: int = 0
    bad_inputs: int = 0
    rejected_clearly: int = 0
    unclear: int = 0
    worst_error: dict = dataclasses.field(default_factory=dict)
    per_implementation: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.disagreed == 0 and self.nans == 0 and self.unclear == 0


def _describe(call: dict) -> str:
    parts = [
        f"q{list(call['query'].shape)} k{list(call['key'].shape)} "
        f"v{list(call['value'].shape)} {call['query'].dtype}"
    ]
    for name, value in call.items():
        if name in ("query", "key", "value", "dropout_rng"):
            continue
        parts.append(f"{name}={list(value.shape) if hasattr(value, 'shape') else value}")
    return " ".join(parts)


def check_valid_call(call: dict, report: FuzzReport, implementations) -> None:
    """Every implementation that serves ``call`` against the float64 reference."""
    from jax_attn import dispatch
    from jax_attn.validation import attention_call_and_inputs

    args = {name: x for name, x in call.items() if name not in ("query", "key", "value")}
    expected = reference_float64(call["query"], call["key"], call["value"], **args)
    meta, _ = attention_call_and_inputs(call["query"], call["key"], call["value"], **args)
    empty = empty_rows(call)
    dtype = np.dtype(call["query"].dtype).name
    for name in implementations:
        stats = report.per_implementation.setdefault(
            name, dict(agreed=0, disagreed=0, nans=0, unsupported=0)
        )
        if dispatch.unsupported_reason(name, meta) is not None:
            _record(report, stats, "unsupported")
            continue
        report.comparisons += 1
        out = dispatch.dot_product_attention(
            call["query"], call["key"], call["value"], implementation=name, **args
        )
        error = max_error(out, expected, call["value"])
        key = f"{name}/{dtype}"
        report.worst_error[key] = max(report.worst_error.get(key, 0.0), error)
        if np.isnan(np.asarray(out, np.float32)).any():
            _record(report, stats, "nans", f"NaN from {name}: {_describe(call)}")
        elif np.any(np.asarray(out, np.float32)[empty] != 0.0):
            empty_row = f"{name}: nonzero output for an empty row: {_describe(call)}"
            _record(report, stats, "disagreed", empty_row)
        elif error <= tolerance(dtype):
            _record(report, stats, "agreed")
        else:
            off = f"{name} off by {error:.2e} (> {tolerance(dtype):.1e}): {_describe(call)}"
            _record(report, stats, "disagreed", off)


def _record(report, group: dict, outcome: str, failure: str | None = None) -> None:
    """One comparison's ``outcome``, a count kept both by ``report`` and by the ``group``
    it falls in (an implementation, a mode), counted in both; its ``failure`` noted."""
    setattr(report, outcome, getattr(report, outcome) + 1)
    group[outcome] += 1
    if failure is not None:
        report.failures.append(failure)


def run_fuzz(
    num_cases: int,
    seed: int = 0,
    bad_fraction: float = 0.25,
    implementations=None,
    progress: bool = False,
    shapes=SHAPES,
    dtypes=DTYPES,
) -> FuzzReport:
    """``num_cases`` random cases; about ``bad_fraction`` of them are user mistakes.

    ``shapes`` are ``(B, T, S, N, K, H)`` tuples and ``dtypes`` names, drawn uniformly.
    """
    implementations = list(implementations or load_kernels())
    rng = np.random.default_rng(seed)
    report = FuzzReport()

    def draw():
        shape = shapes[rng.integers(len(shapes))]
        return random_call(rng, shape, dtypes[rng.integers(len(dtypes))])

    for index in range(num_cases):
        report.cases += 1
        if rng.random() < bad_fraction:
            mistake = MISTAKES[rng.integers(len(MISTAKES))]
            call = draw()
            while call["query"].ndim != 4:
                call = draw()
            entry = ["dot_product_attention", "reference", "dot_product_attention_weights"][
                rng.integers(3 if mistake.weights_too else 2)
            ]
            report.bad_inputs += 1
            error = run_mistake(mistake, call, entry)
            if is_clear(error, mistake):
                report.rejected_clearly += 1
            else:
                report.unclear += 1
                got = "no error" if error is None else f"{type(error).__name__}: {error}"
                report.failures.append(
                    f"unclear rejection of '{mistake.description}' by {entry}: {got}"
                )
        else:
            report.valid += 1
            check_valid_call(draw(), report, implementations)
        if progress and (index + 1) % 100 == 0:
            print(f"  {index + 1}/{num_cases} cases", file=sys.stderr, flush=True)
    return report


def format_report(report: FuzzReport, seconds: float, seed: int) -> str:
    device = jax.devices()[0]
    lines = [
        f"jax-attn check --fuzz {report.cases} --seed {seed} on {device.platform} "
        f"({device.device_kind}), jax {jax.__version__}, {seconds:.1f} s",
        "",
        f"{'':<34}{'count':>8}",
        f"{'cases':<34}{report.cases:>8}",
        f"{'valid cases':<34}{report.valid:>8}",
        f"{'  comparisons with reference64':<34}{report.comparisons:>8}",
        f"{'  agreed':<34}{report.agreed:>8}",
        f"{'  disagreed':<34}{report.disagreed:>8}",
        f"{'  NaNs seen':<34}{report.nans:>8}",
        f"{'  not served (skipped)':<34}{report.unsupported:>8}",
        f"{'bad inputs':<34}{report.bad_inputs:>8}",
        f"{'  rejected clearly':<34}{report.rejected_clearly:>8}",
        f"{'  unclear or not rejected':<34}{report.unclear:>8}",
        "",
        f"{'implementation':<16}{'agreed':>8}{'disagreed':>11}{'NaNs':>6}{'skipped':>9}",
    ]
    for name, stats in report.per_implementation.items():
        lines.append(
            f"{name:<16}{stats['agreed']:>8}{stats['disagreed']:>11}"
            f"{stats['nans']:>6}{stats['unsupported']:>9}"
        )
    lines += ["", f"{'worst error / max|v|':<24}{'':>4}{'tolerance':>10}"]
    for key in sorted(report.worst_error):
        dtype = key.split("/")[1]
        lines.append(f"{key:<24}{report.worst_error[key]:>10.2e}{tolerance(dtype):>10.1e}")
    lines.append("")
    lines.append("OK" if report.ok else f"FAILED ({len(report.failures)} problems)")
    lines += [f"  {failure}" for failure in report.failures[:20]]
    return "\n".join(lines)


# --- one compiled kernel: threads, vmap, gradients, traced lengths ------------------------

_KERNEL_TABLE = TABLES["kernel"]
_HUGE = 2**63 - 1


@dataclasses.dataclass
class KernelFuzzReport:
    """What ``run_kernel_fuzz`` saw: counts, the worst error per ``mode/dtype`` (as a
    fraction of ``max(1, max |expected|)``) and the first failures."""

    implementation: str
    threads: int
    cases: int = 0
    compared: int = 0
    agreed: int = 0
    refused: int = 0
    failed: int = 0
    by_mode: dict = dataclasses.field(default_factory=dict)
    worst_error: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.compared > 0


def _kernel_case(rng: np.random.Generator, dtypes=None) -> dict:
    """One random case of the ``[kernel]`` table: shape, dtype (of ``dtypes``, default the
    table's), mode, mask options, inputs (float32 values already rounded to the dtype),
    traced lengths and a cotangent."""
    B, T, S, N, K, H, H_v = _KERNEL_TABLE["shapes"][rng.integers(len(_KERNEL_TABLE["shapes"]))]
    dtypes = dtypes or _KERNEL_TABLE["dtypes"]
    dtype = dtypes[rng.integers(len(dtypes))]
    mode = _KERNEL_TABLE["modes"][rng.integers(len(_KERNEL_TABLE["modes"]))]
    window = _KERNEL_TABLE["windows"][rng.integers(len(_KERNEL_TABLE["windows"]))]
    if window == "huge":
        window = (_HUGE, _HUGE)
    elif isinstance(window, list):
        window = sizes(window, dict(S=S))
    else:
        window = None
    lead = (2, B) if mode == "vmap" else (B,)

    def lengths(full):
        drawn = rng.random()
        if drawn < _KERNEL_TABLE["full_lengths"]:
            return np.full(lead, full, np.int32)
        if drawn < _KERNEL_TABLE["full_lengths"] + _KERNEL_TABLE["out_of_range_lengths"]:
            return rng.choice([-3, -1, full + 1, full + 5], lead).astype(np.int32)
        return rng.integers(0, full + 1, lead).astype(np.int32)

    def normal(*shape, scale=1.0):
        x = (scale * rng.standard_normal(lead + shape)).astype(np.float32)
        return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))

    qk_scale = float(rng.choice([0.3, 1.0, 3.0]))
    mask_fns = _KERNEL_TABLE.get("mask_fns", ["none"])
    mask_fn = mask_fns[rng.integers(len(mask_fns))]
    return dict(
        shape=(B, T, S, N, K, H, H_v),
        dtype=dtype,
        mode=mode,
        causal=bool(rng.random() < _KERNEL_TABLE["causal"]),
        window=window,
        mask_fn=None if mask_fn == "none" else mask_fn,
        q=normal(T, N, H, scale=qk_scale),
        k=normal(S, K, H, scale=qk_scale),
        v=normal(S, K, H_v),
        q_lengths=lengths(T),
        kv_lengths=lengths(S),
        cotangent=normal(T, N, H_v),
    )


def _attend(implementation: str, case: dict, dtype):
    from jax_attn import dispatch

    def attend(q, k, v, q_lengths, kv_lengths):
        return dispatch.dot_product_attention(
            q.astype(dtype),
            k.astype(dtype),
            v.astype(dtype),
            is_causal=case["causal"],
            local_window_size=case["window"],
            query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths,
            implementation=implementation,
            mask_fn=FUNCTIONS[case["mask_fn"]] if case.get("mask_fn") else None,
        )

    return attend


def _outputs(attend, mode: str):
    """A function of (q, k, v, lengths, cotangent) -> the list of arrays a case checks:
    the output, and for ``grad`` the gradients of q, k, v (vjp with the cotangent)."""
    if mode == "vmap":
        return lambda q, k, v, ql, kvl, ct: [jax.vmap(attend)(q, k, v, ql, kvl)]
    if mode == "forward":
        return lambda q, k, v, ql, kvl, ct: [attend(q, k, v, ql, kvl)]

    def with_grads(q, k, v, ql, kvl, ct):
        out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, ql, kvl), q, k, v)
        return [out, *pullback(ct.astype(out.dtype))]

    return with_grads


_JITTED: dict = {}


def _jitted(implementation: str, case: dict, dtype):
    """One jitted function per (implementation, shape, dtype, options, mode): lengths and
    inputs are arguments, so every case of a kind reuses its compiled program."""
    key: tuple = (implementation, case["shape"], str(dtype), case["causal"], case["window"])
    key += (case["mode"], case.get("mask_fn"))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(_outputs(_attend(implementation, case, dtype), case["mode"]))
    return _JITTED[key]


def _kernel_expected(case: dict) -> list[np.ndarray]:
    """The float64 reference's outputs for ``case``: lengths clipped to their range and
    windows to ``S + T`` (what they mean), vmap as a loop."""
    B, T, S, *_ = case["shape"]
    window = case["window"]
    if window is not None:
        window = tuple(min(w, S + T) for w in window)
    ref = dict(case, window=window)
    ql, kvl = np.clip(case["q_lengths"], 0, T), np.clip(case["kv_lengths"], 0, S)
    args = [case[name].astype(np.float64) for name in ("q", "k", "v")]
    with jax.enable_x64(True):
        run = _jitted(
            "reference",
            ref | {"mode": "grad" if case["mode"] == "grad" else "forward"},
            jnp.float64,
        )
        ct = case["cotangent"].astype(np.float64)
        if case["mode"] == "vmap":
            parts = [run(*(a[i] for a in args), ql[i], kvl[i], ct[i])[0] for i in range(2)]
            return [np.stack([np.asarray(p) for p in parts])]
        return [np.asarray(x) for x in run(*args, ql, kvl, ct)]


def _kernel_check(case: dict, got, expected, report: KernelFuzzReport) -> None:
    label = f"{case['mode']}/{case['dtype']}"
    counts = report.by_mode.setdefault(label, dict(cases=0, agreed=0, failed=0, refused=0))
    if isinstance(got, Exception):
        if isinstance(got, ValueError) and "local_window_size" in str(got):
            _record(report, counts, "refused")
        else:
            error = f"{type(got).__name__}: {got} ({_describe_kernel_case(case)})"
            _record(report, counts, "failed", error)
        return
    report.compared += 1
    counts["cases"] += 1
    worst, problem = 0.0, None
    names = ("out", "dq", "dk", "dv")[: len(got)]
    for name, g, want in zip(names, got, expected, strict=True):
        g = np.asarray(g, np.float64)
        if np.isnan(g).any():
            problem = f"NaN in {name}"
            break
        if name == "out" and np.any(g[np.all(want == 0.0, axis=-1)] != 0.0):
            problem = "nonzero output for a row with nothing to attend"
            break
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        worst = max(worst, float(np.abs(g - want).max(initial=0.0)) / scale)
    report.worst_error[label] = max(report.worst_error.get(label, 0.0), worst)
    if problem is None and worst > tolerance(case["dtype"]):
        problem = f"off by {worst:.2e} (> {tolerance(case['dtype']):.1e})"
    if problem is None:
        _record(report, counts, "agreed")
    else:
        _record(report, counts, "failed", f"{problem}: {_describe_kernel_case(case)}")


def _describe_kernel_case(case: dict) -> str:
    return (
        f"shape (B, T, S, N, K, H, H_v)={case['shape']} {case['dtype']} {case['mode']} "
        f"causal={case['causal']} window={case['window']} mask_fn={case.get('mask_fn')} "
        f"q_lengths={case['q_lengths'].tolist()} "
        f"kv_lengths={case['kv_lengths'].tolist()}"
    )


def run_kernel_fuzz(
    num_cases: int,
    seed: int = 0,
    implementation: str = "cpu_flash",
    threads: int = 4,
    progress: bool = False,
    dtypes=None,
) -> KernelFuzzReport:
    """``num_cases`` random calls of one implementation, ``threads`` of them at a time from
    as many Python threads (the kernel's pool, its buffers and XLA's threads shared), each
    against the float64 reference: the output, and for ``grad`` cases the gradients of q,
    k and v. Lengths are traced (out-of-range values included), so validation cannot
    refuse them; the reference sees them clipped. ``dtypes`` narrows the table's (fewer
    programs to compile: the kernel computes in float32 whatever the input dtype)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    report = KernelFuzzReport(implementation, threads)

    def run(case):
        try:
            fn = _jitted(implementation, case, jnp.dtype(case["dtype"]))
            names = ("q", "k", "v", "q_lengths", "kv_lengths", "cotangent")
            return [np.asarray(x, np.float32) for x in fn(*(case[n] for n in names))]
        except Exception as error:  # noqa: BLE001 - reported per case
            return error

    with ThreadPoolExecutor(max(1, threads)) as pool:
        done = 0
        while done < num_cases:
            batch = [_kernel_case(rng, dtypes) for _ in range(min(threads, num_cases - done))]
            # The references first, on this thread alone (x64 is switched on around them).
            expected = [_kernel_expected(case) for case in batch]
            for case, got, want in zip(batch, pool.map(run, batch), expected, strict=True):
                report.cases += 1
                _kernel_check(case, got, want, report)
            done += len(batch)
            if progress and done % 500 < len(batch):
                print(f"  {done}/{num_cases} cases", file=sys.stderr, flush=True)
    return report


def machine() -> str:
    """This machine in words: the CPU model and core count, or the device kind."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return f"{model}, {os.cpu_count()} cores, jax {jax.__version__} on {device.device_kind}"


def _kernel_source_hash() -> str:
    import hashlib

    from jax_attn.kernels import cpu_flash

    return hashlib.sha256(cpu_flash._SOURCE.read_bytes()).hexdigest()


def kernel_report_json(report: KernelFuzzReport, seconds: float, seed: int, dtypes=None) -> dict:
    import os

    return dict(
        command=f"jax-attn check --fuzz {report.cases} --kernel {report.implementation} "
        f"--threads {report.threads} --seed {seed}"
        + (f" --dtypes {','.join(dtypes)}" if dtypes else ""),
        machine=machine(),
        compiler_flags=os.environ.get("JAX_ATTN_CPU_FLASH_CFLAGS", ""),
        kernel_source_sha256=_kernel_source_hash(),
        seconds=round(seconds, 1),
        ok=report.ok,
        **{k: v for k, v in dataclasses.asdict(report).items() if k != "failures"},
        tolerance={name: tolerance(name) for name in _KERNEL_TABLE["dtypes"]},
        failures=report.failures[:50],
    )


def add_fuzz_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options of ``jax-attn check --fuzz`` beyond those it shares with ``check``
    (``--implementations``, ``--dtypes``, ``--json``): ``check --help`` lists them too."""
    parser.add_argument(
        "--fuzz",
        type=int,
        default=None,
        metavar="N",
        help="run N random cases (and bad inputs) instead of the grid",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --fuzz (default 0)")
    parser.add_argument(
        "--bad-fraction",
        type=float,
        default=0.25,
        help="with --fuzz: share of cases that are user mistakes (default 0.25)",
    )
    parser.add_argument(
        "--error-table",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the Markdown error table to PATH ('-': stdout) and exit",
    )
    parser.add_argument(
        "--kernel",
        default=None,
        metavar="NAME",
        help="with --fuzz: fuzz one implementation (cpu_flash) from several threads, "
        "with gradients and vmap",
    )
    parser.add_argument("--threads", type=int, default=4, help="with --kernel (default 4)")


def build_parser() -> argparse.ArgumentParser:
    """``jax-attn check --fuzz``'s options (``check --help`` lists them with the grid's)."""
    parser = argparse.ArgumentParser(
        prog="jax-attn check --fuzz",
        description="Random cases: implementations vs the float64 reference, and bad inputs.",
    )
    add_fuzz_arguments(parser)
    add_name_list(
        parser, "--implementations", "NAME", "only these implementations (default: all here)"
    )
    add_name_list(parser, "--dtypes", "DTYPE", "with --kernel: only these (default: the table's)")
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="with --kernel: write the result"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.error_table is not None:
        table = error_table()
        if args.error_table == "-":
            print(table, end="")
        else:
            with open(args.error_table, "w") as f:
                f.write(table)
        return 0
    if args.fuzz is None or args.fuzz < 0:
        parser.error("--fuzz N needs a number of cases N >= 0")
    if not 0.0 <= args.bad_fraction <= 1.0:
        parser.error("--bad-fraction must be in [0, 1]")
    if args.kernel is not None:
        import json

        load_kernels()
        start = time.perf_counter()
        dtypes = args.dtypes
        kernel_report = run_kernel_fuzz(
            args.fuzz,
            args.seed,
            args.kernel,
            args.threads,
            progress=not args.no_progress,
            dtypes=dtypes,
        )
        result = kernel_report_json(kernel_report, time.perf_counter() - start, args.seed, dtypes)
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        return 0 if kernel_report.ok else 1
    start = time.perf_counter()
    report = run_fuzz(
        args.fuzz,
        args.seed,
        args.bad_fraction,
        args.implementations,
        progress=not args.no_progress,
    )
    print(format_report(report, time.perf_counter() - start, args.seed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
