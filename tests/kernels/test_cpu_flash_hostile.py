"""The compiled kernel ("cpu_flash") under hostile conditions: failed allocations, a
corrupt or read-only library cache, windows near ``sys.maxsize``, empty head dims, tiny
sequences' memory. Whatever happens must be a Python exception or the reference's answer,
never a dead process; the tests that could kill a process run in a fresh one."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, allowed_error, attention_float64, child_peak, make_qkv

import jax_attn as ja
from jax_attn.kernels import cpu_flash
from jax_attn.validation import check_attention_args

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu"
    or (cpu_flash.build_reason() is not None and cpu_flash._compiler() is None),
    reason=f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}",
)
MiB = 2**20


def _run_child(code: str, env: dict | None = None, timeout: int = 300):
    """Runs ``code`` in a fresh Python with this checkout on the path; returns the
    completed process (a crash shows as a negative or >128 return code)."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


FAILING_CALLS = """
    import os
    import jax, jax.numpy as jnp, numpy as np
    import jax_attn as ja

    rng = np.random.default_rng(0)
    # T 70, S 130: two query tiles, three key tiles (packed); several work items
    q = jnp.asarray(rng.standard_normal((2, 70, 4, 24), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, 130, 2, 24), np.float32)) for _ in "kv")

    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation="cpu_flash")

    grad = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2)))
    # a mask_fn's tiles through the kernel's tile operands
    def stripes(b, h, q_idx, kv_idx):
        return (q_idx + 2 * kv_idx + h) % 5 != 0

    def sparse(q, k, v):
        return ja.dot_product_attention(q, k, v, mask_fn=stripes, implementation="cpu_flash")

    sparse_grad = jax.jit(jax.grad(lambda q, k, v: sparse(q, k, v).sum(), argnums=(0, 1, 2)))
    want = ja.dot_product_attention(q, k, v, is_causal=True, implementation="reference")
    for where in ("scratch", "item"):
        os.environ["JAX_ATTN_CPU_FLASH_FAIL_ALLOC"] = where
        for name, run in (("forward", lambda: jax.jit(attend)(q, k, v)),
                          ("grad", lambda: grad(q, k, v)),
                          ("sparse_grad", lambda: sparse_grad(q, k, v))):
            try:
                jax.block_until_ready(run())
            except Exception as error:
                assert "cpu_flash" in str(error), str(error)
                print(where, name, "raised", type(error).__name__)
            else:
                print(where, name, "did not raise")
        # The switch off again, the same process computes as the reference does.
        del os.environ["JAX_ATTN_CPU_FLASH_FAIL_ALLOC"]
        out = jax.jit(attend)(q, k, v)
        print(where, "after", float(jnp.abs(out - want).max()))
"""


@pytest.mark.slow  # a fresh process per injected failure
def test_a_failed_allocation_is_a_python_error():
    # "scratch": the call's up-front allocation; "item": std::bad_alloc thrown inside
    # work items on pool threads and the calling thread (std::terminate or SIGSEGV
    # before the exceptions were contained). One fresh process for both.
    done = _run_child(FAILING_CALLS)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 8, lines
    for where, block in zip(("scratch", "item"), (lines[:4], lines[4:]), strict=True):
        assert block[0].startswith(f"{where} forward raised"), block
        assert block[1].startswith(f"{where} grad raised"), block
        assert block[2].startswith(f"{where} sparse_grad raised"), block
        assert float(block[3].split()[-1]) < 1e-5, block


