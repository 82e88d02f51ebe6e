"""The chunked kernel's O(T) memory claim, measured as the peak RSS of a fresh process.

A causal forward at T = 32768 (B 1, N 4, H 64, float32) must peak under 1 GiB and
``jax.grad`` at T = 16384 under 2 GiB; materialising the float32 logits ``[B, N, T, S]``
alone would take 16 GiB and 4 GiB (and their gradient as much again). The child reports
its own ``VmHWM`` (Linux), so memory held by this test process does not count.
"""

import os

import pytest
from conftest import child_peak

MiB = 2**20

CHILD = """
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
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.slow
@pytest.mark.parametrize("mode, T, limit_mib", [("forward", 32768, 1024), ("grad", 16384, 2048)])
def test_chunked_peak_memory_is_linear_in_T(mode, T, limit_mib):
    result = child_peak(CHILD, mode, T)
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
    assert child_peak(code, "forward", 64, timeout=300)["peak"] >= 256 * MiB
