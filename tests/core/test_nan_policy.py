"""One NaN policy for every implementation (docs/reliability.md, "NaN policy").

Masked positions (padding past the lengths, causal, window, ``mask=``, ``mask_fn``, a
``bias`` of -inf) never change any output or gradient, even when they hold NaN or Inf; a
non-finite value at a live position makes exactly the outputs that attend it NaN. Each
case runs every implementation available here (``ring`` on a 2-device ``seq`` mesh, the
Pallas kernels in interpret mode) under ``jax.jit``; the expected rows come from masks
built with numpy below, the clean outputs and gradients from the same implementation on
the same inputs without the poison.
"""

import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_qkv

import jax_attn as ja
from jax_attn import dispatch, sharding
from jax_attn.kernels import chunked, pallas_gpu
from jax_attn.validation import check_attention_args

B, T, S, N, K, H = 2, 8, 8, 4, 2, 8  # GQA: query heads 0, 1 read kv head 0; 2, 3 kv head 1
PALLAS = ("pallas_gpu", "pallas_tpu")
AVAILABLE = [name for name in ja.available_implementations() if name not in PALLAS]
# The default suite runs the oracle and the CPU defaults (reference, chunked, cpu_flash); the
# slow step every implementation (ring needs a mesh, Pallas interpret mode compiles slowly).
SLOW = (*PALLAS, "ring", "xla")
EVERY_PALLAS_SLOW = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in [*AVAILABLE, *PALLAS]
]
EVERY = EVERY_PALLAS_SLOW


@pytest.fixture(params=EVERY_PALLAS_SLOW)
def implementation(request, monkeypatch):
    if request.param in PALLAS:
        monkeypatch.setenv(pallas_gpu.INTERPRET_ENV, "1")
    return request.param


def _context(implementation):
    """Where ``implementation`` runs: ring needs a mesh with a ``seq`` axis."""
    if implementation == "ring":
        return jax.set_mesh(sharding.make_mesh(seq=2, devices=jax.devices()[:2]))
    return contextlib.nullcontext()


def _serve_or_skip(implementation, q, k, v, **options):
    call = check_attention_args(q, k, v, **options)
    with _context(implementation):
        reason = dispatch.unsupported_reason(implementation, call)
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")


@functools.partial(jax.jit, static_argnames=("implementation", "options"))
def _out_and_grads(q, k, v, cotangent, arrays, *, implementation, options):
    """The output and the gradients wrt q, k, v of ``sum(out * cotangent)``."""

    def attend(q, k, v):
        return ja.dot_product_attention(
            q, k, v, implementation=implementation, **dict(options), **arrays
        )

    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


def _run(implementation, q, k, v, cotangent=None, arrays=None, **options):
    cotangent = jnp.ones((B, T, N, H), q.dtype) if cotangent is None else cotangent
    with _context(implementation):
        out, grads = _out_and_grads(
            q,
            k,
            v,
            cotangent,
            arrays or {},
            implementation=implementation,
            options=tuple(sorted(options.items())),
        )
    return np.array(out), [np.array(g) for g in grads]


def _allowed(is_causal=False, window=None, q_lengths=None, kv_lengths=None, mask=None):
    """bool ``[B, N, T, S]``: which key each query row attends, built with numpy."""
    t = np.arange(T)[:, None] + (S - T)
    s = np.arange(S)[None, :]
    allowed = np.ones((B, N, T, S), bool)
    if is_causal:
        allowed &= s <= t
    if window is not None:
        allowed &= (t - s <= window[0]) & (s - t <= window[1])
    if q_lengths is not None:
        allowed &= np.arange(T)[None, None, :, None] < np.asarray(q_lengths)[:, None, None, None]
    if kv_lengths is not None:
        allowed &= np.arange(S)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None]
    if mask is not None:
        allowed &= np.asarray(mask)
    return allowed


