"""Test-session setup and shared fixtures.

- Eight virtual CPU devices for the sharding tests: XLA reads this flag once, when jax
  first initialises its backends, so it is set here before any test imports jax.
- JAX's strict settings, as JAX's own tests run: no implicit rank promotion, no implicit
  dtype promotion. The library must work under both.
- The README's fast command (``-m 'not slow'``) compiles cheaply: XLA's backend (LLVM)
  optimisation off (``jax_disable_most_optimizations``) and XLA:CPU's older fused-loop
  emitters (``--xla_cpu_use_fusion_emitters=false``). The tests' programs are tiny, so
  compiling them is most of the suite's time; these settings change how fast the machine
  code runs, not what the program computes (HLO optimisation, fusion and buffer assignment
  are as usual). The slow step (``-m slow``) compiles as users do.
  ``JAX_ATTN_FAST_COMPILES=1`` or ``=0`` sets it for any run.
- One JAX compilation cache per session (a fresh temporary directory, removed at the end),
  shared by the xdist workers: a program compiled in one worker, or by an earlier test
  under a new closure, is loaded instead of compiled again.
- Hypothesis profiles: ``default`` searches (random examples within a time budget),
  ``thorough`` searches longer (``HYPOTHESIS_PROFILE=thorough``); the slow property test
  sets its own example count.
- Fixtures: ``make_qkv`` (random q, k, v drawn with numpy: no per-shape PRNG compile;
  ``make_qkv_numpy`` keeps them numpy arrays) and
  ``attention_float64`` (attention written in numpy float64, independent of the library's
  reference); ``child_peak`` runs a script in a fresh process and returns what it reports,
  with its peak RSS.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests compare float32 results at ~1e-5: keep matmuls in full float32 on GPUs too
# (recent NVIDIA GPUs default to TF32). No effect on the CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_NUMPY_DTYPE_PROMOTION", "strict")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from processes import COMPILATION_CACHE_ENV, child_env, run_python  # noqa: E402

_HYPOTHESIS = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("default", max_examples=15, **_HYPOTHESIS)
# derandomize: CI reruns the same 2000 examples, so a run that passed here passes there;
# the default profile draws new examples every run.
settings.register_profile("thorough", max_examples=2000, derandomize=True, **_HYPOTHESIS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_FAST_COMPILES = "JAX_ATTN_FAST_COMPILES"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_HEADER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import jax_attn as ja

    def peak_rss():
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
""")


