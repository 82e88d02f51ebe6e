"""The training command's pieces on a tiny model: loss falls, checkpoints, generation."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_train_toml
from flax import serialization

from jax_attn import functional as F
from jax_attn.apps import train as tr
from jax_attn.apps.config import ConfigError, from_dict


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path = out / "tiny.toml"
    path.write_text(tiny_train_toml(out))
    return tr.load_train_config(path)


@pytest.fixture(scope="module")
def trained(tiny_config):
    model = tr.build_decoder(tiny_config)
    state, losses, _ = tr.train(model, tiny_config.task, tiny_config.train, progress=False)
    return state, losses


def test_tiny_training_loss_falls(trained):
    state, losses = trained
    assert int(state["step"]) == 40
    first, last = losses[0][1], losses[-1][1]
    assert np.isfinite(last) and last < 0.7 * first, losses


def _assert_trees_equal(saved, restored):
    """Same tree (optax's state namedtuples included), dtypes and bits, leaf by leaf."""
    assert jax.tree.structure(saved) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("template", ["abstract", "arrays"])
def test_checkpoint_round_trip_through_orbax_is_bit_exact(tiny_config, trained, tmp_path, template):
    state, _ = trained
    path = tr.save_checkpoint(tmp_path / "checkpoint", state, tiny_config)
    # an orbax checkpoint directory: the state and the config as items of their own
    assert path.is_dir() and {"state", "config"} <= {p.name for p in path.iterdir()}
    target = (
        jax.eval_shape(lambda: state)
        if template == "abstract"
        else jax.tree.map(jnp.zeros_like, state)
    )
    restored = tr.restore_checkpoint(path, target)
    _assert_trees_equal(state, restored)
    assert int(restored["step"]) == 40
    assert type(restored["opt_state"][1][0]).__name__ == "ScaleByAdamState"
    assert tr.checkpoint_config(path) == tiny_config
    _assert_trees_equal(state["params"], tr.checkpoint_params(path))


def test_checkpoint_is_read_by_plain_orbax(tiny_config, trained, tmp_path):
    # what a user's code does with the directory, without this package's helpers
    ocp = pytest.importorskip("orbax.checkpoint")
    state, _ = trained
    path = tr.save_checkpoint(tmp_path / "checkpoint", state, tiny_config)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            path,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.eval_shape(lambda: state)),
                config=ocp.args.JsonRestore(),
            ),
        )
    _assert_trees_equal(state, restored.state)
    assert restored.config["model"] == dataclasses.asdict(tiny_config.model)
    assert from_dict(tr.TrainRunConfig, restored.config) == tiny_config


def test_checkpoint_params_reads_an_older_msgpack_checkpoint(trained, tmp_path):
    state, _ = trained
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(serialization.to_bytes(jax.device_get(state)))
    _assert_trees_equal(state["params"], tr.checkpoint_params(path))


_FORWARDS = {}


def _full_forward(config):
    """One jitted full causal pass ``(params, tokens) -> logits`` per config, shared by the
    tests (a fresh jit per call would compile it again)."""
    if id(config) not in _FORWARDS:
        model = tr.build_decoder(config)
        _FORWARDS[id(config)] = jax.jit(
            lambda params, tokens: model.apply({"params": params}, tokens)
        )
    return _FORWARDS[id(config)]


def _greedy_by_recomputing(config, params, prompts, lengths, num_new, forced=None):
    """Greedy tokens from full causal passes over a fixed-size buffer (no cache); where
    ``forced >= 0`` that token is fed instead."""
    forward = functools.partial(_full_forward(config), params)
    buffer = np.zeros((prompts.shape[0], config.task.sequence_length), np.int32)
    buffer[:, : prompts.shape[1]] = prompts
    lengths = np.asarray(lengths)
    rows = np.arange(len(lengths))
    new = []
    for i in range(num_new):
        logits = np.asarray(forward(jnp.asarray(buffer)))
        next_tokens = logits[rows, lengths + i - 1].argmax(-1)
        if forced is not None:
            next_tokens = np.where(forced[:, i] >= 0, forced[:, i], next_tokens)
        buffer[rows, lengths + i] = next_tokens
        new.append(next_tokens)
    return np.stack(new, axis=1)


# prompts of the tiny copy task (prompt_length 4); the second one in full, the first
# one padded after 2 tokens when `lengths` say so
PROMPTS = jnp.array([[1, 2, 0, 4], [3, 1, 2, 4]], jnp.int32)


@pytest.mark.parametrize("lengths", [(4, 4), (2, 4)])
def test_cached_greedy_generation_equals_recomputing(tiny_config, trained, lengths):
    params = trained[0]["params"]
    decoder = tr.build_decoder(tiny_config, decode=True)
    cached = tr.generate(decoder, params, PROMPTS, 3, prompt_lengths=jnp.array(lengths))
    expected = _greedy_by_recomputing(tiny_config, params, PROMPTS, lengths, 3)
    np.testing.assert_array_equal(cached, expected)


