"""The chunked kernel's O(T) memory claim, measured as the peak RSS of a fresh process.

A causal forward at T = 32768 (B 1, N 4, H 64, float32) must peak under 1 GiB and
``jax.grad`` at T = 16384 under 2 GiB; materialising the float32 logits ``[B, N, T, S]``
alone would take 16 GiB and 4 GiB (and their gradient as much again). The child reports
its own ``VmHWM`` (Linux), so memory held by this test process does not count.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 2**20

CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import jax_attn as ja

    def peak_rss():
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    mode, T = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, 4, 64), np.float32)) for _ in range(3))

    def attend(q, k, v):
        return ja.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")

    if mode == "forward":
        out = jax.jit(attend)(q, k, v)
    else:
        out = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), (0, 1, 2)))(q, k, v)
    finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(out))
    print(json.dumps({"peak": peak_rss(), "finite": finite}))
""")


def _peak_of_child(mode: str, T: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's process has
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(T)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.slow
@pytest.mark.parametrize("mode, T, limit_mib", [("forward", 32768, 1024), ("grad", 16384, 2048)])
def test_chunked_peak_memory_is_linear_in_T(mode, T, limit_mib):
    result = _peak_of_child(mode, T)
    assert result["finite"]
    assert result["peak"] < limit_mib * MiB, f"peak RSS {result['peak'] / MiB:.0f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.slow
def test_the_child_measures_what_it_allocates():
    """Guards the measurement: a child that keeps 256 MiB live reports at least that."""
    code = CHILD.replace(
        'print(json.dumps({"peak"',
        'ballast = np.ones(256 * 2**20, np.uint8)\nprint(json.dumps({"peak"',
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    small = subprocess.run(
        [sys.executable, "-c", code, "forward", "64"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    assert json.loads(small.stdout.strip().splitlines()[-1])["peak"] >= 256 * MiB
