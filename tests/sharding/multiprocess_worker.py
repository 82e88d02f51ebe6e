"""Several JAX processes on this machine, joined by ``jax.distributed``: the launcher the
multi-process tests use (:func:`launch`) and the worker each process runs.

    python tests/sharding/multiprocess_worker.py SCENARIO --port P --num-processes N
        --process-id I --inputs IN.npz --out DIR

Each process has ``--devices`` CPU devices (``XLA_FLAGS``, set by :func:`launch`), joins
the others over gloo on 127.0.0.1, runs the scenario on one global mesh, and writes what
it saw as ``DIR/process_<I>.npz`` (every array gathered whole to every process), then
leaves through ``jax.distributed.shutdown()``. The model and the steps live here so that
the test computes the one-process run from the same code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

B, T, D, HEADS = 4, 16, 32, 4
STEPS = 2
LEARNING_RATE, MOMENTUM = 0.1, 0.9


# --- launching ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict:
    """This process's environment for a child of ``devices`` CPU devices on the CPU
    platform (``tests/processes.py``; called by the test process, where ``tests/`` is on
    the path, never by a worker)."""
    from processes import child_env as fresh_env

    return fresh_env(devices) | {"JAX_PLATFORMS": "cpu"}


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def launch(commands, log_dir, *, devices: int = 2, timeout: float = 240.0) -> list[str]:
    """Runs ``commands`` (one argv per process) at once, each with ``devices`` CPU devices,
    and returns their stdouts. Raises ``AssertionError`` with every process's exit code
    and the tail of its stderr when one fails or the run outlives ``timeout`` seconds;
    the others are then killed (a process whose peer died waits for it until JAX's own
    timeouts, minutes later)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(devices)
    processes, logs = [], []
    for i, argv in enumerate(commands):
        out, err = log_dir / f"stdout_{i}.txt", log_dir / f"stderr_{i}.txt"
        with out.open("w") as stdout, err.open("w") as stderr:
            processes.append(
                subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
            )
        logs.append((out, err))
    deadline = time.monotonic() + timeout
    failure = None
    while failure is None and any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            failure = "a process failed"
        elif time.monotonic() > deadline:
            failure = f"timed out after {timeout:.0f} s"
        else:
            time.sleep(0.1)
    if failure is None and any(p.returncode for p in processes):
        failure = "a process failed"
    if failure is not None:
        for p in processes:
            if p.poll() is None:
                p.kill()
        for p in processes:
            p.wait()
        report = [f"{len(processes)} processes: {failure}"]
        for i, (p, (_, err)) in enumerate(zip(processes, logs, strict=True)):
            report.append(f"--- process {i}: exit code {p.returncode}; stderr tail:\n{_tail(err)}")
        raise AssertionError("\n".join(report))
    return [out.read_text() for out, _ in logs]


def worker_commands(scenario: str, num_processes: int, inputs, out) -> list[list[str]]:
    """The argv of every process of one run of ``scenario`` (a fresh port)."""
    port = free_port()
    return [
        [
            sys.executable,
            str(Path(__file__).resolve()),
            scenario,
            f"--port={port}",
            f"--num-processes={num_processes}",
            f"--process-id={i}",
            f"--inputs={inputs}",
            f"--out={out}",
        ]
        for i in range(num_processes)
    ]


# --- the model both sides train ----------------------------------------------------------


def make_model():
    """A 2-block model of ``ja.MultiHeadAttention`` (heads over ``"model"`` by its
    partition metadata) with pre-norm MLPs: ``[B, T, D] -> [B, T, D]``."""
    import flax.linen as nn

    import jax_attn as ja

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            attention = ja.MultiHeadAttention(
                D, D, T, 0.0, HEADS, qkv_bias=True, model_axis="model"
            )
            x = x + attention(nn.LayerNorm()(x), deterministic=True)
            return x + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(nn.LayerNorm()(x))))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = Block()(x)
            return nn.Dense(D)(x)

    return Model()


def init_variables(model):
    """The model's variables, partition metadata boxes included (key 0, same everywhere)."""
    import jax
    import jax.numpy as jnp

    return model.init(jax.random.key(0), jnp.zeros((1, T, D), jnp.float32))


