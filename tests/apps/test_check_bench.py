"""``jax-attn check`` finds mismatches and ``jax-attn bench`` writes its report (tiny shapes)."""

import json

import jax.numpy as jnp
import pytest

from jax_attn import dispatch
from jax_attn.apps import bench, check, cli

TINY = check.Case("tiny causal GQA", T=6, S=10, N=4, K=2, H=8, is_causal=True, mask=True)


@pytest.fixture
def broken_implementation(monkeypatch):
    """An implementation 1% off the truth, registered for the test only."""
    xla = dispatch._REGISTRY["xla"]

    def off_by_one_percent(q, k, v, **kwargs):
        return xla.fn(q, k, v, **kwargs) * 1.01

    impl = dispatch.Implementation("broken", off_by_one_percent, xla.unsupported)
    monkeypatch.setitem(dispatch._REGISTRY, "broken", impl)
    return "broken"


def test_check_passes_the_real_implementations():
    results = check.run_check([TINY], ["bfloat16"], ["chunked", "xla"])
    assert [(r.implementation, r.dtype) for r in results] == [
        ("chunked", "bfloat16"),
        ("xla", "bfloat16"),
    ]
    assert all(r.status == "ok" for r in results), check.format_table(results)


def test_check_reports_a_mismatch_and_exits_non_zero(broken_implementation, monkeypatch, capsys):
    monkeypatch.setattr(check, "default_cases", lambda full=False: [TINY])
    code = check.main(["--implementations", "broken", "--dtypes", "float32", "--no-progress"])
    assert code == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "broken" in line]
    assert len(lines) == 2 and "FAIL" in lines[1]  # the header, then the failed row


def test_check_skips_unsupported_calls_with_the_reason():
    dropout = check.Case("dropout", T=4, S=4, dropout=0.2)
    (result,) = check.run_check([dropout], ["float32"], ["xla"])
    assert result.status == "skip" and "dropout" in result.note


def test_cli_routes_check_and_bench(capsys):
    for command in ("check", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"jax-attn {command}" in capsys.readouterr().out


def test_bench_writes_json_and_plot(tmp_path):
    config = bench.BenchConfig(
        name="tiny",
        warmup=1,
        repeats=2,
        output_dir=str(tmp_path),
        torch=True,
        cases=(
            bench.BenchCase(
                "mha",
                "module",
                batch=1,
                seq_len=16,
                num_heads=2,
                head_dim=8,
                contestants=("jax_attn MultiHeadAttention", "flax MultiHeadDotProductAttention"),
            ),
        ),
        sweep=bench.SweepConfig(
            batch=1,
            num_heads=2,
            head_dim=8,
            seq_lens=(8, 16),
            contestants=("jax_attn (default)", "torch sdpa"),
        ),
    )
    report = bench.run_bench(config, show_progress=False, skip_memory=True)
    saved = json.loads((tmp_path / report["json"].split("/")[-1]).read_text())
    assert saved["info"]["device"] and saved["info"]["platform"] == "cpu"
    results = saved["cases"][0]["results"]
    assert set(results) == {"jax_attn MultiHeadAttention", "flax MultiHeadDotProductAttention"}
    baseline = results["flax MultiHeadDotProductAttention"]
    assert baseline["median_ms"] > 0 and baseline["vs_baseline"] == 1.0
    assert [e["case"]["seq_len"] for e in saved["sweep"]] == [8, 16]
    assert (tmp_path / report["plot"].split("/")[-1]).stat().st_size > 0


def test_bench_config_file_reads_and_checks_kind(tmp_path):
    config = bench.load_bench_config("configs/bench-cpu.toml")
    assert any(c.kind == "module" and c.seq_len == 1024 for c in config.cases)
    assert {m.seq_len for m in config.memory} == {32768, 16384}
    with pytest.raises(ValueError, match="kind"):
        bench.BenchCase("bad", "kernel", batch=1, seq_len=8, num_heads=1, head_dim=8)


def test_memory_worker_reports_peak_in_a_fresh_process():
    case = bench.MemoryCase("small", seq_len=256, num_heads=2, head_dim=16, limit_mib=4096)
    entry = bench.run_memory_case(case, timeout_s=300)
    assert "error" not in entry, entry.get("error")
    assert entry["passed"] and 0 < entry["peak_mib"] < 4096


def test_gflop_counts_the_causal_half():
    full = bench.BenchCase(
        "a", "attention", batch=1, seq_len=64, num_heads=1, head_dim=8, causal=False
    )
    causal = bench.BenchCase("b", "attention", batch=1, seq_len=64, num_heads=1, head_dim=8)
    assert bench.case_gflop(full) == pytest.approx(2 * 2 * 64 * 64 * 8 / 1e9)
    assert bench.case_gflop(causal) == pytest.approx(bench.case_gflop(full) * 65 / 128)
    assert jnp.isfinite(bench.case_gflop(causal))
