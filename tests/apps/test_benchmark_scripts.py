"""The benchmark scripts under benchmarks/ run end to end at tiny sizes (``--quick``)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _run(script, arguments, output):
    """Runs ``benchmarks/<script>`` in a process of one CPU device, as a user's process has;
    returns the JSON it wrote to ``output``."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *arguments, "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_flex_cpu_quick_writes_every_suite(tmp_path):
    pytest.importorskip("torch")
    record = _run("flex_cpu.py", ["--quick"], tmp_path / "flex_cpu.json")
    assert {"cpu", "cpu_count", "jax", "torch", "torch_threads"} <= set(record["machine"])
    assert len(record["load_before"]) == len(record["load_after"]) == 3

    cases = {"causal", "documents 16", "window 32", "prefix-LM 64"}
    for direction in ("forward", "forward_grad"):
        results = record[f"masks_{direction}"]
        assert set(results) == cases
        for rows in results.values():
            assert rows["jax_attn (default)"]["resolves_to"] in ("cpu_flash", "chunked")
            for name in ("jax_attn (default)", "torch sdpa"):
                assert 0 < rows[name]["min_ms"] <= rows[name]["median_ms"] <= rows[name]["max_ms"]
            flex = rows["torch flex"]
            # torch 2.13 has no CPU backward for FlexAttention: the row says why
            served = flex.get("median_ms", 0) > 0
            assert served or direction == "forward_grad" and flex["cannot_serve"]

    gpt2 = record["gpt2_forward_grad"]
    assert set(gpt2) == {"causal", "dropout 0.1", "key padding mask", "bias"}
    for rows in gpt2.values():
        assert rows["jax_attn (default)"]["median_ms"] > 0 and rows["torch sdpa"]["median_ms"] > 0

    memory = record["memory"]["forward"]
    for case in ("causal", "document:16"):
        assert memory[case]["peak_rss_mib"] > 0 and memory[case]["seconds"] > 0
    assert "documents / causal growth_mib" in memory

    names = [target["target"] for target in record["targets"]]
    assert "forward: documents 16 speedup over causal" in names
    assert "forward_grad: dropout 0.1 / no dropout (jax_attn)" in names
    assert all(target["median"] > 0 for target in record["targets"] if "median" in target)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, arguments",
    [
        ("decode.py", ["--cases", "gpt2", "--fills", "0.05", "--rounds", "2", "--warmup", "1"]),
        ("dispatch_overhead.py", ["--dtype", "float32", "--cases", "small", "--rounds", "2"]),
        ("gpu_thresholds.py", ["--quick", "--rounds", "2", "--warmup", "1"]),
    ],
)
def test_decode_and_overhead_scripts_write_their_rows(script, arguments, tmp_path):
    record = _run(script, arguments, tmp_path / "out.json")
    if script == "gpu_thresholds.py":
        assert {"queries", "logits", "budget"} <= set(record)
        assert record["queries_crossover_T"] in (None, *(row["T"] for row in record["queries"]))
        assert all(row["xla_ms"] > 0 and row["chunked_ms"] > 0 for row in record["queries"])
        assert record["budget"]["ms"] and all(t > 0 for t in record["budget"]["ms"].values())
        return
    assert record["rows"]
    for row in record["rows"]:
        timed = {
            name: cell
            for name, cell in row.items()
            if isinstance(cell, dict) and "median_ms" in cell
        }
        # the library's default and the one-device jax.nn peer always run
        assert any(name.startswith(("jax_attn default", "default")) for name in timed)
        for cell in timed.values():
            assert 0 < cell["min_ms"] <= cell["median_ms"] <= cell["max_ms"]
        assert not row.get("errors"), row.get("errors")