def _expected_nan_rows(allowed, bad_q=None, bad_kv=None):
    """bool ``[B, T, N]``: rows whose q row is bad and attend a key, or attend a bad key
    (``bad_q [B, T, N]``, ``bad_kv [B, S, K]``)."""
    bad_kv = np.zeros((B, S, K), bool) if bad_kv is None else bad_kv
    bad_q = np.zeros((B, T, N), bool) if bad_q is None else bad_q
    # [B, S, K] -> [B, N, 1, S]: each query head sees its kv head's keys
    bad_keys = np.repeat(np.transpose(bad_kv, (0, 2, 1)), N // K, axis=1)[:, :, None, :]
    attends_bad = np.any(allowed & bad_keys, axis=-1)  # [B, N, T]
    live = np.any(allowed, axis=-1)
    hit = attends_bad | (np.transpose(bad_q, (0, 2, 1)) & live)
    return np.transpose(hit, (0, 2, 1))


def _assert_rows(got, clean, nan_rows, what):
    """Rows in ``nan_rows`` are all NaN, every other row equals ``clean`` and is finite."""
    assert np.isnan(got[nan_rows]).all(), f"{what}: rows that attend a non-finite value"
    keep = ~nan_rows
    assert np.isfinite(got[keep]).all(), f"{what}: NaN/Inf leaked into other rows"
    np.testing.assert_allclose(got[keep], clean[keep], rtol=1e-6, atol=1e-6, err_msg=what)


def _inputs(seed=0):
    return make_qkv(B=B, T=T, S=S, N=N, K=K, H=H, seed=seed)


# --- padding: never seen, forward or backward --------------------------------------------


@pytest.mark.parametrize("implementation", EVERY, indirect=True)
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_padding_changes_no_output_or_gradient(implementation, poison):
    q, k, v = _inputs()
    arrays = dict(
        query_seq_lengths=jnp.array([T, 6]),
        key_value_seq_lengths=jnp.array([S, 4]) if implementation != "pallas_gpu" else None,
    )
    arrays = {name: value for name, value in arrays.items() if value is not None}
    _serve_or_skip(implementation, q, k, v, is_causal=True, **arrays)
    clean_out, clean_grads = _run(implementation, q, k, v, arrays=arrays, is_causal=True)
    q_bad = q.at[1, 6:].set(poison)
    k_bad, v_bad = k, v
    if "key_value_seq_lengths" in arrays:
        k_bad, v_bad = k.at[1, 4:].set(poison), v.at[1, 4:, 1].set(poison)
    out, grads = _run(implementation, q_bad, k_bad, v_bad, arrays=arrays, is_causal=True)
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (clean_out, *clean_grads), strict=True
    ):
        assert np.isfinite(got).all(), f"{implementation} {name}"
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


# --- a non-finite key masked for some rows -----------------------------------------------


_MASK = np.random.default_rng(5).random((B, 1, T, S)) < 0.6
_MASK[..., 0] = True  # every row attends something


def _first_keys(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx // 2


MASKED_CASES = {
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(1, 2)),
    "causal-window": dict(is_causal=True, local_window_size=(2, 0)),
    "mask": dict(mask=jnp.asarray(np.broadcast_to(_MASK, (B, N, T, S)))),
    "mask_fn": dict(mask_fn=_first_keys),
}


def _allowed_for(options):
    window = options.get("local_window_size")
    mask = options.get("mask")
    if "mask_fn" in options:
        mask = np.arange(S)[None, :] <= np.arange(T)[:, None] // 2
    return _allowed(options.get("is_causal", False), window, mask=mask)


