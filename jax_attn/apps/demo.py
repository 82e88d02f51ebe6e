"""``jax-attn demo``: chapter 3 on "Your journey starts with one step", then GPT-2 attention.

Part one walks the chapter (sections 3.3 to 3.6 and exercise 3.3) through the public
API and prints each step's tensors next to the values the book prints, with a match
mark (they agree to 4 decimals). Part two builds GPT-2 multi-head attention from a
config (``configs/gpt2-small.toml`` by default), runs it jit-compiled on the default
device, checks it against the einsum reference and prints compile and run times.
When matplotlib is installed it writes a heatmap of the 6 x 6 attention weights.

The exit code is 0 when every book value matches and the reference check passes,
1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_attn as ja
from jax_attn import functional as F
from jax_attn.apps.config import ConfigError, load_config
from jax_attn.apps.timing import format_seconds, median_seconds
from jax_attn.data import book_values

__all__ = ["BOOK", "INPUTS", "SENTENCE", "main", "reference_multi_head_attention"]

#: What the book prints in chapter 3 (one copy, package data): inputs, values by section,
#: the W matrices of 3.4.1 in full precision, the shapes of 3.5.3 and 3.6.
BOOK = book_values()
SENTENCE = BOOK["sentence"]
TOKENS = tuple(BOOK["tokens"])
# The book's 3-d embeddings of the six tokens (section 3.3.1), x^(1) ... x^(6).
INPUTS = tuple(tuple(row) for row in BOOK["inputs"])

#: Printed values have 4 decimals: a correct result is within half a unit of the last one.
BOOK_ATOL = 5e-5
#: Same computation two ways in float32 (a module against the functional core).
SAME_ATOL = 1e-6
#: The reference check of part two, (rtol, atol) by dtype. GPUs and TPUs may run float32
#: matmuls at reduced precision by default (TF32, bfloat16 passes), hence the wider bound.
REFERENCE_TOLERANCE = {
    ("float32", "cpu"): (1e-5, 1e-5),
    ("float32", "other"): (2e-2, 2e-2),
    ("bfloat16", "any"): (2e-2, 2e-2),
    ("float16", "any"): (1e-2, 1e-2),
}


# --- printing and checking ---------------------------------------------------------------


class Report:
    """Prints steps and keeps count of checks and failures."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        encoding = getattr(self.stream, "encoding", None) or "ascii"
        try:
            "✓✗".encode(encoding)
            self.marks = ("✓", "✗")
        except (UnicodeEncodeError, LookupError):
            self.marks = ("ok", "XX")
        self.checks = 0
        self.failures: list[str] = []

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def heading(self, text: str) -> None:
        self.line()
        self.line(text)
        self.line("-" * len(text))

    def check(self, label: str, ok: bool, detail: str = "") -> bool:
        """One mark: ``ok`` or a recorded failure."""
        self.checks += 1
        if not ok:
            self.failures.append(label)
        mark = self.marks[0] if ok else self.marks[1]
        self.line(f"  {mark} {label}" + (f"  ({detail})" if detail else ""))
        return ok

    def compare(self, label: str, ours, book, atol: float = BOOK_ATOL) -> bool:
        """Prints ``ours`` next to the book's values (rows side by side) and checks them."""
        integers = np.issubdtype(np.asarray(book).dtype, np.integer)
        ours = np.asarray(ours, dtype=np.int64 if integers else np.float64)
        book = np.asarray(book, dtype=np.int64 if integers else np.float64)
        if ours.shape != book.shape:
            self.line(f"  {label}: ours {list(ours.shape)}, book {list(book.shape)}")
            return self.check(f"{label}: shape", False, "shapes differ")
        diff = float(np.max(np.abs(ours - book))) if ours.size else 0.0
        ok = diff <= atol
        mark = self.marks[0] if ok else self.marks[1]
        self.line(f"  {label}")
        if ours.ndim <= 1:
            self.line(f"    ours {_fmt(ours)}")
            self.line(f"    book {_fmt(book)}  {mark} max |diff| {diff:.1e}")
        else:
            width = len(_fmt(ours[0]))
            self.line(f"    {'ours':<{width}}   book")
            for row_ours, row_book in zip(ours, book, strict=True):
                row_ok = float(np.max(np.abs(row_ours - row_book))) <= atol
                row_mark = self.marks[0] if row_ok else self.marks[1]
                self.line(f"    {_fmt(row_ours)}   {_fmt(row_book)}  {row_mark}")
            self.line(f"    max |diff| {diff:.1e}")
        self.checks += 1
        if not ok:
            self.failures.append(label)
        return ok

    def show(self, label: str, values) -> None:
        """Prints a tensor without a book value to compare with."""
        values = np.asarray(values)
        self.line(f"  {label}")
        for row in np.atleast_2d(values):
            self.line(f"    {_fmt(row)}")