def test_forced_tokens_are_fed_instead_of_generated(tiny_config, trained):
    params = trained[0]["params"]
    decoder = tr.build_decoder(tiny_config, decode=True)
    forced = np.array([[-1, 2, -1], [3, -1, 0]], np.int32)
    cached = np.asarray(tr.generate(decoder, params, PROMPTS, 3, forced=forced))
    np.testing.assert_array_equal(cached[forced >= 0], forced[forced >= 0])
    expected = _greedy_by_recomputing(tiny_config, params, PROMPTS, (4, 4), 3, forced)
    np.testing.assert_array_equal(cached, expected)


# a second generation program (sampling instead of greedy); fast: the greedy generate
# tests (the same loop) and test_sampling_respects_top_k (the sampler it calls)
@pytest.mark.slow
def test_sampling_reproducible_with_key(tiny_config, trained):
    params = trained[0]["params"]
    decoder = tr.build_decoder(tiny_config, decode=True)

    def sample(seed):
        return tr.generate(
            decoder, params, PROMPTS, 3, jax.random.key(seed), temperature=2.0, top_k=2
        )

    np.testing.assert_array_equal(sample(1), sample(1))


def test_sampling_respects_top_k():
    logits = jnp.array([[0.0, 5.0, 4.0, -1.0, 3.0]] * 256)
    draws = tr.sample_logits(jax.random.key(0), logits, temperature=5.0, top_k=2)
    assert set(np.unique(draws).tolist()) == {1, 2}


def test_attention_weights_by_layer_reproduce_each_attention_layer(tiny_config, trained):
    params = trained[0]["params"]
    decoder = tr.build_decoder(tiny_config)
    tokens = PROMPTS[1]
    weights = tr.attention_weights_by_layer(decoder, params, tokens)
    assert len(weights) == tiny_config.model.num_layers
    capture = jax.jit(
        lambda params, tokens: decoder.apply({"params": params}, tokens, capture_intermediates=True)
    )
    _, state = capture(params, tokens[None])
    for i, layer_weights in enumerate(weights):
        block = state["intermediates"][f"block_{i}"]
        (attention_input,) = block["norm_1"]["__call__"]
        (attention_output,) = block["attention"]["__call__"]
        p = params[f"block_{i}"]["attention"]
        # the weights the module sows: its own projections of the norm_1 output, causal
        queries = F.split_heads(F.dense(attention_input[0], p["W_query"]), decoder.num_heads)
        keys = F.split_heads(F.dense(attention_input[0], p["W_key"]), decoder.num_kv_heads)
        expected = F.dot_product_attention_weights(queries, keys, is_causal=True)
        np.testing.assert_allclose(layer_weights, expected, rtol=1e-6, atol=1e-7)
        # [T, K=1, H] -> [T, N, H]: every query head uses the one kv head
        values = F.split_heads(F.dense(attention_input[0], p["W_value"]), 1)
        values = jnp.repeat(values, decoder.num_heads, axis=1)
        # [T, N, H]
        context = jnp.einsum("NTS,SNH->TNH", layer_weights, values)
        out = F.dense(F.merge_heads(context), p["out_proj"])
        np.testing.assert_allclose(out, attention_output[0], rtol=1e-5, atol=1e-6)


# the train command end to end on a checkpoint; fast: the weights it draws
# (test_attention_weights_by_layer_reproduce_each_attention_layer) and the drawing
# (tests/apps/test_plots.py test_plot_heads_grid)
@pytest.mark.slow
def test_heads_of_a_checkpoint_are_drawn_one_figure_per_layer(tiny_config, trained, tmp_path):
    pytest.importorskip("matplotlib")
    checkpoint = tr.save_checkpoint(tmp_path / "checkpoint", trained[0], tiny_config)
    config_path = Path(tiny_config.output_dir) / "tiny.toml"
    argv = ["--config", str(config_path), "--heads-of", str(checkpoint), "--out", str(tmp_path)]
    assert tr.main(argv) == 0
    assert (tmp_path / "trained_layer_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "trained_layer_1.png").exists()


def test_generate_checks_context_length(tiny_config, trained):
    decoder = tr.build_decoder(tiny_config, decode=True)
    with pytest.raises(ValueError, match="needs 8 cache slots, but context_length=7"):
        tr.generate(decoder, trained[0]["params"], jnp.zeros((1, 4), jnp.int32), 5)


@pytest.mark.parametrize("task, length", [("copy", 3), ("recall", 2)])
def test_batches_have_their_answers_in_place(task, length):
    config = tr.TaskConfig(task, length, 4)
    tokens, targets = jax.jit(tr.make_batch, static_argnums=(1, 2))(jax.random.key(0), config, 5)
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    assert tokens.shape == targets.shape == (5, config.sequence_length)
    assert (tokens[:, config.prompt_length - 1] == config.separator).all()
    if task == "copy":
        np.testing.assert_array_equal(tokens[:, :length], tokens[:, length + 1 :])
        assert targets[0].sum() == length
    else:
        pairs = tokens[:, : 2 * length].reshape(5, length, 2)
        queries = tokens[:, config.prompt_length :].reshape(5, length, 2)
        for b in range(5):
            assert dict(queries[b].tolist()) == dict(pairs[b].tolist())
        np.testing.assert_array_equal(np.flatnonzero(targets[0]), [6, 8])


@pytest.mark.parametrize(
    "edit, match",
    [
        (("length = 3", "length = 3\nwidth = 2"), "tiny.toml: unknown key 'task.width'"),
        (("top_k = 2\n", ""), "tiny.toml: missing key 'generate.top_k'"),
        (('name = "copy"', 'name = "sort"'), "name must be one of"),
    ],
)
def test_config_errors_name_key_and_file(tmp_path, edit, match):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_train_toml(tmp_path).replace(*edit))
    with pytest.raises(ConfigError, match=match):
        tr.load_train_config(path)