def test_hostile_tile_tables_are_python_errors():
    """The handlers check the tile table and bitmasks before reading them: entries
    past the bitmasks or below the two markers, and tables or bitmasks of the wrong shape,
    are errors, never reads out of bounds."""
    from jax_attn.kernels import cpu_flash_tiles
    from jax_attn.validation import KernelInputs

    def stripes(b, h, q_idx, kv_idx):
        return (q_idx + 2 * kv_idx) % 5 != 0

    q, k, v = make_qkv(B=2, T=70, S=130, N=4, K=2, H=24)
    call = check_attention_args(q, k, v, mask_fn=stripes)
    lengths = (_lengths(2, 70), _lengths(2, 130))
    table, bits = cpu_flash_tiles.tile_table(call, KernelInputs(mask_fn=stripes))
    P = bits.shape[1]
    out, _ = cpu_flash.forward(call, q, k, v, *lengths, tiles=(table, bits))
    assert np.isfinite(np.asarray(out)).all()
    hostile = {
        "entry past the bitmasks": (table.at[1, 0, 1, 2].set(P), bits),
        "entry below the markers": (table.at[0, 0, 0, 0].set(-3), bits),
        "table of too few key tiles": (table[..., :2], bits),
        "bitmask rows of the wrong width": (table, bits[..., :64]),
        "bitmasks of another batch": (table, bits[:1]),
    }
    for name, (bad_table, bad_bits) in hostile.items():
        with pytest.raises(Exception, match="cpu_flash: tile table"):
            jax.block_until_ready(
                cpu_flash.forward(call, q, k, v, *lengths, tiles=(bad_table, bad_bits))
            )
        print(name, "raised")


def _call(q, k, v, **changes):
    return dataclasses.replace(check_attention_args(q, k, v), **changes)


def _lengths(B, full):
    return jnp.full((B,), full, jnp.int32)


def test_windows_near_maxsize_attend_like_no_window():
    # Called directly: the kernel must be safe whatever validation lets through.
    q, k, v = make_qkv(B=2, T=70, S=130, N=4, K=2, H=24, H_v=40)
    lengths = (_lengths(2, 70), _lengths(2, 130))
    want = attention_float64(q, k, v, is_causal=True)
    for window in [(sys.maxsize, sys.maxsize), (sys.maxsize, 0), (200, sys.maxsize - 1)]:
        call = _call(q, k, v, window=window, is_causal=True)
        got = cpu_flash._flash(call, q, k, v, *lengths)
        np.testing.assert_allclose(got, want, rtol=0, atol=allowed_error(q, k, v, want))
    huge = _call(q, k, v, window=(sys.maxsize, sys.maxsize))
    plain = _call(q, k, v)

    def grads(call):
        loss = lambda q, k, v: cpu_flash._flash(call, q, k, v, *lengths).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(huge), grads(plain), strict=True):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_empty_head_dims_are_safe():
    # H = 0: every logit is 0, so each row averages the values of the keys it attends.
    B, T, S, N, K = 2, 5, 7, 2, 1
    rng = np.random.default_rng(1)
    q, k = jnp.zeros((B, T, N, 0)), jnp.zeros((B, S, K, 0))
    v = jnp.asarray(rng.standard_normal((B, S, K, 8)), jnp.float32)
    kv_lengths = jnp.array([7, 3], jnp.int32)
    # validation refuses H = 0 (a ValueError naming query): the call is made for H = 1
    call = _call(jnp.zeros((B, T, N, 1)), jnp.zeros((B, S, K, 1)), v, scale=1.0, H=0)
    out = cpu_flash._flash(call, q, k, v, _lengths(B, T), kv_lengths)
    want = np.stack([np.asarray(v)[b, : int(n)].mean(0) for b, n in enumerate(kv_lengths)])
    np.testing.assert_allclose(out, np.broadcast_to(want[:, None], out.shape), atol=1e-6)
    dv = jax.grad(lambda v: cpu_flash._flash(call, q, k, v, _lengths(B, T), kv_lengths).sum())(v)
    assert bool(jnp.isfinite(dv).all()) and dv.shape == v.shape
    # H_v = 0: an empty output; the gradients of q and k are zeros.
    q, k = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(B, T, N, 8), (B, S, K, 8)])
    v = jnp.zeros((B, S, K, 0))
    call = _call(q, k, jnp.zeros((B, S, K, 1)), H_v=0)
    assert cpu_flash._flash(call, q, k, v, _lengths(B, T), kv_lengths).shape == (B, T, N, 0)
    loss = lambda q, k: cpu_flash._flash(call, q, k, v, _lengths(B, T), kv_lengths).sum()  # noqa: E731
    for grad in jax.grad(loss, argnums=(0, 1))(q, k):
        assert not bool(jnp.any(grad))


# ---- the library cache ------------------------------------------------------------------


