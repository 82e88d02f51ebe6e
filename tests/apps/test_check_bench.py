"""``jax-attn check`` finds mismatches and ``jax-attn bench`` writes its report (tiny shapes)."""

import doctest
import json

import jax
import jax.numpy as jnp
import pytest

from jax_attn import dispatch
from jax_attn.apps import bench, check, cli, fuzz, timing

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


# the real kernels through run_check; fast: test_check_reports_a_mismatch_and_exits_non_zero
# (the same run_check through check.main) and tests/kernels (the kernels themselves)
@pytest.mark.slow
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


def test_check_runs_mask_and_score_functions():
    functions = check.Case(
        "document + alibi", T=6, S=6, N=2, K=1, H=8, mask_fn="document:2", score_fn="alibi"
    )
    blocks = check.Case(
        "window block mask", T=6, S=6, N=2, K=1, H=8, mask_fn="window:2", block_mask=True
    )
    results = check.run_check([functions, blocks], ["float32"], ["chunked", "xla"])
    status = {(r.case, r.implementation): r.status for r in results}
    assert status == {
        ("document + alibi", "chunked"): "ok",
        ("document + alibi", "xla"): "skip",  # xla takes a mask_fn but no score_fn
        ("window block mask", "chunked"): "ok",
        ("window block mask", "xla"): "skip",
    }, check.format_table(results)


def test_cli_routes_check_and_bench(capsys):
    for command in ("check", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"jax-attn {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "torch",
    [
        False,
        # torch's import alone is 2.5 s of CPU: the same report with a torch column is slow
        pytest.param(True, marks=pytest.mark.slow),
    ],
)
def test_bench_writes_json_and_plot(tmp_path, monkeypatch, torch):
    if not torch:  # as without torch installed: its import is not paid for here
        monkeypatch.setattr(bench, "_TORCH", None)
    config = bench.BenchConfig(
        name="tiny",
        warmup=1,
        repeats=2,
        output_dir=str(tmp_path),
        torch=torch,
        matmul_size=128,
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
            contestants=("jax.nn xla", "torch sdpa") if torch else ("jax.nn xla",),
        ),
    )
    report = bench.run_bench(config, show_progress=False, skip_memory=True)
    saved = json.loads((tmp_path / report["json"].split("/")[-1]).read_text())
    assert saved["info"]["device"] and saved["info"]["platform"] == jax.default_backend()
    results = saved["cases"][0]["results"]
    assert set(results) == {"jax_attn MultiHeadAttention", "flax MultiHeadDotProductAttention"}
    baseline = results["flax MultiHeadDotProductAttention"]
    assert baseline["median_ms"] > 0 and baseline["vs_baseline"] == 1.0
    for result in results.values():
        assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]
        assert len(result["times_ms"]) == 2 and isinstance(result["noisy"], bool)
    assert isinstance(saved["cases"][0]["noisy"], list)
    assert [e["case"]["seq_len"] for e in saved["sweep"]] == [8, 16]
    assert (tmp_path / report["plot"].split("/")[-1]).stat().st_size > 0


def test_timing_summary_examples_and_empty_runs():
    results = doctest.testmod(timing)
    assert results.attempted > 0 and results.failed == 0
    with pytest.raises(ValueError, match="times must hold at least one run"):
        timing.summary_ms([])


class FakeClock:
    """A clock whose every timed call lasts the next of ``seconds`` (start, stop pairs)."""

    def __init__(self, seconds):
        self.readings = iter([t for s in seconds for t in (0.0, s)])

    def __call__(self):
        return next(self.readings)


def test_time_interleaved_gives_every_run_to_its_contestant():
    runs = {"a": lambda: None, "b": lambda: None}
    clock = FakeClock([0.010, 0.020, 0.011, 0.021, 0.014, 0.022])
    times = bench.time_interleaved(runs, warmup=1, repeats=3, clock=clock)
    assert times == {"a": [0.010, 0.011, 0.014], "b": [0.020, 0.021, 0.022]}