@pytest.mark.parametrize("implementation", EVERY, indirect=True)
@pytest.mark.parametrize("case", sorted(MASKED_CASES))
def test_non_finite_key_reaches_exactly_the_rows_that_attend_it(implementation, case):
    """NaN in k of key 5 and Inf in v of key 2 (batch 0, kv head 0): the rows that attend
    either are NaN, the others and their q-gradients equal the clean call's."""
    options = MASKED_CASES[case]
    arrays = {name: options[name] for name in ("mask",) if name in options}
    static = {name: value for name, value in options.items() if name not in arrays}
    q, k, v = _inputs(seed=1)
    _serve_or_skip(implementation, q, k, v, **options)
    k_bad = k.at[0, 5, 0, 3].set(jnp.nan)
    v_bad = v.at[0, 2, 0, 1].set(jnp.inf)
    bad_kv = np.zeros((B, S, K), bool)
    bad_kv[0, [2, 5], 0] = True
    nan_rows = _expected_nan_rows(_allowed_for(options), bad_kv=bad_kv)
    assert nan_rows.any() and not nan_rows.all()
    # the loss covers the clean rows only: their q-gradients equal the clean call's
    cotangent = jnp.asarray(np.where(nan_rows[..., None], 0.0, np.ones((B, T, N, H))), jnp.float32)
    clean_out, clean_grads = _run(implementation, q, k, v, cotangent, arrays, **static)
    out, grads = _run(implementation, q, k_bad, v_bad, cotangent, arrays, **static)
    _assert_rows(out, clean_out, nan_rows, f"{implementation} {case} out")
    np.testing.assert_allclose(grads[0], clean_grads[0], rtol=1e-5, atol=1e-6, err_msg="dq")
    for grad in grads:
        assert np.isfinite(grad).all()


def test_non_finite_query_makes_only_its_row_nan(implementation):
    q, k, v = _inputs(seed=2)
    arrays = {"query_seq_lengths": jnp.array([T, 5])}
    _serve_or_skip(implementation, q, k, v, is_causal=True, **arrays)
    # batch 0 row 3 head 1: live; batch 1 row 6 head 2: padding (past the query length 5)
    q_bad = q.at[0, 3, 1, 0].set(jnp.nan).at[1, 6, 2, 4].set(jnp.inf)
    bad_q = np.zeros((B, T, N), bool)
    bad_q[0, 3, 1] = bad_q[1, 6, 2] = True
    nan_rows = _expected_nan_rows(_allowed(True, q_lengths=[T, 5]), bad_q=bad_q)
    assert nan_rows.sum() == 1
    clean_out, _ = _run(implementation, q, k, v, arrays=arrays, is_causal=True)
    out, grads = _run(implementation, q_bad, k, v, arrays=arrays, is_causal=True)
    _assert_rows(out, clean_out, nan_rows, implementation)
    for grad in grads:
        assert np.isfinite(grad).all()


def test_gradients_treat_non_finite_entries_as_zero_and_nan_rows_as_constants(implementation):
    """The documented gradient: that of the call with the non-finite entries replaced by
    0 and no cotangent on the NaN rows (a NaN output depends on nothing)."""
    q, k, v = _inputs(seed=3)
    _serve_or_skip(implementation, q, k, v, is_causal=True)
    k_bad = k.at[0, 4, 1].set(jnp.nan)
    bad_kv = np.zeros((B, S, K), bool)
    bad_kv[0, 4, 1] = True
    nan_rows = _expected_nan_rows(_allowed(True), bad_kv=bad_kv)
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, N, H)), jnp.float32)
    _, grads = _run(implementation, q, k_bad, v, cotangent, is_causal=True)
    dropped = jnp.where(jnp.asarray(nan_rows)[..., None], jnp.zeros((), jnp.float32), cotangent)
    _, want = _run(implementation, q, k.at[0, 4, 1].set(0.0), v, dropped, is_causal=True)
    want[1][0, 4, 1] = 0.0  # the NaN entries themselves get no gradient
    for name, got, wanted in zip("qkv", grads, want, strict=True):
        np.testing.assert_allclose(got, wanted, rtol=1e-5, atol=1e-6, err_msg=name)


# --- bias --------------------------------------------------------------------------------


