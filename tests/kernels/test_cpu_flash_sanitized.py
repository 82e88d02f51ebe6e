"""The compiled kernel built with AddressSanitizer, UndefinedBehaviorSanitizer and the
libstdc++ assertions, running its tests and a threaded fuzz against the reference.

The library goes to its own cache directory (the flags are part of its cache key too). The
children run with the sanitizer runtime preloaded (Python is not built with it; libstdc++
is preloaded with it so that its ``__cxa_throw`` interceptor finds the real one) and leak
detection off (Python's own allocations at exit are not the kernel's). Any report aborts
the child (``-fno-sanitize-recover=all``), so a report is a failed test.
"""

import os
import subprocess
import sys

import jax
import pytest
from conftest import ROOT

from jax_attn.kernels import cpu_flash

SANITIZER_FLAGS = (
    "-fsanitize=address,undefined -fno-sanitize-recover=all -D_GLIBCXX_ASSERTIONS -g -O1"
)
FUZZ_CASES = 200


def _runtime(name: str) -> str | None:
    """The path of the compiler's runtime library ``name`` (``None`` if it has none)."""
    compiler = cpu_flash._compiler()
    if compiler is None:
        return None
    found = subprocess.run(
        [*compiler, f"-print-file-name={name}"], capture_output=True, text=True
    ).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


# .ci/run's sanitizer step sets JAX_ATTN_SANITIZERS=1 and runs these once; there a
# machine that cannot run them fails instead of skipping.
REQUIRED = os.environ.get("JAX_ATTN_SANITIZERS") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REQUIRED, reason="run by .ci/run's step with JAX_ATTN_SANITIZERS=1"),
]


def _runnable() -> str | None:
    """Why the sanitized kernel cannot run here (``None``: it can)."""
    if jax.default_backend() != "cpu" or cpu_flash.build_reason() is not None:
        return f"cpu_flash on {jax.default_backend()}: {cpu_flash.build_reason()}"
    if _runtime("libasan.so") is None:
        return "the compiler has no AddressSanitizer runtime (libasan.so)"
    return None


@pytest.fixture(scope="module")
def sanitized_env(tmp_path_factory):
    assert _runnable() is None, _runnable()
    cache = tmp_path_factory.mktemp("sanitized_cache")
    env = dict(os.environ)
    env.update({cpu_flash.CACHE_ENV: str(cache), cpu_flash.CFLAGS_ENV: SANITIZER_FLAGS})
    # built here, without the runtime preloaded (the compiler need not run under it)
    saved = {name: os.environ.get(name) for name in (cpu_flash.CACHE_ENV, cpu_flash.CFLAGS_ENV)}
    os.environ.update({name: env[name] for name in saved})
    try:
        library = cpu_flash._build(cpu_flash._compiler())
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    assert b"__asan_init" in library.read_bytes(), "the library is not instrumented"
    preload = [_runtime("libasan.so"), _runtime("libstdc++.so")]
    env["LD_PRELOAD"] = " ".join(path for path in preload if path)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _check(done: subprocess.CompletedProcess):
    output = done.stdout[-4000:] + done.stderr[-8000:]
    for marker in ("AddressSanitizer", "runtime error:", "LeakSanitizer", "Assertion"):
        assert marker not in done.stderr, output
    assert done.returncode == 0, output


def test_kernel_tests_pass_under_sanitizers(sanitized_env):
    tests = [
        "tests/kernels/test_cpu_flash.py",
        "tests/kernels/test_cpu_flash_hostile.py",
        "tests/kernels/test_cpu_flash_transforms.py",
        "tests/kernels/test_cpu_flash_dropout.py",
        "tests/kernels/test_cpu_flash_dense.py",
        "tests/kernels/test_cpu_flash_sparse.py",
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(
        command, capture_output=True, text=True, env=sanitized_env, cwd=ROOT, timeout=1800
    )
    _check(done)
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


def test_threaded_fuzz_under_sanitizers(sanitized_env):
    command = [sys.executable, "-m", "jax_attn.apps.fuzz", "--fuzz", str(FUZZ_CASES)]
    command += ["--kernel", "cpu_flash", "--threads", "4", "--seed", "21", "--dtypes", "float32"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=sanitized_env, cwd=ROOT, timeout=1800
    )
    _check(done)
    assert f'"cases": {FUZZ_CASES}' in done.stdout and '"ok": true' in done.stdout