def test_bench_reports_min_median_max_and_flags_a_noisy_case(monkeypatch):
    def contestant(fn):
        return lambda: ("jax", fn, (jnp.ones(2),))

    steady, jumpy = contestant(lambda x: x + 1), contestant(lambda x: x * 2)
    monkeypatch.setattr(
        bench, "attention_contestants", lambda case, torch: {"steady": steady, "jumpy": jumpy}
    )
    case = bench.BenchCase("noisy", "attention", batch=1, seq_len=8, num_heads=2, head_dim=4)
    config = bench.BenchConfig(name="fake", warmup=0, repeats=3, torch=False)
    # rounds time steady then jumpy: steady within 10%, jumpy off by 50% once
    clock = FakeClock([0.010, 0.020, 0.010, 0.030, 0.011, 0.020])
    entry = bench.run_case(case, config, clock=clock)
    steady, noisy = entry["results"]["steady"], entry["results"]["jumpy"]
    assert (steady["min_ms"], steady["median_ms"], steady["max_ms"]) == pytest.approx((10, 10, 11))
    assert (noisy["min_ms"], noisy["median_ms"], noisy["max_ms"]) == pytest.approx((20, 20, 30))
    assert noisy["spread"] == pytest.approx(0.5) and noisy["noisy"]
    assert steady["spread"] == pytest.approx(0.1) and not steady["noisy"]
    assert entry["noisy"] == ["jumpy"]
    table = bench.format_case(entry, None)
    assert "min ms" in table and "max ms" in table and "50%!" in table and "10% " in table
    assert "over 20%: jumpy" in table


def test_default_dispatch_and_jax_nn_lower_to_the_program_of_the_row_they_alias():
    case = bench.BenchCase("alias", "attention", batch=1, seq_len=8, num_heads=2, head_dim=4)
    default = bench.default_implementation(case)
    names = ("jax_attn (default)", f"jax_attn {default}", "jax_attn xla", "jax.nn xla")
    contestants = bench.attention_contestants(case, torch=False)
    assert not {"jax_attn reference", "jax_attn ring"} & set(contestants)
    built = {name: bench.build_contestant(contestants[name]) for name in names}
    aliases = bench.find_aliases({name: b.program for name, b in built.items()})
    # jax_attn's xla row is jax.nn's kernel inside the library's NaN policy (a cond on
    # non-finite inputs, docs/reliability.md): another program, timed on its own.
    assert aliases == {"jax_attn (default)": f"jax_attn {default}"}


def test_an_alias_is_not_timed_and_shows_its_rows_times(monkeypatch):
    def add_one(x):
        return x + 1

    contestants = {
        "jax_attn (default)": lambda: ("jax", add_one, (jnp.ones(2),)),
        "jax_attn named": lambda: ("jax", add_one, (jnp.ones(2),)),
    }
    monkeypatch.setattr(bench, "attention_contestants", lambda case, torch: contestants)
    case = bench.BenchCase("alias", "attention", batch=1, seq_len=8, num_heads=2, head_dim=4)
    config = bench.BenchConfig(name="fake", warmup=0, repeats=2, torch=False)
    entry = bench.run_case(case, config, clock=FakeClock([0.010, 0.012]))
    alias, timed = entry["results"]["jax_attn (default)"], entry["results"]["jax_attn named"]
    assert alias["alias_of"] == "jax_attn named" and "compile_s" not in alias
    assert alias["times_ms"] == timed["times_ms"] == [10.0, 12.0]
    table = bench.format_case(entry, None)
    assert "= jax_attn named (the same program, timed once)" in table


def test_fuzz_tables_are_data_the_runner_reads():
    assert len(fuzz.MISTAKES) == len(fuzz.TABLES["mistake"]) > 40
    assert len(fuzz.module_mistakes()) == len(fuzz.TABLES["module_mistake"])
    assert fuzz.sizes(["N+1", "S", 2], {"N": 4, "S": 3}) == (5, 3, 2)
    with pytest.raises(ValueError, match="size must be an int or one of"):
        fuzz.size("Q+1", {"N": 4})


def test_bench_config_file_reads_and_checks_kind(tmp_path):
    config = bench.load_bench_config("configs/bench-cpu.toml")
    assert any(c.kind == "module" and c.seq_len == 1024 for c in config.cases)
    assert {m.seq_len for m in config.memory} == {32768, 16384}
    with pytest.raises(ValueError, match="kind"):
        bench.BenchCase("bad", "kernel", batch=1, seq_len=8, num_heads=1, head_dim=8)


@pytest.mark.slow  # memory in a fresh process
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


def test_interleaved_runs_time_each_run_once_a_round_in_varying_order():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.interleaved_runs(runs, rounds=6, warmup=2, settle_s=0.0)
    assert {name: len(t) for name, t in times.items()} == dict.fromkeys("abc", 6)
    assert all(t >= 0.0 for ts in times.values() for t in ts)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 8 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # the order changes between rounds