def _good_build(tmp_path):
    """A copy of this process's built library and its checksum file in a fresh cache,
    at the path a build in that cache would use; returns the copy."""
    built = cpu_flash._build(cpu_flash._compiler())
    os.environ[cpu_flash.CACHE_ENV] = str(tmp_path)
    try:
        copy = cpu_flash._library_path(cpu_flash._compiler())
    finally:
        del os.environ[cpu_flash.CACHE_ENV]
    shutil.copy(built, copy)
    shutil.copy(cpu_flash._sidecar(built), cpu_flash._sidecar(copy))
    return copy


def test_a_good_cached_build_loads_without_writing(tmp_path, monkeypatch):
    copy = _good_build(tmp_path)
    monkeypatch.setenv(cpu_flash.CACHE_ENV, str(tmp_path))

    def read_only(path):
        raise PermissionError(f"read-only: {path}")

    # a read-only cache: no lock, no build, nothing written
    monkeypatch.setattr(cpu_flash, "_locked", read_only)
    assert cpu_flash._build(cpu_flash._compiler()) == copy


def test_a_truncated_library_is_never_loaded(tmp_path):
    # A cached library cut short (a full disk, a killed build) whose rebuild fails: the
    # process declines with the reason instead of dying of SIGBUS in the loader.
    library = _good_build(tmp_path)
    data = library.read_bytes()
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'no space left' >&2\nexit 1\n")
    fake.chmod(0o755)
    os.environ[cpu_flash.CACHE_ENV] = str(tmp_path)
    try:
        target = cpu_flash._library_path([str(fake)])
    finally:
        del os.environ[cpu_flash.CACHE_ENV]
    target.write_bytes(data[: len(data) // 2])
    shutil.copy(cpu_flash._sidecar(library), cpu_flash._sidecar(target))
    code = """
        from jax_attn.kernels import cpu_flash
        print(cpu_flash.build_reason())
    """
    done = _run_child(code, {"CXX": str(fake), cpu_flash.CACHE_ENV: str(tmp_path)})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "failed" in done.stdout and "no space left" in done.stdout, done.stdout


def test_cxx_is_split_like_a_shell_command(monkeypatch):
    monkeypatch.setenv("CXX", "g++ -O2")
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    assert cpu_flash._compiler() == [shutil.which("g++"), "-O2"]
    monkeypatch.setenv("CXX", "no-such-compiler-xyz -O2")
    assert cpu_flash._compiler() is None


@pytest.mark.slow  # compiles the kernel once more, in a fresh cache
def test_a_truncated_library_is_rebuilt(tmp_path):
    library = _good_build(tmp_path)
    library.write_bytes(library.read_bytes()[:4096])
    code = """
        import jax.numpy as jnp, numpy as np
        import jax_attn as ja
        from jax_attn.kernels import cpu_flash
        assert cpu_flash.build_reason() is None, cpu_flash.build_reason()
        q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 2, 8)), jnp.float32)
        got = ja.dot_product_attention(q, q, q, implementation="cpu_flash")
        want = ja.dot_product_attention(q, q, q, implementation="reference")
        print(float(jnp.abs(got - want).max()))
    """
    done = _run_child(code, {cpu_flash.CACHE_ENV: str(tmp_path)}, timeout=900)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert float(done.stdout.split()[-1]) < 1e-5
    assert cpu_flash._intact(library) is not None


# ---- memory in proportion to the work ---------------------------------------------------

GROWTH = """
implementation = sys.argv[1]
B, T, N, H = 4096, 1, 8, 64
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H), np.float32)) for _ in range(3))

def loss(q, k, v):
    out = ja.dot_product_attention(q, k, v, implementation=implementation)
    return jnp.sum(out * out)

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
jax.block_until_ready(step(q, k, v))  # once: XLA's buffers, the kernel's pool
def rss():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets VmHWM to the current RSS: compiling's peak does not count
before = rss()
jax.block_until_ready(step(q, k, v))
print(json.dumps({"growth": peak_rss() - before}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.slow
def test_tiny_sequences_take_memory_like_chunked():
    # B 4096, T = S = 1, N = K = 8, H 64 (8 MiB per input), forward + grad. Keys padded
    # to 64-key tiles and the backward's rows to 64 grew the peak by 2.6 GB here.
    flash = child_peak(GROWTH, "cpu_flash")["growth"]
    chunked = child_peak(GROWTH, "chunked")["growth"]
    print(f"peak growth: cpu_flash {flash / MiB:.0f} MiB, chunked {chunked / MiB:.0f} MiB")
    assert flash <= 2 * max(chunked, 8 * MiB), (flash / MiB, chunked / MiB)


@pytest.mark.slow
def test_threaded_kernel_fuzz_agrees_with_the_reference():
    from jax_attn.apps import fuzz

    report = fuzz.run_kernel_fuzz(6, seed=5, threads=3)
    assert report.ok and report.cases == 6, report.failures
    assert report.compared + report.refused == 6


UNDER_LIMITS = """
import resource
from jax_attn.kernels import cpu_flash
T = 2**21  # one head of width 1: the backward's per-row arrays are 16 floats a row
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((1, n, 1, 1), np.float32)) for n in (T, 256, 256))

