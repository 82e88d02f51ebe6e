"""Fresh Python processes for the tests, each with this checkout first on its path.

A plain module (no pytest): ``conftest.py`` and the tests import it, and so does the
multi-process launcher in ``tests/sharding/multiprocess_worker.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def child_env(devices: int | None = None, *, user: bool = False) -> dict[str, str]:
    """This process's environment for a child Python: the checkout first on
    ``PYTHONPATH``, no shared compilation cache (a child compiles its own programs).

    ``XLA_FLAGS``: the test session's as they are (its 8 CPU devices, its compile flags);
    with ``devices=N`` the device count replaced by ``N``, the other flags kept; with
    ``user=True`` none at all, as a user's process starts (one CPU device).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop(COMPILATION_CACHE_ENV, None)
    if user:
        env.pop("XLA_FLAGS", None)
    elif devices is not None:
        flags = _DEVICE_COUNT.sub("", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def run_python(
    code: str, *argv: object, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs ``code`` (dedented) in a fresh Python in the checkout with ``argv``; returns the
    completed process, its output as text (a crash shows as a negative return code)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, argv)],
        capture_output=True,
        text=True,
        env=child_env() if env is None else env,
        cwd=ROOT,
        timeout=timeout,
    )