def child_peak(body: str, *argv, timeout: int = 600) -> dict:
    """Runs ``body`` (after imports of json, sys, jax, jnp, np, ja and a ``peak_rss()``
    reading the process's own ``VmHWM``) in a fresh Python on one CPU device, as a
    user's process has, and returns the JSON object it prints last (Linux only)."""
    code = _CHILD_HEADER + textwrap.dedent(body)
    done = run_python(code, *argv, env=child_env(user=True), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_CACHE = COMPILATION_CACHE_ENV


def _share_compiled_programs(config):
    """One JAX compilation cache for the session: a fresh directory that the xdist workers
    and the subprocesses tests start inherit through the environment, removed at the end.

    The fast set compiles the same small programs in both workers, and again wherever a
    test jits a new closure of the same computation (same HLO, new function object); a
    cache hit loads the executable XLA compiled the first time instead of compiling it
    again (docs/performance.md, "Where the code's constants come from", has what it saves).
    Every run starts empty, so each run is as cold as the first; a directory the user set
    is used as is. ``child_peak`` drops it: its fresh process compiles as a user's does.
    """
    if config.getoption("markexpr") != "not slow" and _CACHE not in os.environ:
        # Only the README's fast run shares compiled programs (the budget it serves): a
        # slow-step worker once crashed (SIGSEGV) inside JAX's cache write
        # (compilation_cache.put_executable_and_time) during the 2000-example property
        # search, and that step compiles each program once anyway.
        return
    if _CACHE not in os.environ:  # the xdist controller, or a run without xdist
        os.environ[_CACHE] = tempfile.mkdtemp(prefix="jax_attn_tests_")
        config._jax_attn_cache_dir = os.environ[_CACHE]
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


def pytest_unconfigure(config):
    made = getattr(config, "_jax_attn_cache_dir", None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def pytest_configure(config):
    _share_compiled_programs(config)
    # The tests' programs are small and run once: compiling them without optimisation
    # costs less than the optimisation saves (docs/performance.md has the timings). Set
    # through the environment, so the subprocesses some tests start compile the same way;
    # XLA reads XLA_FLAGS when its backend starts, which no test has done yet.
    fast = os.environ.get(_FAST_COMPILES)
    if fast is None:
        fast = "1" if config.getoption("markexpr") == "not slow" else "0"
    if fast in ("", "0"):
        return
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise pytest.UsageError(f"{_FAST_COMPILES}: XLA started before tests/conftest.py")
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    emitters = "--xla_cpu_use_fusion_emitters=false"
    if emitters not in os.environ["XLA_FLAGS"] and _xla_accepts(emitters):
        os.environ["XLA_FLAGS"] += " " + emitters
    jax.config.update("jax_disable_most_optimizations", True)


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA starts with ``flag``: it aborts the process on a flag it
    does not know (jaxlib 0.11 on a GPU host aborted every xdist worker so, silently).
    Asked in a fresh process by the xdist controller; where XLA accepts the flag, its
    workers inherit it through ``XLA_FLAGS`` and ask nothing, where it refuses, each
    worker asks again (about 1 s each)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


# `jax-attn train`'s tiny decoder on the copy task (tests/apps/test_train.py, and on many
# processes tests/sharding/test_multiprocess.py): TOML sections -> keys -> values.
TINY_TRAIN = {
    "task": {"name": "copy", "length": 3, "vocab_size": 4},
    "model": {
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "mlp_ratio": 2,
        "dropout": 0.1,
    },
    "train": {
        "steps": 40,
        "batch_size": 16,
        "learning_rate": 1e-2,
        "warmup_steps": 5,
        "weight_decay": 0.0,
        "seed": 0,
        "log_every": 5,
        "eval_examples": 8,
    },
    "generate": {"show": 1, "temperature": 0.8, "top_k": 2},
}


def tiny_train_toml(out, changes: dict | None = None) -> str:
    """``TINY_TRAIN`` as a config file writing to ``out``, with ``changes`` applied
    (``{"train.steps": 4}``: section.key -> value)."""
    sections = {name: dict(values) for name, values in TINY_TRAIN.items()}
    for dotted, value in (changes or {}).items():
        section, key = dotted.split(".")
        assert key in sections[section], dotted
        sections[section][key] = value
    lines = [f"output_dir = {json.dumps(str(out))}"]
    for name, values in sections.items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def make_qkv_numpy(B=2, T=3, S=4, N=2, K=1, H=4, dtype="float32", seed=0, scale=1.0, H_v=None):
    """:func:`make_qkv`'s q, k, v as numpy arrays of ``dtype`` (slicing them compiles
    nothing): drawn in float32, then cast to ``dtype``."""
    rng = np.random.default_rng(seed)
    lead = () if B is None else (B,)
    shapes = [(*lead, T, N, H), (*lead, S, K, H), (*lead, S, K, H if H_v is None else H_v)]
    scales = [scale, scale, 1.0]
    return tuple(
        (s * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
        for shape, s in zip(shapes, scales, strict=True)
    )


def make_qkv(B=2, T=3, S=4, N=2, K=1, H=4, dtype="float32", seed=0, scale=1.0, H_v=None):
    """q ``[B, T, N, H]``, k ``[B, S, K, H]``, v ``[B, S, K, H_v]`` as jax arrays of ``dtype``.

    Standard normal values drawn with numpy (q and k times ``scale``), rounded once to
    ``dtype``. ``B=None`` leaves the batch axis out. float64 needs x64 enabled.
    """
    import jax.numpy as jnp

    wide = make_qkv_numpy(B, T, S, N, K, H, "float32", seed, scale, H_v)
    return tuple(jnp.asarray(x).astype(dtype) for x in wide)


def _broadcast_to_full(x, dtype, full, batched):
    """A mask or bias, batched ``[B?, N?, T?, S]`` or unbatched, as ``full = [B, N, T, S]``."""
    x = np.asarray(x, dtype)
    return np.broadcast_to(x if batched else x[None] if x.ndim == 3 else x, full)


def allowed_float64(
    query,
    key,
    *,
    mask=None,
    bias=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
):
    """Bool ``[B, N, T, S]`` (B = 1 unbatched): which keys each query may attend, in numpy."""
    batched = np.ndim(query) == 4
    B = np.shape(query)[0] if batched else 1
    T, N = np.shape(query)[-3], np.shape(query)[-2]
    S = np.shape(key)[-3]
    full = (B, N, T, S)
    allowed = np.ones(full, bool)
    if bias is not None:
        allowed &= _broadcast_to_full(bias, np.float64, full, batched) > -np.inf
    if mask is not None:
        allowed &= _broadcast_to_full(mask, bool, full, batched)
    query_pos = np.arange(T)[:, None] + S - T
    key_pos = np.arange(S)[None, :]
    if is_causal:
        allowed &= key_pos <= query_pos
    if local_window_size is not None:
        w = local_window_size
        left, right = (w, w) if isinstance(w, int) else w
        allowed &= (key_pos >= query_pos - left) & (key_pos <= query_pos + right)
    if query_seq_lengths is not None:
        allowed &= (
            np.arange(T)[None, None, :, None] < np.asarray(query_seq_lengths)[:, None, None, None]
        )
    if key_value_seq_lengths is not None:
        allowed &= (
            np.arange(S)[None, None, None, :]
            < np.asarray(key_value_seq_lengths)[:, None, None, None]
        )
    return allowed


def empty_rows_float64(call: dict) -> np.ndarray:
    """Bool ``[B, T, N]`` (``[T, N]`` unbatched): the query rows of a
    ``dot_product_attention`` call (keyword arguments) with no key to attend."""
    names = ("mask", "bias", "is_causal", "query_seq_lengths", "key_value_seq_lengths")
    masking = {name: call[name] for name in (*names, "local_window_size") if name in call}
    allowed = allowed_float64(call["query"], call["key"], **masking)
    # [B, N, T] -> [B, T, N]
    empty = (~allowed.any(axis=-1)).transpose(0, 2, 1)
    return empty if np.ndim(call["query"]) == 4 else empty[0]


def attention_float64(
    query,
    key,
    value,
    *,
    mask=None,
    bias=None,
    is_causal=False,
    scale=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    dropout_rate=0.0,
    dropout_rng=None,
):
    """``dot_product_attention`` written in numpy float64, loops over nothing clever.

    Independent of ``jax_attn.reference``; only the dropout keep-mask comes from the
    library (``masks.make_dropout_mask`` defines which weights a key drops).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
    batched = q.ndim == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)  # head n uses n // G
    full = (B, N, T, S)
    allowed = allowed_float64(
        query,
        key,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
    )
    logits = np.einsum("btnh,bsnh->bnts", q, k) * (1 / np.sqrt(H) if scale is None else scale)
    if bias is not None:
        bias = _broadcast_to_full(bias, np.float64, full, batched)
        logits = logits + np.where(allowed, bias, 0.0)
    logits = np.where(allowed, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True, initial=-np.inf)
    e = np.where(allowed, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    if dropout_rate:
        from jax_attn.masks import make_dropout_mask

        keep = np.asarray(make_dropout_mask(dropout_rng, dropout_rate, full))
        weights = np.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = np.einsum("bnts,bsnh->btnh", weights, v)
    return out if batched else out[0]


@pytest.fixture(name="make_qkv", scope="session")
def _make_qkv_fixture():
    return make_qkv


@pytest.fixture(name="attention_float64", scope="session")
def _attention_float64_fixture():
    return attention_float64


@pytest.fixture(name="empty_rows_float64", scope="session")
def _empty_rows_float64_fixture():
    return empty_rows_float64


# In half precision an implementation may err by this multiple of the error the reference
# makes in the same dtype on the same call: both round one float32 result to the dtype, so
# a correct kernel lands near 1x; a kernel that rounds logits or weights early does not.
# Measured: 120 random calls gave up to 2.3x (xla). The thorough search once found chunked
# at 3.02x (float16, dropout 0.6) and then at 4.6x (bfloat16): chunked rounded its
# probabilities to the input dtype before multiplying v, up to an ulp of the output. Since
# they stay float32 (kernels/online_softmax.attend_block) and
# test_half_outputs_are_rounded_once in tests/kernels/test_numerics.py holds every kernel
# to half an ulp, 3x stands. The deterministic float32-logit tests there catch early
# logit rounding.
HALF_ERROR_RATIO = 3.0
FLOAT32_TOLERANCE = 1e-5  # of max(1, max|v|)


def allowed_error(q, k, v, expected, **kwargs) -> float:
    """Largest allowed ``max |out - expected|`` for an implementation's output on this call.

    ``expected`` is float64 (``attention_float64``). float32: ``1e-5 * max(1, max|v|)``.
    Half precision: ``HALF_ERROR_RATIO`` x the reference's own error in that dtype, and at
    least the float32 bound.
    """
    from jax_attn import reference

    floor = FLOAT32_TOLERANCE * max(1.0, float(np.abs(np.asarray(v, np.float64)).max(initial=0)))
    if np.dtype(q.dtype).itemsize >= 4:
        return floor
    own = np.asarray(reference.dot_product_attention(q, k, v, **kwargs), np.float64)
    return max(HALF_ERROR_RATIO * float(np.abs(own - expected).max(initial=0)), floor)


@pytest.fixture(name="allowed_error", scope="session")
def _allowed_error_fixture():
    return allowed_error
