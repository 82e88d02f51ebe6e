"""``jax-attn check``: every available implementation against the reference, on this device.

For each case of a small grid (shapes with ``T != S``, masks, sequence lengths, GQA/MQA,
causal, sliding window, bias, fully masked rows, mask and score functions with a block mask)
and each dtype (float32, bfloat16, float16), every implementation that supports the call is
run forward and backward (``jax.vjp``) and compared with
:func:`jax_attn.reference.dot_product_attention` computed in float32 from the same inputs.
Prints a table; the exit status is 1 on any mismatch.
``--full`` adds dropout, ``H_v != H`` and multi-chunk shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_attn import dispatch, reference
from jax_attn.apps import fuzz, mask_gallery
from jax_attn.apps.arguments import add_name_list
from jax_attn.apps.extras import require
from jax_attn.mask_functions import make_block_mask
from jax_attn.validation import check_attention_args

__all__ = ["Case", "CaseResult", "default_cases", "run_check", "main"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Largest error allowed, relative to the largest reference magnitude (at least 1).
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call of the grid. ``mask``/``bias``/``lengths``/``dropout`` are flags;
    the arrays are drawn from ``seed``."""

    name: str
    T: int
    S: int
    N: int = 4
    K: int = 2
    H: int = 16
    H_v: int | None = None
    B: int = 2
    is_causal: bool = False
    window: tuple[int, int] | None = None
    mask: bool = False
    bias: bool = False
    lengths: bool = False
    dropout: float = 0.0
    mask_fn: str | None = None  # a name of jax_attn.apps.mask_gallery, e.g. "document:3"
    score_fn: str | None = None
    block_mask: bool = False  # the mask_fn passed as ja.make_block_mask(mask_fn, ...)
    seed: int = 0


@dataclasses.dataclass
class CaseResult:
    case: str
    dtype: str
    implementation: str
    forward_error: float | None
    gradient_error: float | None
    tolerance: float
    status: str  # "ok", "FAIL" or "skip"
    note: str = ""


def default_cases(full: bool = False) -> list[Case]:
    cases = [
        Case("self, causal", T=24, S=24, N=4, K=4, is_causal=True),
        Case("T<S, causal, GQA", T=10, S=24, N=4, K=2, is_causal=True),
        Case("T>S, causal (empty rows)", T=20, S=12, N=4, K=2, is_causal=True),
        Case("mask + lengths, MQA", T=16, S=16, N=4, K=1, mask=True, lengths=True),
        Case("window (5,0), causal", T=24, S=24, is_causal=True, window=(5, 0)),
        Case("bias (-inf), T<S", T=12, S=20, bias=True),
        Case("2 chunks, lengths", T=300, S=300, N=2, K=1, is_causal=True, lengths=True),
        Case("mask_fn document, alibi", T=20, S=20, mask_fn="document:3", score_fn="alibi"),
        Case(
            "block_mask window, 2 chunks",
            T=300,
            S=300,
            N=2,
            K=1,
            mask_fn="window:40",
            block_mask=True,
        ),
    ]
    if full:
        cases += [
            Case("window (3,2)", T=40, S=40, window=(3, 2)),
            Case("dropout 0.2, causal", T=20, S=20, is_causal=True, dropout=0.2),
            Case("H_v != H", T=12, S=18, H=16, H_v=8, is_causal=True),
            Case("mask + bias + lengths, T<S", T=14, S=22, mask=True, bias=True, lengths=True),
            Case(
                "long, T<S, window",
                T=520,
                S=700,
                N=2,
                K=1,
                is_causal=True,
                window=(300, 0),
                lengths=True,
            ),
            Case("H 64, GQA", T=130, S=130, N=8, K=2, H=64, is_causal=True),
            Case(
                "prefix_lm + soft_cap, lengths",
                T=24,
                S=24,
                mask_fn="prefix_lm:5",
                score_fn="soft_cap:5",
                lengths=True,
            ),
        ]
    return cases


