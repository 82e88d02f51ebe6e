"""Every ``jax-attn`` option is discoverable from ``--help``, and lists take one syntax
(argument parsing only: nothing is run)."""

import pytest

from jax_attn.apps import bench, bench_mesh, check, fuzz, plots, train


def help_text(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_check_help_lists_the_fuzz_options(capsys):
    text = help_text(check.main, capsys)
    for flag in ("--fuzz N", "--seed", "--bad-fraction", "--error-table", "--kernel", "--threads"):
        assert flag in text, flag


def test_bench_help_lists_the_mesh_options(capsys):
    text = help_text(bench.main, capsys)
    for flag in ("--mesh AXIS=SIZE", "--d-model", "--kv-heads", "--block-size", "--compile-only"):
        assert flag in text, flag


def test_plot_help_shows_defaults_and_what_mask_arguments_mean(capsys):
    text = " ".join(help_text(plots.main, capsys).split())
    assert "(default 12)" in text and "(default attention_plots)" in text
    assert "document[:N] (N: packed documents, causal in each; default 3)" in text
    assert "--out docs/figures" in text


def test_train_help_says_steps_shortens_the_warm_up(capsys):
    text = " ".join(help_text(train.main, capsys).split())
    assert "--steps N" in text and "warm-up" in text


@pytest.mark.parametrize(
    "parser", [check.build_parser(), fuzz.build_parser()], ids=["check", "check --fuzz"]
)
def test_implementations_take_spaces_commas_or_both(parser):
    for argv in (
        ["xla", "chunked", "reference"],
        ["xla,chunked,reference"],
        ["xla,chunked", "reference"],
    ):
        args = parser.parse_args(["--implementations", *argv])
        assert args.implementations == ["xla", "chunked", "reference"]
    assert parser.parse_args([]).implementations is None


def test_fuzz_options_without_fuzz_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--seed", "3"])
    assert exit_info.value.code == 2
    assert "--seed: only with --fuzz N" in capsys.readouterr().err


def test_mesh_options_without_mesh_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--d-model", "64"])
    assert exit_info.value.code == 2
    assert "--d-model: only with --mesh" in capsys.readouterr().err


def test_bench_mesh_parser_still_requires_the_mesh(capsys):
    with pytest.raises(SystemExit):
        bench_mesh.build_parser().parse_args([])
    assert "--mesh" in capsys.readouterr().err


def test_plot_all_writes_into_out_not_the_checkout(monkeypatch, tmp_path):
    written = {}

    def save_figures(figures, out):
        written["out"] = out
        return []

    monkeypatch.setattr(plots, "sentence_figures", lambda *args, **kwargs: {"figure": None})
    monkeypatch.setattr(plots, "save_figures", save_figures)
    monkeypatch.chdir(tmp_path)
    assert plots.main(["--all"]) == 0
    assert written["out"] == "attention_plots"


def test_bench_only_takes_the_same_list_syntax():
    parser = bench.build_parser()
    for argv in (["gpt2", "long"], ["gpt2,long"]):
        assert parser.parse_args(["--only", *argv]).only == ["gpt2", "long"]
    assert parser.parse_args([]).only is None


def test_readme_names_the_mask_functions_as_plot_help_does(capsys):
    from pathlib import Path

    from jax_attn.apps import mask_gallery

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = " ".join(help_text(plots.main, capsys).split())
    for name, (_, default, _) in mask_gallery.MASK_FNS.items():
        form = name if default is None else f"{name}[:N]"
        assert f"`{form}`" in readme, form
        assert form in text, form
