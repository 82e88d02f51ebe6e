"""Two JAX processes of two CPU devices each, joined by ``jax.distributed`` on 127.0.0.1
(gloo collectives), equal one process: ring attention forward and gradients over the 4
global devices, a data x model training run fed per process, an orbax checkpoint written
by both and read back by a fresh pair and by one process, and ``jax-attn train`` on two
processes resumed on two and on one.

The processes run ``multiprocess_worker.py`` (or the ``jax-attn`` command); the test
computes the one-process result here and compares."""

import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import multiprocess_worker as mp
import numpy as np
import pytest
from conftest import make_qkv_numpy, tiny_train_toml

from jax_attn import reference

pytest.importorskip("orbax.checkpoint")

# one process's start (imports, joining the others) is about 2 s on an idle machine; the
# bound leaves room for a loaded one
TIMEOUT = 300


def run_workers(scenario, tmp_path, inputs=None, num_processes=2):
    """Runs ``scenario`` on ``num_processes`` processes; their results, by process."""
    path = tmp_path / "inputs.npz"
    if not path.exists():
        np.savez(path, **(inputs or {}))
    commands = mp.worker_commands(scenario, num_processes, path, tmp_path)
    mp.launch(commands, tmp_path / f"logs_{scenario}", timeout=TIMEOUT)
    results = []
    for i in range(num_processes):
        with np.load(tmp_path / f"process_{i}.npz") as result:
            results.append(dict(result))
        (tmp_path / f"process_{i}.npz").unlink()
    return results


@pytest.mark.slow
def test_ring_attention_over_two_processes_equals_the_reference(tmp_path, attention_float64):
    q, k, v = make_qkv_numpy(B=1, T=16, S=16, N=2, K=1, H=8)
    d_out = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    results = run_workers("ring", tmp_path, dict(q=q, k=k, v=v, d_out=d_out))

    def attention(q, k, v):
        return reference.dot_product_attention(q, k, v, is_causal=True)

    _, vjp = jax.vjp(attention, q, k, v)
    out = attention_float64(q, k, v, is_causal=True)
    for i, result in enumerate(results):
        assert (result["process_index"], result["process_count"], result["devices"]) == (i, 2, 4)
        # the blocks travel between devices, across the process boundary too; nothing gathers
        assert result["collective_permutes"] > 0 and result["all_gathers"] == 0
        for name, want in zip(
            ("out", "dq", "dk", "dv"), (out, *vjp(jnp.asarray(d_out))), strict=True
        ):
            np.testing.assert_allclose(result[name], want, rtol=1e-5, atol=1e-5, err_msg=name)


# --- training and checkpoints: slow (three runs of two processes, each compiling a model)


@pytest.fixture(scope="module")
def one_process_run():
    """The worker's model trained on one device here: ``(params, opt_state, losses, x, y)``."""
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((mp.B, mp.T, mp.D)).astype(np.float32) for _ in range(2))
    model = mp.make_model()
    params = nn.unbox(mp.init_variables(model))["params"]
    params, opt_state, losses = mp.train_steps(model, params, jnp.asarray(x), jnp.asarray(y))
    return params, opt_state, [float(v) for v in losses], x, y


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, one_process_run):
    """The worker's ``train`` on 2 processes x 2 devices; its directory and results."""
    *_, x, y = one_process_run
    out = tmp_path_factory.mktemp("train")
    return out, run_workers("train", out, dict(x=x, y=y))