def train_steps(model, params, x, y, steps: int = STEPS):
    """``steps`` SGD-with-momentum steps of the mean squared error: ``(params, opt_state,
    losses)``. The same jitted step runs sharded (global arrays) or on one device."""
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(params):
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, x, y)
        losses.append(value)
    return params, opt_state, losses


def flat(tree) -> dict:
    """``{"a/b/c": leaf}`` for saving a tree as one ``.npz``."""
    import jax

    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# --- scenarios (run in each process) -------------------------------------------------------


def _gather(tree):
    """Every leaf whole, as numpy, on every process (a collective: all processes call it)."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def scenario_ring(inputs, out):
    """Causal ring attention over the 4 global devices: output and q/k/v gradients."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_attn import sharding

    mesh = sharding.make_mesh(seq=len(jax.devices()))
    on_mesh = NamedSharding(mesh, P(None, "seq"))
    q, k, v, d_out = (jax.device_put(inputs[name], on_mesh) for name in ("q", "k", "v", "d_out"))

    @jax.jit
    def value_and_grads(q, k, v, d_out):
        def loss(q, k, v):
            out = sharding.ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
            return jnp.sum(out * d_out), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return (out, *grads)

    compiled = value_and_grads.lower(q, k, v, d_out).compile()
    out, dq, dk, dv = _gather(compiled(q, k, v, d_out))
    hlo = compiled.as_text()
    return {
        "out": out,
        "dq": dq,
        "dk": dk,
        "dv": dv,
        "collective_permutes": hlo.count("collective-permute"),
        "all_gathers": hlo.count("all-gather"),
        "devices": len(jax.devices()),
    }


def _placed_params(mesh):
    """The model's params laid out on ``mesh`` from its partition metadata."""
    import flax.linen as nn

    from jax_attn import sharding

    variables = init_variables(make_model())
    return nn.unbox(sharding.shard_params(variables["params"], mesh, num_heads=HEADS))


def scenario_train(inputs, out):
    """Two optimizer steps on a data=2 x model=2 mesh, each process feeding its own rows
    of the batch; then the params and optimizer state written as one orbax checkpoint by
    every process (``out/checkpoint``)."""
    import jax
    import numpy as np

    from jax_attn import sharding
    from jax_attn.apps import train as tr

    mesh = sharding.make_mesh(data=2, model=2)
    params = _placed_params(mesh)
    rows = sharding.process_batch_rows(mesh, B)
    x = sharding.global_batch(inputs["x"][rows], mesh)
    y = sharding.global_batch(inputs["y"][rows], mesh)
    params, opt_state, losses = train_steps(make_model(), params, x, y)
    tr.save_checkpoint(Path(out) / "checkpoint", {"params": params, "opt_state": opt_state})
    kernel = params["Block_0"]["MultiHeadAttention_0"]["W_query"]["kernel"]
    return {
        **flat(_gather({"params": params, "opt_state": opt_state})),
        "losses": np.asarray([float(loss) for loss in losses]),
        "rows": np.asarray([rows.start, rows.stop]),
        "query_kernel_shards": len({str(s.index) for s in kernel.addressable_shards}),
        "devices": len(jax.devices()),
    }


def scenario_restore(inputs, out):
    """A fresh set of processes reads the checkpoint of :func:`scenario_train` onto its own
    mesh (the template: a fresh init and optimizer state, laid out the same way)."""
    import jax
    import optax

    from jax_attn import sharding
    from jax_attn.apps import train as tr

    del inputs
    mesh = sharding.make_mesh(data=2, model=2)
    params = _placed_params(mesh)
    template = {
        "params": params,
        "opt_state": optax.sgd(LEARNING_RATE, momentum=MOMENTUM).init(params),
    }
    restored = tr.restore_checkpoint(Path(out) / "checkpoint", template)
    same_shardings = all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(template), strict=True)
    )
    return {**flat(_gather(restored)), "same_shardings": same_shardings}


SCENARIOS = {"ring": scenario_ring, "train": scenario_train, "restore": scenario_restore}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    # CPU collectives across processes go over gloo (TCP); set before the backend starts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    try:
        with np.load(args.inputs) as inputs:
            result = SCENARIOS[args.scenario](dict(inputs), args.out)
        result["process_index"] = jax.process_index()
        result["process_count"] = jax.process_count()
        np.savez(Path(args.out) / f"process_{args.process_id}.npz", **result)
    except BaseException:
        # no shutdown: it waits for the peers, which may wait for this process forever
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