def _fmt(values) -> str:
    values = np.asarray(values)
    if values.ndim == 0:
        return f"{float(values):.4f}"
    if values.dtype == bool or np.issubdtype(values.dtype, np.integer):
        return "[" + " ".join(str(int(v)) for v in values) + "]"
    return (
        "["
        + " ".join(f"{float(v):7.4f}" if np.isfinite(v) else f"{float(v):>7}" for v in values)
        + "]"
    )


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- part one: the chapter -----------------------------------------------------------------


# Part one's functions, each jit-compiled on first use: one program per function and shape
# instead of one per eager op (a few dozen fewer compiles per run). What they compute is
# the same; the printed values (4 decimals) and checks do not change.
@functools.cache
def _compiled(name: str):
    return jax.jit(getattr(F, name), static_argnames=("rate",) if name == "dropout" else ())


class _CompiledFunctional:
    """``_F.softmax`` is ``F.softmax`` under :func:`jax.jit` (cached per function)."""

    def __getattr__(self, name: str):
        return _compiled(name)


_F = _CompiledFunctional()
_apply = jax.jit(lambda module, variables, x: module.apply(variables, x), static_argnums=0)


def section_3_3_1(report: Report, inputs):
    report.heading("3.3.1  Attention for one query, x^(2) = 'journey', without trainable weights")
    book = BOOK["3.3.1"]
    query = inputs[book["query_index"]]
    scores = _F.attention_scores_for_query(query, inputs)
    report.compare(
        "scores w_2i = x^(2) . x^(i)   F.attention_scores_for_query", scores, book["attn_scores_2"]
    )
    by_sum = _F.normalize_by_sum(scores)
    report.compare(
        "weights, normalised by the sum   F.normalize_by_sum",
        by_sum,
        book["attn_weights_2_sum_normalized"],
    )
    naive = _F.naive_softmax(scores)
    report.compare(
        "weights, naive softmax exp(x)/sum(exp(x))   F.naive_softmax",
        naive,
        book["attn_weights_2_softmax"],
    )
    weights = _F.softmax(scores)
    report.compare(
        "weights, stable softmax (max subtracted first)   F.softmax",
        weights,
        book["attn_weights_2_softmax"],
    )

    limit = math.log(float(np.finfo(np.float32).max))
    large = scores * 100.0
    naive_large, stable_large = _F.naive_softmax(large), _F.softmax(large)
    report.line(
        f"  the same scores x 100 (largest {float(large.max()):.1f}; exp overflows "
        f"float32 above {limit:.2f}):"
    )
    report.line(f"    naive  {_fmt(naive_large)}")
    report.line(f"    stable {_fmt(stable_large)}")
    report.check(
        "naive softmax overflows (inf/inf = nan), the stable one does not",
        bool(np.isnan(naive_large).any())
        and bool(np.isfinite(stable_large).all())
        and abs(float(stable_large.sum()) - 1.0) < 1e-6,
    )
    context = _F.context_vector(weights, inputs)
    report.compare(
        "context vector z^(2) = sum_i a_2i x^(i)   F.context_vector", context, book["context_vec_2"]
    )
    return context


def section_3_3_2(report: Report, inputs, context_2):
    report.heading("3.3.2  All tokens at once: one matrix product per step")
    book = BOOK["3.3.2"]
    scores = _F.attention_scores(inputs, inputs)
    report.compare("scores = inputs @ inputs.T   F.attention_scores", scores, book["attn_scores"])
    weights = _F.attention_weights(scores)
    report.compare(
        "weights = softmax(scores, rows)   F.attention_weights", weights, book["attn_weights"]
    )
    report.check(
        "every row of the weights sums to 1", _max_diff(weights.sum(-1), np.ones(6)) < 1e-6
    )
    contexts = _F.context_vectors(weights, inputs)
    report.compare(
        "context vectors = weights @ inputs   F.context_vectors", contexts, book["all_context_vecs"]
    )
    report.check("row 2 is 3.3.1's z^(2)", _max_diff(contexts[1], context_2) <= SAME_ATOL)
    report.check(
        "F.simplified_self_attention(inputs) gives the same in one call",
        _max_diff(_F.simplified_self_attention(inputs), contexts) <= SAME_ATOL,
    )
    return weights