def _case_inputs(case: Case, dtype):
    """Arrays for ``case`` in ``dtype`` and the keyword arguments of the call."""
    rng = np.random.default_rng(case.seed)  # numpy: no random kernel to compile per shape
    normal = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    H_v = case.H if case.H_v is None else case.H_v
    q = normal((case.B, case.T, case.N, case.H))
    k = normal((case.B, case.S, case.K, case.H))
    v = normal((case.B, case.S, case.K, H_v))
    kwargs: dict[str, Any] = {"is_causal": case.is_causal}
    if case.window is not None:
        kwargs["local_window_size"] = case.window
    if case.mask:
        kwargs["mask"] = jnp.asarray(rng.random((case.B, 1, case.T, case.S)) < 0.75)
    if case.bias:
        bias = normal((1, case.N, case.T, case.S))
        kwargs["bias"] = bias.at[0, 0, 1, :].set(-jnp.inf).at[0, 1, :, 2].set(-jnp.inf)
    if case.lengths:
        kwargs["query_seq_lengths"] = jnp.array([case.T, max(1, case.T // 2)][: case.B])
        kwargs["key_value_seq_lengths"] = jnp.array([case.S, max(1, case.S // 3)][: case.B])
    if case.dropout:
        kwargs["dropout_rate"] = case.dropout
        kwargs["dropout_rng"] = jax.random.key(case.seed)
    if case.mask_fn is not None:
        mask_fn = mask_gallery.mask_fn(case.mask_fn, case.S)
        if case.block_mask:
            kwargs["block_mask"] = make_block_mask(mask_fn, 1, 1, case.T, case.S)
        else:
            kwargs["mask_fn"] = mask_fn
    if case.score_fn is not None:
        kwargs["score_fn"] = mask_gallery.score_fn(case.score_fn, case.N)
    cotangent = normal((case.B, case.T, case.N, H_v))
    cast = lambda x: x.astype(dtype)  # noqa: E731
    if "bias" in kwargs:
        kwargs["bias"] = cast(kwargs["bias"])
    return cast(q), cast(k), cast(v), cast(cotangent), kwargs


def _forward_and_gradients(fn, q, k, v, cotangent, kwargs):
    """``fn``'s output and the gradients of ``<output, cotangent>`` w.r.t. q, k, v."""
    arrays = {name: value for name, value in kwargs.items() if isinstance(value, jax.Array)}
    static = {name: value for name, value in kwargs.items() if name not in arrays}

    @jax.jit
    def run(q, k, v, cotangent, arrays):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, **arrays, **static), q, k, v)
        return out, pullback(cotangent)

    return run(q, k, v, cotangent, arrays)


def _error(actual, expected) -> float:
    """Largest absolute difference relative to the largest reference magnitude (>= 1);
    ``inf`` when ``actual`` has a NaN or inf the reference lacks."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if not np.array_equal(np.isfinite(actual), np.isfinite(expected)):
        return float("inf")
    if actual.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


def run_check(
    cases=None, dtypes=None, implementations=None, progress=None, on_result=None
) -> list[CaseResult]:
    """Runs the grid; returns one :class:`CaseResult` per (case, dtype, implementation)
    (each also passed to ``on_result`` as soon as it is known)."""
    cases = default_cases() if cases is None else cases
    dtypes = list(DTYPES) if dtypes is None else dtypes
    names = [n for n in dispatch.available_implementations() if n != "reference"]
    names = names if implementations is None else [n for n in names if n in implementations]
    results = _Results(on_result)
    for case in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            q, k, v, cotangent, kwargs = _case_inputs(case, dtype)
            call = check_attention_args(q, k, v, **kwargs)
            expected = None
            for name in names:
                tol = TOLERANCE[dtype_name]
                reason = dispatch.unsupported_reason(name, call)
                if reason is not None:
                    results.append(
                        CaseResult(case.name, dtype_name, name, None, None, tol, "skip", reason)
                    )
                    continue
                if expected is None:
                    expected = _reference_result(q, k, v, cotangent, kwargs)
                expected_out, expected_grads = expected
                fn = _implementation_fn(name)
                try:
                    out, grads = _forward_and_gradients(fn, q, k, v, cotangent, kwargs)
                except Exception as error:  # noqa: BLE001 - a crash is a failure to report
                    results.append(
                        CaseResult(
                            case.name,
                            dtype_name,
                            name,
                            None,
                            None,
                            tol,
                            "FAIL",
                            f"{type(error).__name__}: {error}"[:200],
                        )
                    )
                    continue
                forward_error = _error(out, expected_out)
                gradient_error = max(
                    _error(g, e) for g, e in zip(grads, expected_grads, strict=True)
                )
                ok = forward_error <= tol and gradient_error <= tol and out.dtype == dtype
                note = "" if out.dtype == dtype else f"output dtype {out.dtype}"
                results.append(
                    CaseResult(
                        case.name,
                        dtype_name,
                        name,
                        forward_error,
                        gradient_error,
                        tol,
                        "ok" if ok else "FAIL",
                        note,
                    )
                )
            if progress is not None:
                progress()
    return list(results)


class _Results(list):
    def __init__(self, on_result):
        super().__init__()
        self.on_result = on_result

    def append(self, result):
        super().append(result)
        if self.on_result is not None:
            self.on_result(result)


def _reference_result(q, k, v, cotangent, kwargs):
    """The oracle in float32 from the very same (rounded) inputs."""
    upcast = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref_kwargs = {**kwargs}
    if "bias" in ref_kwargs:
        ref_kwargs["bias"] = upcast(ref_kwargs["bias"])
    return _forward_and_gradients(
        reference.dot_product_attention,
        upcast(q),
        upcast(k),
        upcast(v),
        upcast(cotangent),
        ref_kwargs,
    )


def _implementation_fn(name):
    def fn(q, k, v, **kwargs):
        return dispatch.dot_product_attention(q, k, v, implementation=name, **kwargs)

    return fn


_WIDTHS = (28, 9, 10, 8, 8, 6)  # "impl" fits pallas_gpu and cpu_flash
_HEADER = ("case", "dtype", "impl", "fwd err", "grad err", "tol", "status")


def format_row(result: CaseResult | None = None) -> str:
    """One table line (the header for ``None``), fixed widths so rows can stream."""
    if result is None:
        cells = _HEADER
    else:
        fmt = lambda x: "-" if x is None else f"{x:.1e}"  # noqa: E731
        status = result.status if not result.note else f"{result.status} ({result.note})"
        cells = (
            result.case,
            result.dtype,
            result.implementation,
            fmt(result.forward_error),
            fmt(result.gradient_error),
            f"{result.tolerance:.0e}",
            status,
        )
    padded = [str(c)[:w].ljust(w) for c, w in zip(cells[:-1], _WIDTHS, strict=True)]
    return "  ".join([*padded, str(cells[-1])])


def format_table(results: list[CaseResult]) -> str:
    return "\n".join([format_row(), *(format_row(r) for r in results)])


def device_description() -> str:
    device = jax.devices()[0]
    return f"{jax.default_backend()}: {getattr(device, 'device_kind', device.platform)}"


def build_parser() -> argparse.ArgumentParser:
    """``jax-attn check``'s options, ``--fuzz`` and its own among them."""
    parser = argparse.ArgumentParser(
        prog="jax-attn check",
        description="Every available implementation against the reference: forward and "
        "gradients, on a grid of shapes, dtypes, masks, lengths, GQA and causal. With "
        "--fuzz N: N random cases and bad inputs instead (jax_attn.apps.fuzz).",
    )
    parser.add_argument(
        "--full", action="store_true", help="a larger grid (dropout, H_v != H, multi-chunk shapes)"
    )
    add_name_list(
        parser,
        "--implementations",
        "NAME",
        "only these implementations (default: every available one)",
    )
    add_name_list(
        parser,
        "--dtypes",
        "DTYPE",
        f"only these dtypes, of {' '.join(DTYPES)} (default: all; with --fuzz --kernel: "
        "the kernel table's)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON (with --fuzz: --kernel's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    fuzz.add_fuzz_arguments(
        parser.add_argument_group(
            "random cases", "jax-attn check --fuzz N [these options] (docs/reliability.md)"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fuzz is not None or args.error_table is not None:
        return fuzz.main(argv)
    fuzz_only = [
        f"--{name.replace('_', '-')}"
        for name in ("seed", "bad_fraction", "kernel", "threads")
        if getattr(args, name) != parser.get_default(name)
    ]
    if fuzz_only:
        parser.error(f"{', '.join(fuzz_only)}: only with --fuzz N")
    unknown_dtypes = sorted(set(args.dtypes or ()) - set(DTYPES))
    if unknown_dtypes:
        parser.error(f"--dtypes: {unknown_dtypes} unknown; known: {list(DTYPES)}")

    available = dispatch.available_implementations()
    if args.implementations:
        unknown = sorted(set(args.implementations) - set(available))
        if unknown:
            parser.error(f"--implementations: {unknown} not available here; available: {available}")
    cases = default_cases(args.full)
    dtypes = args.dtypes or list(DTYPES)
    print(
        f"jax-attn check on {device_description()} (jax {jax.__version__}); "
        f"implementations: {args.implementations or [n for n in available if n != 'reference']}",
        flush=True,
    )
    start = time.perf_counter()
    bar = None
    if not args.no_progress:
        tqdm = require("tqdm.auto").tqdm
        bar = tqdm(total=len(cases) * len(dtypes), desc="check", unit="case", file=sys.stderr)
    write = print if bar is None else bar.write
    write(format_row())
    with jax.default_matmul_precision("float32"):
        results = run_check(
            cases,
            dtypes,
            args.implementations,
            progress=None if bar is None else bar.update,
            on_result=lambda result: write(format_row(result)),
        )
    if bar is not None:
        bar.close()
    failures = [r for r in results if r.status == "FAIL"]
    checked = sum(r.status != "skip" for r in results)
    print(
        f"\n{checked} checks, {len(failures)} failed, "
        f"{sum(r.status == 'skip' for r in results)} skipped (unsupported) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device_description(),
                    "jax": jax.__version__,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                f,
                indent=1,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