def test_rnn_baseline_shapes():
    model = tr.RNNLanguageModel(5, 8, 12, "lstm")
    tokens = jnp.zeros((2, 7), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert jax.eval_shape(model.apply, variables, tokens).shape == (2, 7, 5)


def written_paths(printed: str) -> list[Path]:
    """The paths a command's final lines name: every line after the last ``wrote:``."""
    lines = printed.splitlines()
    assert tr.WROTE in lines, printed
    start = len(lines) - lines[::-1].index(tr.WROTE)
    return [Path(line) for line in lines[start:]]


def test_train_command_final_lines_name_every_file_it_wrote(
    tiny_config, trained, tmp_path, capsys, monkeypatch
):
    # the command as it runs, less the training (the module's tiny run stands in) and the
    # generation's compiles (its tests are above; it writes no file)
    pytest.importorskip("matplotlib")
    state, losses = trained
    monkeypatch.setattr(tr, "train", lambda *args, **kwargs: (state, losses, 0.0))
    monkeypatch.setattr(
        tr,
        "generate",
        lambda _, __, prompt, num_new, *args, **kwargs: jnp.zeros(
            (prompt.shape[0], num_new), jnp.int32
        ),
    )
    config_path = Path(tiny_config.output_dir) / "tiny.toml"
    out = tmp_path / "out"
    assert tr.main(["--config", str(config_path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "restored: bit-exact" in printed
    named = written_paths(printed)
    assert sorted(named) == sorted(out.iterdir())
    assert {path.name for path in named} == {"checkpoint", "loss.png", "summary.json"}
    # the checkpoint keeps the config the command ran (--out applied) and restores exactly
    checkpoint = out / "checkpoint"
    ran = dataclasses.replace(tiny_config, output_dir=str(out))
    assert tr.checkpoint_config(checkpoint) == ran
    _assert_trees_equal(state, tr.restore_checkpoint(checkpoint, jax.eval_shape(lambda: state)))


@pytest.mark.slow
def test_train_command_end_to_end(tiny_config, capsys):
    out = Path(tiny_config.output_dir)
    assert tr.main(["--config", str(out / "tiny.toml"), "--steps", "10", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "restored: bit-exact" in printed and "token accuracy" in printed
    assert (out / "checkpoint").is_dir()
    for name in ("loss.png", "summary.json"):
        assert (out / name).is_file(), name
    named = written_paths(printed)
    assert sorted(named) == sorted(
        out / name for name in ("checkpoint", "loss.png", "summary.json")
    )
    config = tr.checkpoint_config(out / "checkpoint")
    assert config.train.steps == 10 and config.task == tiny_config.task


# --- many processes: the flags' parsing (the runs: tests/sharding/test_multiprocess.py) ----


def test_mesh_flag_is_parsed_and_errors_name_the_part():
    assert tr.parse_mesh("data=2,model=2") == {"data": 2, "model": 2}
    assert tr.parse_mesh("data=4") == {"data": 4}
    for bad in ("data=2,seq=2", "data=0", "data=two", "data=2,data=2", "data"):
        with pytest.raises(ValueError, match="--mesh: expected comma-separated AXIS=SIZE"):
            tr.parse_mesh(bad)


@pytest.mark.parametrize(
    "flags, detect, environ, expected",
    [
        # one process: no jax.distributed at all
        ({}, False, {}, None),
        ({}, False, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ({}, False, {"OMPI_COMM_WORLD_SIZE": "1"}, None),
        # flags: passed on as given, JAX fills the rest
        (
            {"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
            False,
            {},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        ),
        ({"process_id": 0}, False, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {"process_id": 0}),
        # started together by a launcher, or asked: JAX's cluster detection
        ({}, False, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
        ({}, False, {"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        ({}, False, {"JAX_COORDINATOR_ADDRESS": "h:1"}, {}),
        ({}, True, {}, {}),
    ],
)
def test_distributed_settings_from_flags_and_environment(flags, detect, environ, expected):
    assert tr.distributed_settings(**flags, detect=detect, environ=environ) == expected


def test_resume_needs_more_steps_than_the_checkpoint(tiny_config, trained, tmp_path, capsys):
    checkpoint = tr.save_checkpoint(tmp_path / "checkpoint", trained[0], tiny_config)
    with pytest.raises(SystemExit):
        tr.main(["--resume", str(checkpoint), "--out", str(tmp_path / "again")])
    assert "is at step 40; pass --steps above it" in capsys.readouterr().err