def section_3_4_1(report: Report, inputs):
    report.heading("3.4.1  Self-attention with trainable weights (the book's W matrices)")
    book = BOOK["3.4.1"]
    params = {
        name: jnp.asarray(book[name], jnp.float32) for name in ("W_query", "W_key", "W_value")
    }
    report.line("  W_query, W_key, W_value: the [3, 2] matrices torch.manual_seed(123) draws")
    query_2 = _F.dense(inputs[1], params["W_query"])
    report.compare("query_2 = x^(2) @ W_query   F.dense", query_2, book["query_2"])
    keys = _F.dense(inputs, params["W_key"])
    values = _F.dense(inputs, params["W_value"])
    report.line(f"  keys.shape {tuple(keys.shape)}, values.shape {tuple(values.shape)}")
    scores_2 = _F.attention_scores_for_query(query_2, keys)
    report.compare("attn_score_22 = query_2 . keys[1]", scores_2[1], book["attn_score_22"])
    report.compare("attn_scores_2 = query_2 @ keys.T", scores_2, book["attn_scores_2"])
    d_k = keys.shape[-1]
    weights_2 = _F.softmax(scores_2 / d_k**0.5)
    report.compare(
        "attn_weights_2 = softmax(scores / sqrt(d_k)), d_k = 2", weights_2, book["attn_weights_2"]
    )
    context_2 = _F.context_vector(weights_2, values)
    report.compare("context_vec_2 = attn_weights_2 @ values", context_2, book["context_vec_2"])

    functional_out = _F.self_attention(inputs, params)
    report.check(
        "F.self_attention(inputs, W) row 2 is context_vec_2",
        _max_diff(functional_out[1], context_2) <= SAME_ATOL,
    )
    module = ja.SelfAttentionV1(d_in=3, d_out=2)
    module_out = _apply(module, {"params": params}, inputs)
    report.compare(
        "SelfAttentionV1(3, 2) with these W, all six tokens   (Flax module)",
        module_out,
        book["self_attention_v1_output"],
    )
    report.check(
        "module output equals F.self_attention", _max_diff(module_out, functional_out) <= SAME_ATOL
    )
    return params


def section_3_5_1(report: Report, inputs, params):
    report.heading("3.5.1  Causal attention: hide the future, two ways")
    mask = ja.make_causal_mask(6)
    report.compare(
        "mask = ja.make_causal_mask(6)   (book: torch.tril(torch.ones(6, 6)))",
        mask.astype(np.int32),
        BOOK["3.5.1"]["mask_simple_tril"],
        atol=0,
    )
    queries = _F.dense(inputs, params["W_query"])
    keys = _F.dense(inputs, params["W_key"])
    scores = _F.scaled_attention_scores(queries, keys)
    report.line("  scores from 3.4.1's W, scaled by 1/sqrt(2) (the book uses SelfAttention_v2 with")
    report.line("  torch.manual_seed(789) here: PyTorch's random weights, so its numbers differ)")
    by_renormalizing = _F.causal_weights_by_renormalizing(scores)
    report.show(
        "way 1: softmax, zero above the diagonal, divide rows by their sums   "
        "F.causal_weights_by_renormalizing",
        by_renormalizing,
    )
    by_masking = _F.causal_weights_by_masking(scores)
    report.show(
        "way 2: large negative above the diagonal, then softmax   F.causal_weights_by_masking",
        by_masking,
    )
    diff = _max_diff(by_renormalizing, by_masking)
    report.check("the two ways agree", diff <= SAME_ATOL, f"max |diff| {diff:.1e}")
    future = np.asarray(by_masking)[~np.asarray(mask)]
    report.check(
        "no weight on a future token, every row sums to 1",
        bool((future == 0).all()) and _max_diff(by_masking.sum(-1), np.ones(6)) < 1e-6,
    )
    return by_masking