def assert_trees_close(got: dict, want_tree, rtol=1e-5, atol=1e-6):
    want = mp.flat(want_tree)
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.slow
def test_data_model_training_over_two_processes_equals_one_device(one_process_run, two_process_run):
    params, opt_state, losses, *_ = one_process_run
    _, results = two_process_run
    for i, result in enumerate(results):
        # each process fed its own half of the batch, its devices along "model"
        assert result["rows"].tolist() == [i * mp.B // 2, (i + 1) * mp.B // 2]
        assert result["query_kernel_shards"] == 2  # the heads split over "model"
        np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
        assert_trees_close(result, {"params": params, "opt_state": opt_state})


@pytest.mark.slow
def test_checkpoint_of_two_processes_is_read_by_a_fresh_pair_and_by_one_process(
    one_process_run, two_process_run
):
    from jax_attn.apps import train as tr

    out, saved = two_process_run
    # both processes wrote their share of the arrays
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {
        p.name for p in (out / "checkpoint" / "state").iterdir()
    }
    want = {k: v for k, v in saved[0].items() if k.startswith(("params/", "opt_state/"))}
    for result in run_workers("restore", out):
        assert result["same_shardings"]
        for name, value in want.items():
            np.testing.assert_array_equal(result[name], value, err_msg=name)
    params, opt_state, *_ = one_process_run
    one = tr.restore_checkpoint(out / "checkpoint", {"params": params, "opt_state": opt_state})
    for name, value in mp.flat(one).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


# --- `jax-attn train` on many processes --------------------------------------------------


# tests/apps/test_train.py's tiny decoder, on 2 kv heads (a model axis of 2), for 4 steps
TINY_CHANGES = {
    "model.num_kv_heads": 2,
    "train.steps": 4,
    "train.batch_size": 8,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.eval_examples": 4,
}


def train_commands(num_processes, *args):
    port = mp.free_port()
    return [
        [
            sys.executable,
            "-m",
            "jax_attn",
            "train",
            *args,
            "--no-progress",
            *(
                [f"--coordinator=127.0.0.1:{port}", f"--num-processes={num_processes}"]
                + [f"--process-id={i}"]
                if num_processes > 1
                else []
            ),
        ]
        for i in range(num_processes)
    ]


@pytest.mark.slow
def test_train_command_on_two_processes_equals_one_and_resumes_on_two_and_one(tmp_path):
    from jax_attn.apps import train as tr

    config_path = tmp_path / "tiny.toml"
    config_path.write_text(tiny_train_toml(tmp_path / "unused", TINY_CHANGES))
    config = tr.load_train_config(config_path)
    first = tmp_path / "first"
    printed = mp.launch(
        train_commands(
            2, f"--config={config_path}", f"--out={first}", "--steps=2", "--mesh=data=2,model=2"
        ),
        tmp_path / "logs_first",
        timeout=TIMEOUT,
    )
    # process 0 prints and plots; the others print nothing of the run
    assert "restored: bit-exact" in printed[0] and "mesh data=2" in printed[0]
    assert "restored" not in printed[1] and tr.WROTE not in printed[1]
    assert (first / "loss.png").is_file()

    # two steps on two processes (a data=2 x model=2 mesh) = two steps on one device
    two_steps = dataclasses.replace(
        config, train=dataclasses.replace(config.train, steps=2, warmup_steps=1)
    )
    state, _, _ = tr.train(
        tr.build_decoder(two_steps), two_steps.task, two_steps.train, progress=False
    )
    assert_trees_close(
        mp.flat(jax.device_get(tr.checkpoint_params(first / "checkpoint"))),
        state["params"],
        rtol=1e-4,
        atol=1e-6,
    )

    # resumed to step 4 by a fresh pair (batch over all 4 devices, the default) and by one
    # process (one device): the same state
    resumed = {}
    for processes in (2, 1):
        out = tmp_path / f"resumed_{processes}"
        printed = mp.launch(
            train_commands(
                processes, f"--resume={first / 'checkpoint'}", f"--out={out}", "--steps=4"
            ),
            tmp_path / f"logs_resumed_{processes}",
            timeout=TIMEOUT,
        )
        assert "resumed from step 2" in printed[0]
        restored = tr.restore_checkpoint(out / "checkpoint", state)
        assert int(restored["step"]) == 4
        resumed[processes] = restored
    assert_trees_close(mp.flat(resumed[2]), resumed[1], rtol=1e-4, atol=1e-6)


# --- the per-process batch helpers on one process (8 devices) -----------------------------


def test_global_batch_on_one_process_is_shard_batch():
    from jax_attn import sharding

    mesh = sharding.make_mesh(data=2, model=4)
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    assert sharding.process_batch_rows(mesh, 4) == slice(0, 4)
    batch = sharding.global_batch(x, mesh)
    assert batch.sharding == sharding.batch_sharding(mesh, 3)
    np.testing.assert_array_equal(batch, x)
    with pytest.raises(ValueError, match=r"local must have 4 rows, got 3"):
        sharding.global_batch(x[:3], mesh, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size=3 must be a positive multiple of .* 2"):
        sharding.process_batch_rows(mesh, 3)
