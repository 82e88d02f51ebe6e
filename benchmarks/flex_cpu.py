"""jax_attn against PyTorch FlexAttention and SDPA on CPU, side by side (issue 23's targets).

Three suites, each timed in one process with every contestant called once per round
(interleaved, so load from other processes falls on all alike) after warm-up, compile time
apart; medians with min/max and per-round ratios (min/median/max):

- ``masks`` (B 1, T 16384, N 4, H 64, float32; forward and forward+grad): 16 packed
  documents causal inside each, a causal sliding window of 256 and prefix-LM (prefix T/8),
  each as a ``block_mask`` made once outside (FlexAttention's usage) and as a bare
  ``mask_fn``, plus ``is_causal=True`` as the baseline. Peers: FlexAttention
  (``torch.compile(flex_attention)`` with ``create_block_mask``; torch has no CPU backward
  for it, so forward+grad records why) and SDPA (``is_causal`` for causal, else the dense
  boolean ``attn_mask``: what torch trains these masks with on CPU).
- ``gpt2`` (B 8, T 1024, N 12, H 64, causal; forward+grad): attention dropout 0.1 against
  the same call without it and against SDPA ``dropout_p=0.1``; a boolean key-padding
  ``mask=`` and an additive ``bias=`` ``[1, N, T, S]`` against SDPA ``attn_mask`` (SDPA
  cannot combine ``attn_mask`` with ``is_causal``, so it gets the causal mask folded in).
- ``memory`` (T 32768): peak resident memory of one call (forward, forward+grad) with the
  document mask against causal, each in a fresh process, the peak counted from after
  compilation (``/proc/self/clear_refs``).

jax_attn contestants: the default dispatch (``implementation=None``; ``resolves_to`` names
what it picked) and the named implementations (``--implementations``, default
``cpu_flash chunked``); a named one that cannot serve a call records the reason. A named row
whose program is the default's is timed once (the default row says ``alias_of``).

    python benchmarks/flex_cpu.py                        # everything, on an idle machine
    python benchmarks/flex_cpu.py --T 4096 --rounds 3 --suites masks
    python benchmarks/flex_cpu.py --quick                # tiny sizes: a smoke run

torch runs with as many threads as this process' CPUs (XLA:CPU's pool has one per core).
Writes ``benchmarks/results/flex_cpu-cpu-T<T>-<time>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja
from jax_attn import dispatch
from jax_attn.apps import bench, mask_gallery, timing
from jax_attn.apps.arguments import add_name_list
from jax_attn.validation import check_attention_args

RESULTS = Path(__file__).parent / "results"
SUITES = ("masks", "gpt2", "memory")
_START = time.perf_counter()  # progress lines say the seconds since the script started
DEFAULT = "jax_attn (default)"  # bench.DEFAULT_ROWS: aliases point from it to the named row
FLEX = "torch flex"
SDPA = "torch sdpa"


# --- the masks: jax_attn's mask_fn and torch's mask_mod, the same predicate ------------------


def mask_cases(T: int, documents: int, window: int, prefix: int) -> dict[str, dict]:
    """case -> jax ``mask_fn`` (``None``: ``is_causal=True``) and torch ``mask_mod``."""
    ids = bench._torch().from_numpy(mask_gallery.segment_ids(T, documents))
    return {
        "causal": {"mask_fn": None, "mask_mod": lambda b, h, q, kv: q >= kv},
        f"documents {documents}": {
            "mask_fn": mask_gallery.mask_fn(f"document:{documents}", T),
            "mask_mod": lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv),
        },
        f"window {window}": {
            "mask_fn": mask_gallery.mask_fn(f"window:{window}", T),
            "mask_mod": lambda b, h, q, kv: (q >= kv) & (q - kv < window),
        },
        f"prefix-LM {prefix}": {
            "mask_fn": mask_gallery.mask_fn(f"prefix_lm:{prefix}", T),
            "mask_mod": lambda b, h, q, kv: (kv < prefix) | (q >= kv),
        },
    }


# --- contestants: name -> zero-argument builder of ("jax" | "torch", fn, args) ---------------


def _qkv(B: int, T: int, N: int, H: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, T, N, H), dtype=np.float32) for _ in range(3))


class _Arg(NamedTuple):
    """An option whose array is an argument of the jitted function (not baked into it):
    ``arrays[index]``."""

    index: int


def _with_arrays(options: dict, arrays: tuple) -> dict:
    """``options`` with each ``_Arg`` replaced by its array."""
    return {
        key: arrays[value.index] if isinstance(value, _Arg) else value
        for key, value in options.items()
    }


def _jax_attention(options: dict, grad: bool) -> Callable:
    """``fn(q, k, v, *arrays)``: attention with ``options`` (see ``_Arg``); forward, or
    ``bench._with_grad`` (value and grad of ``sum(out)`` w.r.t. q, k, v)."""

    def attend(q, k, v, *arrays):
        return ja.dot_product_attention(q, k, v, **_with_arrays(options, arrays))

    return bench._with_grad(attend) if grad else attend


def jax_rows(
    q, k, v, options: dict, extra: tuple, implementations: list[str], grad: bool
) -> tuple[dict, dict]:
    """The default dispatch and each named implementation for one call (``extra``: the
    arrays ``options``' ``_Arg`` name): (builders, notes), notes holding ``resolves_to``
    and the reasons named implementations cannot serve."""
    call = check_attention_args(q, k, v, **_with_arrays(options, extra))
    notes: dict[str, dict] = {DEFAULT: {"resolves_to": dispatch.select_implementation(call)}}
    args = (q, k, v, *extra)
    builders = {DEFAULT: lambda: ("jax", _jax_attention(options, grad), args)}
    for name in implementations:
        reason = dispatch.unsupported_reason(name, call)
        if reason is not None:
            notes[f"jax_attn {name}"] = {"cannot_serve": reason}
            continue
        named = {**options, "implementation": name}
        builders[f"jax_attn {name}"] = lambda named=named: (
            "jax",
            _jax_attention(named, grad),
            args,
        )
    return builders, notes


def _torch_call(torch, call: Callable, tensors: tuple, grad: bool) -> Callable:
    """Zero-argument run of ``call(q, k, v)``: under ``no_grad``, or with ``sum().backward()``."""
    if not grad:

        def forward():
            with torch.no_grad():
                call(*tensors)

        return forward
    leaves = [x.detach().requires_grad_(True) for x in tensors]

    def forward_backward():
        for x in leaves:
            x.grad = None
        call(*leaves).sum().backward()

    return forward_backward


def _torch_layout(torch, arrays) -> tuple:
    """numpy ``[B, T, N, H]`` -> torch ``[B, N, T, H]``, contiguous."""
    return tuple(torch.from_numpy(x).transpose(1, 2).contiguous() for x in arrays)


def masks_suite(args, grad: bool) -> tuple[dict, dict]:
    """case -> contestant builders, and case -> notes, for the masks suite."""
    torch = bench._torch()
    from torch.nn.attention import flex_attention as flex

    B, T, N, H = args.B, args.T, args.N, args.H
    arrays = _qkv(B, T, N, H)
    q, k, v = (jnp.asarray(x) for x in arrays)
    tensors = _torch_layout(torch, arrays)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    compiled_flex = torch.compile(flex.flex_attention)
    suite, notes = {}, {}
    for case, masks in mask_cases(T, args.documents, args.window, args.prefix).items():
        mask_fn, mask_mod = masks["mask_fn"], masks["mask_mod"]
        if mask_fn is None:
            options, extra = {"is_causal": True}, ()
        else:
            blocks = ja.make_block_mask(mask_fn, 1, 1, T, T)
            options, extra = {"block_mask": _Arg(0)}, (blocks,)
        builders, case_notes = jax_rows(q, k, v, options, extra, args.implementations, grad)
        if mask_fn is not None and not args.quick:
            builders[f"{DEFAULT[:-1]}, mask_fn in the call)"] = lambda mask_fn=mask_fn: (
                "jax",
                _jax_attention({"mask_fn": mask_fn}, grad),
                (q, k, v),
            )
        block_mask = flex.create_block_mask(mask_mod, 1, 1, T, T, device="cpu")
        reason = _flex_backward_reason(torch, flex, tensors) if grad else ""
        if reason:
            case_notes[FLEX] = {"cannot_serve": reason}
        else:
            builders[FLEX] = lambda block_mask=block_mask: (
                "torch",
                _torch_call(
                    torch,
                    lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask),
                    tensors,
                    grad,
                ),
                (),
            )
        if mask_fn is None:
            peer = lambda q, k, v: sdpa(q, k, v, is_causal=True)  # noqa: E731
        else:
            positions = torch.arange(T)
            dense = mask_mod(0, 0, positions[:, None], positions[None, :])
            peer = lambda q, k, v, dense=dense: sdpa(q, k, v, attn_mask=dense)  # noqa: E731
            case_notes[SDPA] = {"attn_mask": f"dense bool [{T}, {T}]"}
        builders[SDPA] = lambda peer=peer: ("torch", _torch_call(torch, peer, tensors, grad), ())
        suite[case], notes[case] = builders, case_notes
    return suite, notes


def _flex_backward_reason(torch, flex, tensors) -> str:
    """What torch says when FlexAttention is asked for a gradient on CPU ("" if it can)."""
    leaves = [x[:, :, :128].detach().requires_grad_(True) for x in tensors]
    try:
        flex.flex_attention(*leaves).sum().backward()
    except Exception as error:  # noqa: BLE001 - recorded as the reason
        return f"{type(error).__name__}: {error}"[:300]
    return ""


def gpt2_suite(args) -> tuple[dict, dict]:
    """case -> contestant builders (forward+grad), and case -> notes, for the GPT-2 suite."""
    torch = bench._torch()
    B, T, N, H = args.gpt2_B, args.gpt2_T, args.gpt2_N, 64
    arrays = _qkv(B, T, N, H, seed=1)
    q, k, v = (jnp.asarray(x) for x in arrays)
    tensors = _torch_layout(torch, arrays)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rng = np.random.default_rng(2)
    lengths = rng.integers(T // 2, T + 1, size=B)
    keep = np.arange(T)[None, :] < lengths[:, None]  # [B, S]
    padding = keep[:, None, None, :]  # [B, 1, 1, S]
    bias = 0.1 * rng.standard_normal((1, N, T, T), dtype=np.float32)
    causal = np.tril(np.ones((T, T), bool))
    # SDPA takes attn_mask or is_causal, not both: the causal mask folded in, outside the timing
    folded_padding = torch.from_numpy(padding & causal)
    folded_bias = torch.from_numpy(np.where(causal, bias, -np.inf).astype(np.float32))
    cases = {
        "causal": ({"is_causal": True}, (), lambda q, k, v: sdpa(q, k, v, is_causal=True)),
        f"dropout {args.dropout}": (
            {"is_causal": True, "dropout_rate": args.dropout, "dropout_rng": _Arg(0)},
            (jax.random.key(0),),
            lambda q, k, v: sdpa(q, k, v, is_causal=True, dropout_p=args.dropout),
        ),
        "key padding mask": (
            {"is_causal": True, "mask": _Arg(0)},
            (jnp.asarray(padding),),
            lambda q, k, v: sdpa(q, k, v, attn_mask=folded_padding),
        ),
        "bias": (
            {"is_causal": True, "bias": _Arg(0)},
            (jnp.asarray(bias),),
            lambda q, k, v: sdpa(q, k, v, attn_mask=folded_bias),
        ),
    }
    suite, notes = {}, {}
    for case, (options, extra, peer) in cases.items():
        builders, case_notes = jax_rows(q, k, v, options, extra, args.implementations, True)
        builders[SDPA] = lambda peer=peer: ("torch", _torch_call(torch, peer, tensors, True), ())
        suite[case], notes[case] = builders, case_notes
    notes["key padding mask"][SDPA] = {"attn_mask": "bool [B, 1, T, S] (causal & padding)"}
    notes["bias"][SDPA] = {"attn_mask": "float [1, N, T, S] (bias, -inf above the diagonal)"}
    notes["bias"][DEFAULT]["note"] = "bias [1, N, T, S], not differentiated (nor torch's)"
    return suite, notes


# --- timing ------------------------------------------------------------------------------


def run_suite(suite: dict, notes: dict, warmup: int, rounds: int) -> dict:
    """Compiles every contestant of every case (identical programs once), then times all of
    them interleaved: case -> name -> timings (``bench.TIMING_KEYS``), compile time, notes."""
    results: dict[str, dict] = {}
    for case, builders in suite.items():  # rows in the builders' order, then notes alone
        case_notes = notes.get(case, {})
        results[case] = {name: dict(case_notes.get(name, {})) for name in builders}
        results[case].update({n: dict(row) for n, row in case_notes.items() if n not in builders})
    runs = {}
    for case, builders in suite.items():
        built = {}
        for name, build in builders.items():
            try:
                built[name] = bench.build_contestant(build)
            except Exception as error:  # noqa: BLE001 - e.g. a kernel declines: report, go on
                results[case][name].update(bench._error(error))
        aliases = bench.find_aliases({name: b.program for name, b in built.items()})
        for name, contestant in built.items():
            row = results[case][name]
            if name in aliases:
                row["alias_of"] = aliases[name]
                continue
            try:
                prepared, runs[(case, name)] = bench.prepare_contestant(contestant)
                row.update(prepared)
            except Exception as error:  # noqa: BLE001
                row.update(bench._error(error))
        print(f"  compiled {case} ({time.perf_counter() - _START:.0f} s)", flush=True)
    for (case, name), times in bench.time_interleaved(runs, warmup, rounds).items():
        results[case][name].update(timing.summary_ms(times))
    for rows in results.values():
        for row in rows.values():
            if "alias_of" in row:
                timed = rows[row["alias_of"]]
                row.update({key: timed[key] for key in bench.TIMING_KEYS if key in timed})
    return results


def ratio(results: dict, a: tuple[str, str], b: tuple[str, str]) -> dict | None:
    """Per-round ``time(a) / time(b)`` (a, b: (case, contestant)): min, median, max."""
    times_a = results.get(a[0], {}).get(a[1], {}).get("times_ms")
    times_b = results.get(b[0], {}).get(b[1], {}).get("times_ms")
    if not times_a or not times_b:
        return None
    ratios = [x / y for x, y in zip(times_a, times_b, strict=True)]
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def _target(name: str, value: dict | None, goal: str, met: Callable[[float], bool]) -> dict:
    """One row of the targets table; ``met`` is ``None`` where the goal is "reported"."""
    if value is None:
        return {"target": name, "goal": goal, "met": None, "why": "not measured"}
    passed = None if goal == "reported" else bool(met(value["median"]))
    return {"target": name, "goal": goal, **value, "met": passed}


def mask_targets(results: dict, direction: str, args) -> list[dict]:
    """Issue 23's targets on the masks suite: the speedups of documents and window over
    causal, and jax_attn over FlexAttention (forward; torch has no CPU backward for it);
    every case over SDPA is reported beside them."""
    documents, window = f"documents {args.documents}", f"window {args.window}"
    targets = []
    for case, least in ((documents, 10.0), (window, 16.0)):
        # causal time / case time: how much faster the masked call runs than causal
        targets.append(
            _target(
                f"{direction}: {case} speedup over causal",
                ratio(results, ("causal", DEFAULT), (case, DEFAULT)),
                f">= {least:g}x",
                lambda x, least=least: x >= least,
            )
        )
    for case in results:
        for peer in (FLEX, SDPA):
            row = results[case].get(peer, {})
            if "times_ms" not in row:
                if case in (documents, window) and peer == FLEX:
                    name = f"{direction}: {case} jax_attn / {peer}"
                    why = row.get("cannot_serve") or row.get("error") or "not run"
                    targets.append({"target": name, "goal": "<= 1.0x", "met": None, "why": why})
                continue
            goal = "<= 1.0x" if peer == FLEX and case in (documents, window) else "reported"
            targets.append(_versus_peer(results, direction, case, peer, goal))
    return targets


def _versus_peer(results: dict, direction: str, case: str, peer: str, goal: str) -> dict:
    """The target row of jax_attn's default over ``peer`` in ``case`` (goal: at most 1.0x)."""
    return _target(
        f"{direction}: {case} jax_attn / {peer}",
        ratio(results, (case, DEFAULT), (case, peer)),
        goal,
        lambda x: x <= 1.0,
    )


def gpt2_targets(results: dict, args) -> list[dict]:
    dropout = f"dropout {args.dropout}"
    targets = [
        _target(
            f"forward_grad: {dropout} / no dropout (jax_attn)",
            ratio(results, (dropout, DEFAULT), ("causal", DEFAULT)),
            "<= 1.3x",
            lambda x: x <= 1.3,
        )
    ]
    for case in results:
        goal = "<= 1.0x" if case in ("key padding mask", "bias") else "reported"
        targets.append(_versus_peer(results, "forward_grad", case, SDPA, goal))
    return targets


# --- memory: one call in a fresh process ------------------------------------------------------


def memory_worker(spec: dict) -> dict:
    """One call (``spec``: case, T, N, H, grad); its peak resident memory while it runs."""
    T, N, H, grad = spec["T"], spec["N"], spec["H"], spec["grad"]
    q, k, v = (jnp.asarray(x) for x in _qkv(1, T, N, H))
    if spec["case"] == "causal":
        options = {"is_causal": True}
    else:
        options = {"mask_fn": mask_gallery.mask_fn(spec["case"], T)}
    fn = _jax_attention(options, grad)
    compiled = jax.jit(fn).lower(q, k, v).compile()
    jax.block_until_ready((q, k, v))
    result = {
        "resolves_to": dispatch.select_implementation(check_attention_args(q, k, v, **options))
    }
    try:
        result["xla_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - optional information
        result["xla_temp_mib"] = None
    try:  # "5" resets VmHWM to the current RSS: the peak then counts the run alone
        Path("/proc/self/clear_refs").write_text("5")
        result["peak_from"] = "after compile (clear_refs)"
    except OSError:
        result["peak_from"] = "process start (compile included)"
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    result["seconds"] = time.perf_counter() - start
    result["rss_before_mib"] = before
    result["peak_rss_mib"] = bench._peak_rss_mib()
    result["growth_mib"] = result["peak_rss_mib"] - before
    return result


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_suite(args) -> dict:
    """Peak memory of causal and the document mask at ``--memory-T``, each in a fresh process."""
    results = {}
    directions = [d for d in ("forward", "forward_grad") if d in args.directions]
    if args.quick:  # each case is a fresh process: one direction is enough for a smoke run
        directions = directions[:1]
    for direction in directions:
        rows = {}
        for case in ("causal", f"document:{args.documents}"):
            spec = {"case": case, "T": args.memory_T, "N": args.N, "H": args.H}
            spec["grad"] = direction == "forward_grad"
            done = subprocess.run(
                [sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                timeout=900,
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode != 0 or not lines:
                rows[case] = {"error": (done.stderr or done.stdout)[-600:]}
            else:
                rows[case] = json.loads(lines[-1])
            print(f"  memory {direction} {case} ({time.perf_counter() - _START:.0f} s)", flush=True)
        document = rows[f"document:{args.documents}"]
        if "peak_rss_mib" in document and "peak_rss_mib" in rows["causal"]:
            for key in ("peak_rss_mib", "growth_mib"):
                rows[f"documents / causal {key}"] = document[key] / max(rows["causal"][key], 1e-9)
        results[direction] = rows
    return results


# --- report ------------------------------------------------------------------------------------


def print_suite(title: str, results: dict) -> None:
    print(title)
    for case, rows in results.items():
        print(f"  {case}")
        for name, row in rows.items():
            if "median_ms" in row:
                alias = f" (= {row['alias_of']})" if "alias_of" in row else ""
                compile_s = row.get("compile_s") or row.get("first_call_s") or 0.0
                print(
                    f"    {name:42s} {row['median_ms']:9.1f} ms "
                    f"[{row['min_ms']:.1f}-{row['max_ms']:.1f}]  first {compile_s:.1f} s"
                    f"{' ' + row['resolves_to'] if 'resolves_to' in row else ''}{alias}"
                )
            else:
                why = row.get("cannot_serve") or row.get("error") or row
                print(f"    {name:42s} -  {str(why)[:90]}")


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        if "median" not in t:
            print(f"     {t['target']}: not measured ({t.get('why', '')[:60]})")
            continue
        mark = {True: "ok ", False: "NO ", None: "   "}[t["met"]]
        print(
            f"  {mark}{t['target']}: {t['median']:.2f}x [{t['min']:.2f}-{t['max']:.2f}] "
            f"(goal {t['goal']})"
        )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=16384, help="masks suite length")
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--N", type=int, default=4)
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--prefix", type=int, default=None, help="prefix-LM prefix (T/8)")
    parser.add_argument("--gpt2-B", type=int, default=8)
    parser.add_argument("--gpt2-T", type=int, default=1024)
    parser.add_argument("--gpt2-N", type=int, default=12)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--memory-T", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    add_name_list(parser, "--suites", "SUITE", f"of {', '.join(SUITES)} (default all)")
    add_name_list(parser, "--directions", "D", "forward, forward_grad (default both)")
    add_name_list(parser, "--implementations", "NAME", "named beside the default")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.T, args.window, args.memory_T = 512, 32, 1024
        args.gpt2_B, args.gpt2_T, args.gpt2_N = 2, 128, 2
        args.rounds, args.warmup = 2, 1
    args.prefix = args.prefix or args.T // 8
    args.suites = args.suites or list(SUITES)
    args.directions = args.directions or ["forward", "forward_grad"]
    if args.implementations is None:
        args.implementations = [] if args.quick else ["cpu_flash", "chunked"]
    for flag, given, known in (
        ("--suites", args.suites, SUITES),
        ("--directions", args.directions, ("forward", "forward_grad")),
    ):
        if set(given) - set(known):
            parser.error(f"{flag} must be among {known}, got {sorted(set(given) - set(known))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0
    torch = bench._torch()
    torch._dynamo.config.cache_size_limit = 64  # one FlexAttention program per mask
    load_before = os.getloadavg()
    started = time.perf_counter()
    record: dict = {
        "benchmark": "flex_cpu (issue 23: jax_attn vs FlexAttention and SDPA on CPU)",
        "machine": bench.device_info(),
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "load_before": load_before,
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in ("output", "memory_worker")
        },
        "method": "jit-compiled jax (compile apart), torch.compile for FlexAttention; "
        "every contestant once per round, interleaved across the suite's cases; "
        "forward_grad = value and grad of sum(out) w.r.t. q, k, v",
        "targets": [],
    }
    if "masks" in args.suites:
        for direction in args.directions:
            print(f"masks {direction} (B {args.B}, T {args.T}, N {args.N}, H {args.H})")
            suite, notes = masks_suite(args, grad=direction == "forward_grad")
            results = run_suite(suite, notes, args.warmup, args.rounds)
            record[f"masks_{direction}"] = results
            record["targets"] += mask_targets(results, direction, args)
            print_suite(f"masks {direction}", results)
    if "gpt2" in args.suites:
        print(f"gpt2 forward_grad (B {args.gpt2_B}, T {args.gpt2_T})")
        suite, notes = gpt2_suite(args)
        results = run_suite(suite, notes, args.warmup, args.rounds)
        record["gpt2_forward_grad"] = results
        record["targets"] += gpt2_targets(results, args)
        print_suite("gpt2 forward_grad", results)
    if "memory" in args.suites:
        record["memory"] = memory = memory_suite(args)
        for direction, rows in memory.items():
            # the call's own memory: peak RSS while it runs over the RSS just before it
            growth = rows.get("documents / causal growth_mib")
            record["targets"].append(
                _target(
                    f"{direction}: T {args.memory_T} documents / causal peak memory growth",
                    None if growth is None else {"min": growth, "median": growth, "max": growth},
                    "<= 1.2x",
                    lambda x: x <= 1.2,
                )
            )
    record["load_after"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - started
    print("targets")
    print_targets(record["targets"])
    kind = "quick" if args.quick else f"T{args.T}"
    output = args.output or RESULTS / f"flex_cpu-cpu-{kind}-{record['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"wrote {output} in {record['wall_s']:.0f} s "
        f"(load {load_before[0]:.2f} -> {record['load_after'][0]:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