def section_3_5_2(report: Report, causal_weights):
    report.heading("3.5.2  Dropout on the attention weights, rate 0.5")
    rate, key = 0.5, jax.random.key(123)
    dropped_ones = _F.dropout(jnp.ones((6, 6)), rate, key)
    report.show("F.dropout(ones(6, 6), 0.5, jax.random.key(123))", dropped_ones)
    values = np.unique(np.asarray(dropped_ones))
    kept = int((np.asarray(dropped_ones) != 0).sum())
    report.check(
        "kept values are scaled to 1 / (1 - 0.5) = 2, the others are 0",
        set(values.tolist()) <= {0.0, 2.0},
        f"{kept} of 36 kept",
    )
    report.line("  The book's pattern comes from PyTorch's RNG (torch.manual_seed(123)); JAX's")
    report.line("  counter-based RNG draws a different one, so the positions cannot match bitwise.")
    dropped = _F.dropout(causal_weights, rate, key)
    report.show("the same key on 3.5.1's causal weights", dropped)
    keep = np.asarray(dropped_ones) != 0
    report.check(
        "same key, same positions; kept weights doubled",
        _max_diff(dropped, np.where(keep, 2 * np.asarray(causal_weights), 0)) <= SAME_ATOL,
    )


def _check_shape(report: Report, label: str, out, book_shape) -> None:
    report.check(
        f"{label} -> {tuple(out.shape)}  (book: torch.Size({list(book_shape)}))",
        tuple(out.shape) == tuple(book_shape),
    )


# Each call compiled whole (much faster than op by op), once per process.
@partial(jax.jit, static_argnums=0)
def _init_and_apply(module, key, x):
    params = module.init(key, x)["params"]
    return params, module.apply({"params": params}, x, deterministic=True)


_single_head_attention = jax.jit(F.single_head_attention, static_argnames="is_causal")
_multi_head_attention_stacked = jax.jit(F.multi_head_attention_stacked, static_argnames="is_causal")
_multi_head_attention = jax.jit(F.multi_head_attention, static_argnames=("num_heads", "is_causal"))


def section_3_5_3_and_3_6(report: Report, inputs, book_cfg):
    report.heading("3.5.3 / 3.6  The Flax modules on a batch of two copies of the sentence")
    a = book_cfg.attention
    args = (a.d_in, a.d_out, a.context_length, a.dropout)
    batch = jnp.stack([inputs, inputs])
    report.line(
        f"  batch.shape {tuple(batch.shape)}; configs/book.toml: d_in {a.d_in}, "
        f"d_out {a.d_out}, context_length {a.context_length}, dropout {a.dropout}, "
        f"num_heads {a.num_heads}"
    )
    key = jax.random.key(0)

    signature = ", ".join(map(str, args))

    def stacked_heads(params):
        heads = (params[f"heads_{i}"] for i in range(a.num_heads))
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *heads)

    # (module, its label, book section of the shape, functional equivalent, its name);
    # the single-sequence functions are compared with the batch's first row
    steps = (
        (
            ja.CausalAttention(*args, a.qkv_bias),
            f"CausalAttention({signature})",
            "3.5.3",
            lambda p: _single_head_attention(inputs, p, is_causal=True),
            "F.single_head_attention(..., is_causal=True) with its params",
        ),
        (
            ja.MultiHeadAttentionWrapper(*args, a.num_heads, a.qkv_bias),
            f"MultiHeadAttentionWrapper({signature}, num_heads={a.num_heads})",
            "3.6.1",
            lambda p: _multi_head_attention_stacked(inputs, stacked_heads(p), is_causal=True),
            "F.multi_head_attention_stacked (heads lifted with jax.vmap)",
        ),
        (
            ja.MultiHeadAttention(*args, a.num_heads, a.qkv_bias),
            f"MultiHeadAttention({signature}, num_heads={a.num_heads})",
            "3.6.2",
            lambda p: _multi_head_attention(batch, p, num_heads=a.num_heads, is_causal=True),
            "F.multi_head_attention (one projection split into heads)",
        ),
    )
    for module, label, section, functional_fn, functional_name in steps:
        params, out = _init_and_apply(module, key, batch)
        _check_shape(report, label, out, BOOK["shapes"][section])
        functional_out = functional_fn(params)
        ours = out if functional_out.ndim == out.ndim else out[0]
        report.check(f"equals {functional_name}", _max_diff(ours, functional_out) <= SAME_ATOL)