def loss(q, k, v):
    return ja.dot_product_attention(q, k, v, is_causal=True, implementation=sys.argv[1]).sum()

step = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
jax.block_until_ready(step(q, k, v))  # threads started, pools filled, nothing left to compile
q2 = jax.block_until_ready(2 * q)  # (an eager op in the loop would compile: LLVM aborts)
with open("/proc/self/status") as status:
    size = int(next(l for l in status if l.startswith("VmSize:")).split()[1]) * 1024
outcomes = []
for extra_mib in range(0, 800, 32):
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_mib * 2**20, resource.RLIM_INFINITY))
    try:
        jax.block_until_ready(step(q2, k, v))
        outcomes.append("ok")
    except Exception as error:
        outcomes.append(f"{type(error).__name__}: {error}"[:200])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps({"outcomes": outcomes}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.slow
def test_running_out_of_address_space_is_a_python_error():
    # jax.grad at T 2**21 under address-space limits from none to 768 MiB above what the
    # process has mapped: each call completes or raises; the process lives on. (A failed
    # allocation in the kernel killed the process with SIGABRT or SIGSEGV before.) Some
    # limits must leave XLA its buffers and fail the kernel's scratch (measured here:
    # 32-256 MiB above), and the largest must be enough.
    outcomes = child_peak(UNDER_LIMITS, "cpu_flash")["outcomes"]
    assert any("cpu_flash: out of memory" in outcome for outcome in outcomes), outcomes
    assert outcomes[-1] == "ok", outcomes


def test_mis_sized_row_seeds_or_slopes_are_a_python_error():
    q, k, v = make_qkv(B=2, T=9, S=9, N=4, K=2, H=8)
    call = _call(q, k, v, dropout_rate=0.5, has_alibi_slopes=True)
    lengths = _lengths(2, 9)
    for seeds, slopes in (
        (jnp.zeros((2, 3), jnp.uint32), jnp.zeros((2, 4), jnp.float32)),
        (jnp.zeros((2, 4), jnp.uint32), jnp.zeros((1,), jnp.float32)),
    ):
        with pytest.raises(Exception, match="row seeds or slopes mis-sized"):
            jax.block_until_ready(cpu_flash.forward(call, q, k, v, lengths, lengths, seeds, slopes))


def test_slopes_that_overflow_the_logits_make_no_nan():
    # slope * distance beyond float32's range: the kernel's logits stop at its masked value
    import jax_attn as ja

    q, k, v = make_qkv(B=1, T=70, S=130, N=2, K=1, H=8)
    slopes = jnp.array([3e38, 1e-3], jnp.float32)
    kwargs = dict(alibi_slopes=slopes, dropout_rate=0.2, dropout_rng=jax.random.key(0))
    out = ja.dot_product_attention(q, k, v, implementation="cpu_flash", **kwargs)
    assert np.isfinite(np.asarray(out)).all()
    # the head with a sane slope is the reference's
    want = ja.dot_product_attention(q, k, v, implementation="reference", **kwargs)
    np.testing.assert_allclose(out[:, :, 1], want[:, :, 1], rtol=0, atol=1e-5)


# --- the NaN policy's own check (cpu_flash.finds_non_finite) -----------------------------


def test_the_policy_check_reads_what_the_kernel_may_read(monkeypatch):
    # Keys below each sequence's length rounded up to a 64-key tile, and every query. This
    # process has 8 devices: the check stands aside (None) unless told the call is whole.
    q, k, v = make_qkv(B=1, T=1, S=8, N=2, K=1, H=8)
    assert cpu_flash.finds_non_finite(check_attention_args(q, k, v), q, k, v, None) is None
    monkeypatch.setattr(cpu_flash, "_unsplit", lambda: True)
    q, k, v = make_qkv(B=3, T=2, S=200, N=4, K=2, H=16)
    call = check_attention_args(q, k, v)
    lengths = jnp.array([10, 64, 150])
    found = jax.jit(lambda q, k, v, lengths: cpu_flash.finds_non_finite(call, q, k, v, lengths))
    assert not found(q, k, v, lengths)
    read = [("k", (0, 63, 1, 3)), ("v", (1, 63, 0, 0)), ("q", (2, 1, 3, 15)), ("k", (2, 191, 0, 0))]
    unread = [("k", (0, 64, 1, 3)), ("v", (1, 64, 0, 0)), ("k", (2, 192, 0, 0))]
    for (name, index), expected in [(r, True) for r in read] + [(u, False) for u in unread]:
        for poison in (np.nan, np.inf, -np.inf):
            arrays = {"q": q, "k": k, "v": v}
            arrays[name] = arrays[name].at[index].set(poison)
            assert bool(found(arrays["q"], arrays["k"], arrays["v"], lengths)) == expected, (
                name,
                index,
                poison,
            )
    # vmapped: one flag per mapped call; bfloat16 keeps its NaN
    both = jnp.stack([q, q.at[0, 0, 0, 0].set(jnp.nan)])
    flags = jax.vmap(found, in_axes=(0, None, None, None))(both, k, v, lengths)
    np.testing.assert_array_equal(flags, [False, True])
    half = k.astype(jnp.bfloat16).at[1, 5, 0, 0].set(jnp.nan)
    assert found(q, half, v, lengths)


@pytest.mark.parametrize("traced", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_nan_in_a_caches_unread_slots_changes_nothing_at_any_order(traced, monkeypatch):
    # Where the policy's check is cpu_flash's own (one device, or inside shard_map), a NaN
    # in slots no kernel map reads is not looked for: outputs, gradients, tangents and a
    # Hessian-vector product must still equal those of the same call without it.
    monkeypatch.setattr(cpu_flash, "_unsplit", lambda: True)
    q, k, v = make_qkv(B=2, T=1, S=130, N=4, K=2, H=16)
    lengths = jnp.array([10, 70])  # keys read: below 64 and below 128
    clean_k = k
    k = k.at[0, 100].set(jnp.nan).at[1, 129].set(jnp.inf)

    def attend(q, k):
        return ja.dot_product_attention(
            q, k, v, implementation="cpu_flash", key_value_seq_lengths=lengths
        )

    def loss(q, k):
        return jnp.sum(attend(q, k) ** 2)

    def all_orders(k):
        out, grads = jax.value_and_grad(loss, argnums=(0, 1))(q, k)
        tangent = jax.jvp(lambda q: attend(q, k), (q,), (jnp.ones_like(q),))[1]
        hvp = jax.jvp(lambda q: jax.grad(loss)(q, k), (q,), (jnp.ones_like(q),))[1]
        return out, grads, tangent, hvp

    want = jax.jit(all_orders)(clean_k)
    got = jax.jit(all_orders)(k) if traced else all_orders(k)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a NaN where it is read and live still reaches exactly the rows that attend it: kv
    # head 1 of sequence 1, read by query heads 2 and 3
    out = (jax.jit(attend) if traced else attend)(q, k.at[1, 5, 1, 0].set(jnp.nan))
    nan_rows = np.isnan(np.asarray(out)).any(axis=-1)
    np.testing.assert_array_equal(nan_rows, [[[0, 0, 0, 0]], [[0, 0, 1, 1]]])