def test_bias_non_finite_where_masked_changes_nothing_and_where_live_one_row(implementation):
    q, k, v = _inputs(seed=4)
    bias = np.random.default_rng(1).standard_normal((B, N, T, S)).astype(np.float32)
    _serve_or_skip(implementation, q, k, v, bias=jnp.asarray(bias), is_causal=True)
    bias[0, 1, 0, 0] = -np.inf  # masks key 0 for that row
    masked = bias.copy()
    masked[1, 2, 2, 5] = np.nan  # causal-masked
    masked[0, 0, 3, 7] = np.inf  # causal-masked
    v_bad = v.at[0, 0, 0, 0].set(jnp.nan)  # key 0 is -inf-masked for (b 0, head 1, row 0) only
    live = masked.copy()
    live[1, 3, 6, 2] = np.nan  # live: row 6 of head 3 in batch 1
    clean_out, clean_grads = _run(
        implementation, q, k, v, arrays={"bias": jnp.asarray(bias)}, is_causal=True
    )
    out, grads = _run(implementation, q, k, v, arrays={"bias": jnp.asarray(masked)}, is_causal=True)
    for got, want in zip((out, *grads), (clean_out, *clean_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    nan_rows = np.zeros((B, T, N), bool)
    nan_rows[1, 6, 3] = True
    out, _ = _run(implementation, q, k, v, arrays={"bias": jnp.asarray(live)}, is_causal=True)
    _assert_rows(out, clean_out, nan_rows, f"{implementation} live bias")
    # a NaN value at a key that bias -inf masks for one row: every other row of head 0, 1
    allowed = _allowed(True) & (bias > -np.inf)
    bad_kv = np.zeros((B, S, K), bool)
    bad_kv[0, 0, 0] = True
    nan_rows = _expected_nan_rows(allowed, bad_kv=bad_kv)
    assert not nan_rows[0, 0, 1] and nan_rows[0, 0, 0]
    out, _ = _run(implementation, q, k, v_bad, arrays={"bias": jnp.asarray(bias)}, is_causal=True)
    _assert_rows(out, clean_out, nan_rows, f"{implementation} -inf bias")


# --- transformations ---------------------------------------------------------------------


def test_vmap_follows_the_policy(implementation):
    """Under ``jax.vmap`` (the check becomes a select): clean and poisoned calls in one."""
    if implementation in (*PALLAS, "ring"):
        pytest.skip(f"{implementation}: vmap is exercised by its own tests")
    q, k, v = _inputs(seed=6)
    lengths = jnp.array([S, 3])
    _serve_or_skip(implementation, q, k, v, key_value_seq_lengths=lengths)
    k_bad = k.at[1, 5].set(jnp.nan).at[0, 1, 1].set(jnp.nan)  # padding; live in batch 0
    attend = functools.partial(
        ja.dot_product_attention, implementation=implementation, key_value_seq_lengths=lengths
    )
    both = jax.jit(jax.vmap(attend, in_axes=(None, 0, None)))(q, jnp.stack([k, k_bad]), v)
    bad_kv = np.zeros((B, S, K), bool)
    bad_kv[0, 1, 1] = True
    nan_rows = _expected_nan_rows(_allowed(kv_lengths=[S, 3]), bad_kv=bad_kv)
    clean = np.asarray(both[0])
    assert np.isfinite(clean).all()
    np.testing.assert_allclose(clean, attend(q, k, v), rtol=1e-6, atol=1e-6)
    _assert_rows(np.asarray(both[1]), clean, nan_rows, f"{implementation} vmap")


# --- windows beyond the sequence, empty head dims ----------------------------------------


@pytest.mark.parametrize(
    "implementation",
    [
        "cpu_flash",
        # chunked's second order is also in test_transformations' default set
        *(pytest.param(name, marks=pytest.mark.slow) for name in ("chunked", *PALLAS)),
    ],
    indirect=True,
)
def test_second_order_follows_the_policy(implementation):
    """A Hessian-vector product through a call with a non-finite key in the padding and a
    non-finite query at a live row equals the oracle's (the kernels zero-fill inside their
    derivative maps, the pure ones of second order included; the Pallas kernels through
    ``composable``). A kernel without key lengths gets its padding past a query length."""
    q, k, v = _inputs(seed=7)
    lengths = jnp.array([S, 5])
    options = dict(is_causal=True, key_value_seq_lengths=lengths)
    k_bad = k.at[1, 6, 0].set(jnp.nan)  # padding: past batch 1's 5 keys
    q_bad = q.at[0, 3, 2].set(jnp.inf)  # live: row 3 of head 2 becomes NaN
    call = check_attention_args(q, k, v, **options)
    with _context(implementation):
        if dispatch.unsupported_reason(implementation, call) is not None:
            options = dict(is_causal=True, query_seq_lengths=lengths)
            k_bad = k
            q_bad = q_bad.at[1, 6, 1].set(jnp.nan)  # padding: past batch 1's 5 queries
    _serve_or_skip(implementation, q, k, v, **options)

    def hvp(attend):
        def loss(q):
            out = attend(q, k_bad, v, **options)
            return jnp.sum(jnp.where(jnp.isfinite(out), out, jnp.zeros((), out.dtype)) ** 2)

        return jax.jit(lambda q: jax.jvp(jax.grad(loss), (q,), (jnp.ones_like(q),))[1])(q_bad)

    got = hvp(functools.partial(ja.dot_product_attention, implementation=implementation))
    want = hvp(ja.reference.dot_product_attention)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_policy_holds_no_residuals_of_its_own():
    """Compiled temporaries of ``chunked``'s forward + grad through the dispatcher (NaN
    policy included) exceed the kernel's own by less than one output: the policy's
    condition goes into the kernel's derivative maps, not around them as a ``lax.cond``,
    whose linearisation would carry both branches' residuals (several outputs' worth)."""
    shape = (2, 128, 2, 32)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    zeros = jnp.zeros(shape, jnp.float32)
    call = check_attention_args(zeros, zeros, zeros, is_causal=True)

    def kernel_alone(q, k, v):
        return chunked.chunked_attention(q, k, v, call=call)

    def dispatched(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")

    def temp_bytes(attend):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v) ** 2)

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    out_bytes = np.prod(shape) * 4
    extra = temp_bytes(dispatched) - temp_bytes(kernel_alone)
    assert extra < out_bytes, f"the policy adds {extra} bytes, one output is {out_bytes}"


@pytest.mark.parametrize(
    "window, same_as",
    [((sys.maxsize, sys.maxsize), None), ((sys.maxsize, 1), (T + S, 1))],
)
def test_windows_beyond_the_sequence_mean_no_limit(implementation, window, same_as):
    q, k, v = _inputs(seed=7)
    assert check_attention_args(q, k, v, local_window_size=window).window == same_as
    if same_as is not None:
        _serve_or_skip(implementation, q, k, v, local_window_size=same_as)
    else:
        _serve_or_skip(implementation, q, k, v)
    want, want_grads = _run(implementation, q, k, v, local_window_size=same_as)
    got, grads = _run(implementation, q, k, v, local_window_size=window)
    reference, _ = _run("reference", q, k, v, local_window_size=same_as)
    np.testing.assert_array_equal(got, want)
    for got_grad, want_grad in zip(grads, want_grads, strict=True):
        np.testing.assert_array_equal(got_grad, want_grad)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shapes, argument",
    [
        (((1, 3, 2, 0), (1, 4, 1, 0), (1, 4, 1, 4)), "query"),
        (((3, 2, 4), (4, 1, 4), (4, 1, 0)), "value"),
    ],
)
@pytest.mark.parametrize("entry", [ja.dot_product_attention, ja.reference.dot_product_attention])
def test_empty_head_dims_are_refused(shapes, argument, entry):
    q, k, v = (jnp.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=f"{argument} must have head dim"):
        entry(q, k, v)