def parameter_count(module, d_in: int) -> int:
    """Number of parameters of ``module`` (shapes only: nothing is allocated)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1, d_in)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def exercise_3_3(report: Report):
    report.heading("Exercise 3.3  GPT-2-sized MultiHeadAttention(768, 768, 1024, 0.0, 12)")
    count = parameter_count(ja.MultiHeadAttention(768, 768, 1024, 0.0, 12), 768)
    book = BOOK["exercise_3.3"]["parameter_count"]
    report.check(
        f"{count:,} parameters (book: {book:,} = 3 * 768 * 768 + 768 * 768 + 768)", count == book
    )


def walk_the_chapter(report: Report, book_cfg):
    """Part one; returns the 3.3.2 attention weights ``[6, 6]``."""
    inputs = jnp.asarray(INPUTS, jnp.float32)
    report.line(f'Inputs: "{SENTENCE}", six tokens embedded in 3 dimensions (section 3.3.1)')
    for token, row in zip(TOKENS, INPUTS, strict=True):
        report.line(f"  {token:<8} {_fmt(row)}")
    # Full float32 matmuls: GPUs and TPUs may default to TF32 or bfloat16 passes.
    with jax.default_matmul_precision("float32"):
        context_2 = section_3_3_1(report, inputs)
        weights = section_3_3_2(report, inputs, context_2)
        params = section_3_4_1(report, inputs)
        causal_weights = section_3_5_1(report, inputs, params)
        section_3_5_2(report, causal_weights)
        section_3_5_3_and_3_6(report, inputs, book_cfg)
        exercise_3_3(report)
    return weights


# --- part two: GPT-2 attention, jit-compiled ------------------------------------------------


def reference_multi_head_attention(params, x, num_heads: int):
    """Causal multi-head attention ``[B, T, D]`` -> ``[B, T, D]`` through the einsum oracle.

    Same projections as ``MultiHeadAttention`` (``params`` are its Flax params), attention
    by :func:`jax_attn.reference.dot_product_attention`.
    """
    # [B, T, N, H]
    queries = F.split_heads(F.dense(x, params["W_query"]), num_heads)
    keys = F.split_heads(F.dense(x, params["W_key"]), num_heads)
    values = F.split_heads(F.dense(x, params["W_value"]), num_heads)
    context = ja.reference.dot_product_attention(queries, keys, values, is_causal=True)
    return F.dense(F.merge_heads(context), params["out_proj"])


def _tolerance(dtype: str, platform: str) -> tuple[float, float]:
    if dtype == "float32":
        return REFERENCE_TOLERANCE[("float32", "cpu" if platform == "cpu" else "other")]
    return REFERENCE_TOLERANCE[(dtype, "any")]


def run_gpt2(report: Report, cfg, runs: int) -> None:
    """Part two: the config's multi-head attention, jit-compiled, against the reference."""
    a, run = cfg.attention, cfg.run
    device = jax.devices()[0]
    report.heading(f"{a.name}: MultiHeadAttention jit-compiled on {device.platform.upper()}")
    report.line(
        f"  device: {device} ({device.device_kind}); "
        f"{jax.device_count()} device(s) of backend {jax.default_backend()!r}"
    )
    report.line(
        f"  config: d_in {a.d_in}, d_out {a.d_out}, {a.num_heads} heads of {a.head_dim}, "
        f"context_length {a.context_length}, qkv_bias {a.qkv_bias}, dropout {a.dropout} "
        "(eval mode: off)"
    )
    dtype = jnp.dtype(run.dtype)
    B, T, D = run.batch, run.seq_len, a.d_in
    module = a.multi_head_attention(deterministic=True)
    param_key, input_key = jax.random.split(jax.random.key(0))
    x = jax.random.normal(input_key, (B, T, D), jnp.float32).astype(dtype)
    params = jax.jit(module.init)(param_key, x[:, :1])["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    count = sum(p.size for p in jax.tree.leaves(params))
    heads = jnp.zeros((B, T, a.num_heads, a.head_dim), dtype)
    call = ja.validation.check_attention_args(heads, heads, heads, is_causal=True)
    implementation = ja.dispatch.select_implementation(call)
    report.line(
        f"  input x [{B}, {T}, {D}] {run.dtype}; {count:,} parameters; attention "
        f"implementation {implementation!r}"
    )

    forward = jax.jit(lambda params, x: module.apply({"params": params}, x))
    start = time.perf_counter()
    compiled = forward.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(compiled(params, x))
    run_s = median_seconds(lambda: jax.block_until_ready(compiled(params, x)), runs, warmup=0)

    reference = jax.jit(reference_multi_head_attention, static_argnums=2)
    with jax.default_matmul_precision("float32"):
        expected = reference(params, x, a.num_heads)
    ours, want = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    rtol, atol = _tolerance(run.dtype, device.platform)
    diff = float(np.max(np.abs(ours - want)))
    finite = bool(np.isfinite(ours).all())
    report.check(
        "output equals the einsum reference (ja.reference.dot_product_attention on the same "
        "projections)",
        finite and np.allclose(ours, want, rtol=rtol, atol=atol),
        f"max |diff| {diff:.1e}, tolerance rtol {rtol:g} atol {atol:g}"
        + ("" if finite else "; output is not finite"),
    )
    flops = 4 * 2 * B * T * D * a.d_out + 2 * 2 * B * a.num_heads * T * T * a.head_dim
    report.line(f"  compile time: {format_seconds(compile_s)} (jax.jit(...).lower().compile())")
    rate = flops / run_s
    rate_text = f"{rate / 1e9:.1f} GFLOP/s" if rate >= 1e9 else f"{rate / 1e6:.1f} MFLOP/s"
    report.line(
        f"  run time:     {format_seconds(run_s)} (median of {runs} "
        f"run{'s' if runs > 1 else ''} after one warm-up; {rate_text} counting the "
        "full T x T)"
    )


# --- heatmap --------------------------------------------------------------------------------


def write_heatmap(report: Report, weights, out_dir: Path) -> Path | None:
    """Writes ``attention_weights.png`` when matplotlib is installed; returns its path."""
    from jax_attn.apps.extras import MissingExtra
    from jax_attn.apps.plots import plot_attention

    try:
        fig = plot_attention(
            np.asarray(weights),
            list(TOKENS),
            title="3.3.2 attention weights (simplified self-attention)",
        )
    except MissingExtra as error:
        report.line(f"  no heatmap: {error}")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "attention_weights.png"
    fig.savefig(path, dpi=120)
    report.line(f"  heatmap of the 3.3.2 weights: {path}")
    return path


# --- command line ----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="jax-attn demo",
        description="Walk chapter 3 on the book's sentence, then run GPT-2 attention "
        "jit-compiled and check it against the einsum reference.",
    )
    parser.add_argument(
        "--config",
        default="configs/gpt2-small.toml",
        help="config for the multi-head attention run: a file, or the name of "
        "a shipped one (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, book); "
        "default %(default)s",
    )
    parser.add_argument(
        "--out",
        default="out/demo",
        type=Path,
        help="folder for the heatmap PNG (default %(default)s)",
    )
    parser.add_argument("--batch", type=int, help="override the config's run.batch")
    parser.add_argument("--seq-len", type=int, help="override the config's run.seq_len")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="override the config's run.dtype",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs after the warm-up (default %(default)s)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the heatmap")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "runs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config)
        book_cfg = load_config("book")
        overrides = {"batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **overrides))
    except (ConfigError, ValueError) as e:
        print(f"jax-attn demo: {e}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    report = Report()
    report.line("jax-attn demo: chapter 3 of 'Build a Large Language Model (From Scratch)' in JAX")
    report.line(
        f"jax {jax.__version__}, default device {jax.devices()[0]} ({jax.devices()[0].device_kind})"
    )
    report.line(
        f"{report.marks[0]} = matches the value the book prints (4 decimals: within "
        f"{BOOK_ATOL:g}) or the check holds; {report.marks[1]} = it does not"
    )
    report.line()
    weights = walk_the_chapter(report, book_cfg)
    book_checks, book_failures = report.checks, len(report.failures)
    if not args.no_plot:
        report.heading("Heatmap")
        write_heatmap(report, weights, args.out)
    run_gpt2(report, cfg, args.runs)

    report.line()
    report.line(
        f"book steps: {book_checks - book_failures} of {book_checks} checks passed; "
        f"all checks: {report.checks - len(report.failures)} of {report.checks}; "
        f"{time.perf_counter() - started:.1f} s in all"
    )
    if report.failures:
        report.line("FAILED: " + "; ".join(report.failures))
        return 1
    report.line("everything matches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
