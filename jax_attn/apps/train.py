"""``jax-attn train``: a small decoder trained on a generated task, decoded with the KV cache.

The model is built from this library's modules: token and position embeddings, blocks
of :class:`~jax_attn.linen_modules.MultiHeadAttention` + MLP with residuals and pre-layer-norm,
an output head. Training uses optax AdamW with a warm-up + cosine schedule, dropout
through the ``"dropout"`` stream (evaluation runs without it). After training the
checkpoint is saved, restored (and checked bit-exact), and the restored model generates
one token at a time through the KV cache, greedy and with temperature / top-k. The checkpoint
is an orbax directory (params, optimizer state, step and the run's config as JSON).

Tasks (data made by code, no downloads), both need a look far back:

* ``copy``: ``x_1 .. x_L SEP`` -> ``x_1 .. x_L``: the second half repeats the first.
* ``recall``: associative recall, ``k_1 v_1 .. k_n v_n SEP q_1 a_1 .. q_n a_n``: after the
  separator every key comes back once in a random order and must be followed by its value.

A config with a ``[compare]`` table trains, for each length, the attention model and a
recurrent baseline (``flax.linen.RNN`` over a GRU or LSTM cell, same embedding width) and
prints / plots accuracy against length: the chapter's argument that a recurrent state
cannot keep everything while attention can look back.

    jax-attn train --config configs/copy.toml
    jax-attn train --config configs/recall-vs-rnn.toml
    jax-attn train --decode-bench           # cached decode step vs full recompute

On many processes (``jax.distributed``; one per host, or several on one machine) every
process runs the same command with ``--coordinator``, ``--num-processes`` and
``--process-id`` (or none of them where SLURM, Open MPI or Cloud TPU say so, with
``--distributed``), the state laid out on one global mesh (``--mesh data=2,model=2``);
process 0 prints and plots, every process writes its share of the checkpoint.
``--resume CHECKPOINT`` continues a run on the same or another number of processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn import kv_cache, sharding
from jax_attn.apps import timing
from jax_attn.apps.config import (
    ConfigError,
    check_choice,
    from_dict,
    load_dataclass,
    resolve_config_path,
)
from jax_attn.apps.extras import require
from jax_attn.linen_modules import MultiHeadAttention

optax = require("optax")

__all__ = [
    "TaskConfig",
    "ModelConfig",
    "TrainConfig",
    "GenerateConfig",
    "CompareConfig",
    "TrainRunConfig",
    "load_train_config",
    "Decoder",
    "RNNLanguageModel",
    "make_batch",
    "train",
    "evaluate",
    "generate",
    "sample_logits",
    "save_checkpoint",
    "restore_checkpoint",
    "checkpoint_config",
    "checkpoint_params",
    "decode_benchmark",
    "parse_mesh",
    "distributed_settings",
    "place_state",
    "attention_weights_by_layer",
    "head_figures",
    "main",
]

TASKS = ("copy", "recall")
CELLS = ("gru", "lstm")


# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """``name``: ``"copy"`` or ``"recall"``; ``length``: tokens to copy / key-value pairs;
    ``vocab_size``: symbols (copy) or values (recall; keys get as many)."""

    name: str
    length: int
    vocab_size: int

    def __post_init__(self):
        check_choice("name", self.name, TASKS)
        if self.length <= 0 or self.vocab_size <= 1:
            raise ValueError(
                f"length must be > 0 and vocab_size > 1, got {self.length}, {self.vocab_size}"
            )
        if self.name == "recall" and self.length > self.vocab_size:
            raise ValueError(
                f"recall needs length (pairs) <= vocab_size (distinct keys), "
                f"got {self.length} > {self.vocab_size}"
            )

    @property
    def sequence_length(self) -> int:
        """Tokens of one example: ``2L + 1`` (copy) or ``4n + 1`` (recall)."""
        return 2 * self.length + 1 if self.name == "copy" else 4 * self.length + 1

    @property
    def prompt_length(self) -> int:
        """Tokens up to and including the separator."""
        return self.length + 1 if self.name == "copy" else 2 * self.length + 1

    @property
    def tokens(self) -> int:
        """Vocabulary of the model: symbols (x2 for recall) plus the separator."""
        return self.vocab_size + 1 if self.name == "copy" else 2 * self.vocab_size + 1

    @property
    def separator(self) -> int:
        return self.tokens - 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    seed: int
    log_every: int
    eval_examples: int

    def __post_init__(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """``show``: examples printed; sampled generations use ``temperature`` and ``top_k``."""

    show: int
    temperature: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Attention vs RNN at each task ``lengths``; the RNN has ``rnn_hidden`` units."""

    lengths: tuple[int, ...]
    rnn_cell: str
    rnn_hidden: int
    rnn_learning_rate: float

    def __post_init__(self):
        check_choice("rnn_cell", self.rnn_cell, CELLS)
        if not self.lengths:
            raise ValueError("lengths must not be empty")


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """A ``configs/<name>.toml`` for ``jax-attn train``."""

    output_dir: str
    task: TaskConfig
    model: ModelConfig
    train: TrainConfig
    generate: GenerateConfig
    compare: CompareConfig | None = None


def load_train_config(path) -> TrainRunConfig:
    """Reads a training config; unknown or missing keys are errors naming key and file."""
    return load_dataclass(resolve_config_path(path), TrainRunConfig)


# --- data -----------------------------------------------------------------------------------


def make_batch(key, task: TaskConfig, batch_size: int):
    """``(tokens [B, L_seq] int32, targets [B, L_seq] bool)``: ``targets`` marks the tokens
    that are predictable (the copy, or the recalled values)."""
    B, L, V = batch_size, task.length, task.vocab_size
    separator = jnp.full((B, 1), task.separator, jnp.int32)
    if task.name == "copy":
        symbols = jax.random.randint(key, (B, L), 0, V, jnp.int32)
        tokens = jnp.concatenate([symbols, separator, symbols], axis=1)
        targets = jnp.arange(tokens.shape[1]) > L
        return tokens, jnp.broadcast_to(targets, tokens.shape)
    key_keys, key_values, key_order = jax.random.split(key, 3)
    # distinct keys per example: the first L of a random permutation of V key symbols
    keys = jax.vmap(lambda k: jax.random.permutation(k, V)[:L])(jax.random.split(key_keys, B))
    values = jax.random.randint(key_values, (B, L), 0, V, jnp.int32) + V
    order = jax.vmap(lambda k: jax.random.permutation(k, L))(jax.random.split(key_order, B))
    queries = jnp.take_along_axis(keys, order, axis=1)
    answers = jnp.take_along_axis(values, order, axis=1)

    def interleave(a, b):
        return jnp.stack([a, b], axis=2).reshape(B, 2 * L)

    tokens = jnp.concatenate(
        [interleave(keys, values), separator, interleave(queries, answers)], axis=1
    ).astype(jnp.int32)
    position = jnp.arange(tokens.shape[1])
    targets = (position > 2 * L) & ((position - 2 * L) % 2 == 0)
    return tokens, jnp.broadcast_to(targets, tokens.shape)


# --- models ---------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    context_length: int
    mlp_ratio: int
    dropout: float
    decode: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool, lengths=None, *, sow_weights: bool = False):
        attention = MultiHeadAttention(
            self.d_model,
            self.d_model,
            self.context_length,
            self.dropout,
            self.num_heads,
            num_kv_heads=self.num_kv_heads,
            decode=self.decode,
            name="attention",
        )
        h = attention(
            nn.LayerNorm(name="norm_1")(x),
            deterministic=deterministic,
            lengths=lengths,
            sow_weights=sow_weights,
        )
        x = x + nn.Dropout(self.dropout)(h, deterministic)
        h = nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(nn.LayerNorm(name="norm_2")(x))
        h = nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h))
        return x + nn.Dropout(self.dropout)(h, deterministic)


class Decoder(nn.Module):
    """Decoder-only language model: ``tokens [B, T]`` -> logits ``[B, T, vocab_size]``.

    With ``decode=True`` every block keeps a KV cache and the model its position, both in
    the ``"cache"`` collection; ``lengths [B]`` marks the real tokens of a padded block.
    ``sow_weights=True`` sows each block's attention weights ``[B, N, T, T]`` in
    ``"intermediates"`` (``block_<i>/attention/attention_weights``).
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_ratio: int
    dropout: float
    decode: bool = False

    @nn.compact
    def __call__(
        self, tokens, deterministic: bool = True, lengths=None, *, sow_weights: bool = False
    ):
        B, T = tokens.shape
        positions = jnp.arange(T)[None, :]
        if self.decode:
            cached = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((B,), jnp.int32))
            if cached:
                positions = position.value[:, None] + jnp.arange(T)[None, :]
                position.value = position.value + (T if lengths is None else lengths)
        x = nn.Embed(self.vocab_size, self.d_model, name="token_embedding")(tokens)
        x = x + nn.Embed(self.context_length, self.d_model, name="position_embedding")(positions)
        x = nn.Dropout(self.dropout)(x, deterministic)
        for i in range(self.num_layers):
            x = Block(
                self.d_model,
                self.num_heads,
                self.num_kv_heads,
                self.context_length,
                self.mlp_ratio,
                self.dropout,
                self.decode,
                name=f"block_{i}",
            )(x, deterministic, lengths, sow_weights=sow_weights)
        return nn.Dense(self.vocab_size, name="head")(nn.LayerNorm(name="final_norm")(x))


if TYPE_CHECKING:
    # built from Decoder's fields at run time, which a type checker cannot follow
    ModelConfig = Any
else:
    ModelConfig = dataclasses.make_dataclass(
        "ModelConfig",
        [
            (field.name, field.type)
            for field in dataclasses.fields(Decoder)
            if field.name not in ("vocab_size", "context_length", "decode", "parent", "name")
        ],
        namespace={
            "__module__": __name__,
            "__doc__": "A config's ``[model]`` table: the :class:`Decoder`'s fields less those "
            "the task (``vocab_size``, ``context_length``), the caller (``decode``) and Flax "
            "(``parent``, ``name``) give.",
        },
        frozen=True,
    )


class RNNLanguageModel(nn.Module):
    """Recurrent baseline: embedding (width ``d_model``) -> ``nn.RNN`` (GRU or LSTM cell)
    -> output head. Its only memory of the past is the carry of ``hidden`` units."""

    vocab_size: int
    d_model: int
    hidden: int
    cell: str = "gru"

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        del deterministic
        x = nn.Embed(self.vocab_size, self.d_model, name="token_embedding")(tokens)
        cell = nn.GRUCell(self.hidden) if self.cell == "gru" else nn.OptimizedLSTMCell(self.hidden)
        x = nn.RNN(cell, name="rnn")(x)
        return nn.Dense(self.vocab_size, name="head")(x)


def build_decoder(config: TrainRunConfig, decode: bool = False) -> Decoder:
    """The config's decoder: its task's vocabulary and sequence length, its ``[model]``."""
    return Decoder(
        config.task.tokens,
        config.task.sequence_length,
        **dataclasses.asdict(config.model),
        decode=decode,
    )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# --- training -------------------------------------------------------------------------------


def make_optimizer(train_config: TrainConfig, learning_rate: float | None = None):
    """AdamW on a warm-up + cosine schedule, gradients clipped to norm 1."""
    peak = train_config.learning_rate if learning_rate is None else learning_rate
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=train_config.warmup_steps,
        decay_steps=train_config.steps,
        end_value=peak * 0.01,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=train_config.weight_decay),
    )


def masked_loss_and_accuracy(model, params, tokens, targets, **apply_kwargs):
    """Cross-entropy and accuracy of next-token predictions on the ``targets`` tokens:
    logits of ``tokens[:, :-1]`` against ``tokens[:, 1:]``."""
    logits = model.apply({"params": params}, tokens[:, :-1], **apply_kwargs)
    labels, weights = tokens[:, 1:], targets[:, 1:].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / total, (correct * weights).sum() / total


def init_state(model: nn.Module, task: TaskConfig, train_config: TrainConfig, optimizer):
    tokens = jnp.zeros((1, task.sequence_length - 1), jnp.int32)

    @jax.jit
    def init(key):
        params = model.init(key, tokens)["params"]
        step = jnp.zeros((), jnp.int32)
        return {"step": step, "params": params, "opt_state": optimizer.init(params)}

    return init(jax.random.key(train_config.seed))


def make_train_step(
    model: nn.Module,
    task: TaskConfig,
    train_config: TrainConfig,
    optimizer,
    state_shardings=None,
):
    """``state -> (state, loss)``: one jitted step on a fresh batch made from the step.

    ``state_shardings`` (the placed state's, :func:`place_state`): the step keeps the state
    so laid out and makes the batch split over the mesh's ``"data"`` axis, each device its
    own rows (the same tokens as on one device)."""
    data_key, dropout_key = jax.random.split(jax.random.key(train_config.seed + 1))
    mesh = None
    if state_shardings is not None:
        mesh = jax.tree.leaves(state_shardings)[0].mesh

    def loss_fn(params, tokens, targets, rng):
        return masked_loss_and_accuracy(
            model, params, tokens, targets, deterministic=False, rngs={"dropout": rng}
        )[0]

    def step(state):
        tokens, targets = make_batch(
            jax.random.fold_in(data_key, state["step"]), task, train_config.batch_size
        )
        if mesh is not None:
            tokens, targets = jax.lax.with_sharding_constraint(
                (tokens, targets), sharding.batch_sharding(mesh, 2)
            )
        rng = jax.random.fold_in(dropout_key, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], tokens, targets, rng)
        # optax mixes Python floats with its int32 step count: standard promotion, here only
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, loss

    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, out_shardings=(state_shardings, replicated))


def place_state(state, mesh, optimizer, num_heads: int | None = None):
    """The training state on ``mesh``: params by :func:`jax_attn.sharding.shard_params`
    (attention heads over ``"model"``, the rest replicated), the optimizer's per-parameter
    state (Adam's moments) laid out as its params, everything else (step, counts)
    replicated. Every process passes the same values (the same seed made them)."""
    specs = sharding.param_specs(
        state["params"],
        "model" if "model" in mesh.axis_names else None,
        model_size=int(dict(mesh.shape).get("model", 1)),
        num_heads=num_heads,
    )
    params = sharding.shard_params(state["params"], mesh, num_heads=num_heads)
    replicated = NamedSharding(mesh, P())
    opt_state = optax.tree_map_params(
        optimizer,
        lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)),
        state["opt_state"],
        specs,
        transform_non_params=lambda leaf: jax.device_put(leaf, replicated),
        is_leaf=lambda x: isinstance(x, P),
    )
    step = jax.device_put(state["step"], replicated)
    return {"step": step, "params": params, "opt_state": opt_state}


def train(
    model,
    task: TaskConfig,
    train_config: TrainConfig,
    *,
    learning_rate=None,
    desc: str = "train",
    progress: bool = True,
    mesh=None,
    resume=None,
):
    """Trains ``model`` on ``task``; returns ``(state, losses [(step, loss)], seconds)``.

    ``mesh``: the state laid out on it (:func:`place_state`), the batch over its
    ``"data"`` axis; under ``jax.distributed`` a global mesh, every process calling.
    ``resume``: a checkpoint (:func:`save_checkpoint`) whose state training continues
    from, up to ``train_config.steps``; it may come from another mesh or process count.
    """
    tqdm = require("tqdm.auto").tqdm

    optimizer = make_optimizer(train_config, learning_rate)
    state = init_state(model, task, train_config, optimizer)
    state_shardings = None
    if mesh is not None:
        state = place_state(state, mesh, optimizer, getattr(model, "num_heads", None))
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if resume is not None:
        # the fresh state as the template: its tree, dtypes and shardings
        state = restore_checkpoint(resume, state)
    step = make_train_step(model, task, train_config, optimizer, state_shardings)
    first = int(state["step"])
    losses = []
    start = time.perf_counter()
    bar = tqdm(
        range(first, train_config.steps),
        desc=desc,
        disable=not progress or jax.process_index() != 0,
        leave=False,
        file=sys.stderr,
        mininterval=1.0,
    )
    for i in bar:
        state, loss = step(state)
        if (i + 1) % train_config.log_every == 0 or i + 1 == train_config.steps:
            losses.append((i + 1, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
    bar.close()
    return state, losses, time.perf_counter() - start


def evaluate(model, params, task: TaskConfig, examples: int, seed: int = 12345):
    """Teacher-forced accuracy on the target tokens of ``examples`` fresh sequences."""
    tokens, targets = make_batch(jax.random.key(seed), task, examples)

    @jax.jit
    def accuracy(params):
        return masked_loss_and_accuracy(model, params, tokens, targets)[1]

    return float(accuracy(params))


# --- checkpoints ----------------------------------------------------------------------------

CHECKPOINT = "checkpoint"
"""The checkpoint directory's name in a run's output directory."""


def _orbax():
    """``orbax.checkpoint``, imported on first use (the library never loads it)."""
    return require("orbax.checkpoint")


def _checkpointer():
    """A synchronous orbax checkpointer for the two items, ``state`` and ``config``."""
    ocp = _orbax()
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()
    )
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def save_checkpoint(path, state, config: TrainRunConfig | None = None) -> Path:
    """Writes the state pytree (params, optimizer state, step) as an orbax checkpoint
    directory ``path``, replacing one already there: item ``state`` (the arrays, orbax's
    standard PyTree format) and, given ``config``, item ``config`` (the run's config as
    JSON). Returns the path."""
    ocp = _orbax()
    path = Path(path).absolute()
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
        items["config"] = ocp.args.JsonSave(dataclasses.asdict(config))
    with _checkpointer() as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(**items), force=True)
    return path


def restore_checkpoint(path, template):
    """Reads the ``state`` of a checkpoint into the structure of ``template`` (bit-exact).

    ``template`` is a state pytree of arrays or of ``jax.ShapeDtypeStruct`` (say
    ``jax.eval_shape`` of the state's init): its tree (optax's state namedtuples included),
    dtypes and shardings are the restored arrays'. Sharded arrays are restored onto the
    shardings of ``template``'s arrays (a ``jax.eval_shape`` of sharded arrays carries an
    abstract mesh, which orbax cannot place: pass the arrays, or structs with a concrete
    ``NamedSharding``)."""
    ocp = _orbax()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            Path(path).absolute(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
        )
    return restored["state"]


def checkpoint_config(path) -> TrainRunConfig:
    """The config of the run that wrote the checkpoint ``path``."""
    ocp = _orbax()
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            Path(path).absolute(), args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
    return from_dict(TrainRunConfig, restored["config"], source=f"{path}/config")


# --- generation -----------------------------------------------------------------------------


def sample_logits(key, logits, temperature: float = 0.0, top_k: int = 0):
    """Next tokens ``[B]`` from logits ``[B, V]``: greedy when ``temperature == 0``, else
    softmax(logits / temperature) restricted to the ``top_k`` largest (0: all)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _generator(decoder: Decoder, num_new: int, temperature: float, top_k: int):
    """Jitted, overflow-checked (``kv_cache.checked``) generation loop for ``decoder``."""

    def run(params, prompt, prompt_lengths, key, forced):
        B = prompt.shape[0]
        empty = jax.eval_shape(
            decoder.init, jax.random.key(0), jnp.zeros((B, decoder.context_length), jnp.int32)
        )["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), empty)
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            prompt,
            lengths=prompt_lengths,
            mutable=["cache"],
        )
        # [B, V]: logits after each sequence's last real prompt token
        last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
        keys = jax.random.split(key, num_new)

        def choose(step_key, logits, i):
            sampled = sample_logits(step_key, logits, temperature, top_k)
            return jnp.where(forced[:, i] >= 0, forced[:, i], sampled)

        first = choose(keys[0], last, 0)

        def step(carry, inputs):
            cache, token = carry
            step_key, i = inputs
            logits, updated = decoder.apply(
                {"params": params, "cache": cache}, token[:, None], mutable=["cache"]
            )
            next_token = choose(step_key, logits[:, 0], i)
            return (updated["cache"], next_token), next_token

        _, rest = jax.lax.scan(step, (updated["cache"], first), (keys[1:], jnp.arange(1, num_new)))
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    return kv_cache.checked(run)


def generate(
    decoder: Decoder,
    params,
    prompt,
    num_new: int,
    key=None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    prompt_lengths=None,
    forced=None,
):
    """``num_new`` tokens ``[B, num_new]`` after ``prompt [B, P]``, one at a time through the
    KV cache. ``prompt_lengths [B]``: real tokens of right-padded prompts (default ``P``).
    ``forced [B, num_new]``: tokens fed instead of sampled where ``>= 0`` (e.g. the queries
    of the recall task). The same ``key`` gives the same tokens."""
    if not decoder.decode:
        raise ValueError("generate needs a Decoder with decode=True")
    prompt = jnp.asarray(prompt, jnp.int32)
    B, P = prompt.shape
    if P + num_new - 1 > decoder.context_length:
        raise ValueError(
            f"prompt of {P} tokens + num_new={num_new} needs {P + num_new - 1} cache slots, "
            f"but context_length={decoder.context_length}"
        )
    if forced is None:
        forced = jnp.full((B, num_new), -1, jnp.int32)
    elif jnp.shape(forced) != (B, num_new):
        raise ValueError(
            f"forced must have shape [B, num_new] = {[B, num_new]}, got {list(jnp.shape(forced))}"
        )
    lengths = jnp.full((B,), P, jnp.int32) if prompt_lengths is None else prompt_lengths
    key = jax.random.key(0) if key is None else key
    return _generator(decoder, num_new, float(temperature), int(top_k))(
        params, prompt, jnp.asarray(lengths, jnp.int32), key, jnp.asarray(forced, jnp.int32)
    )


def generation_accuracy(decoder, params, task: TaskConfig, examples: int, seed: int = 12345):
    """Greedy generation after the prompt; accuracy on the target tokens (and whole answers).

    Recall queries are part of the task's input: they are fed (``forced``) and only the
    answers are generated and scored."""
    tokens, _ = make_batch(jax.random.key(seed), task, examples)
    generated, answers = generate_answers(decoder, params, task, tokens)
    correct = generated == answers
    return float(correct.mean()), float(correct.all(axis=1).mean()), generated


def generate_answers(decoder, params, task: TaskConfig, tokens, key=None, **sampling):
    """``(generated answers, true answers)`` ``[B, L]`` for a batch of task ``tokens``.

    Copy: the prompt is ``x |`` and all ``L`` tokens are generated. Recall: the prompt is
    the pairs, ``|`` and the first query; later queries are fed (``forced``) and only the
    answers are generated."""
    tokens = np.asarray(tokens)
    P = task.prompt_length
    if task.name == "copy":
        out = generate(decoder, params, tokens[:, :P], task.length, key, **sampling)
        return np.asarray(out), tokens[:, P:]
    # after the prompt: answer, query, answer, ..., answer
    forced = np.full((tokens.shape[0], 2 * task.length - 1), -1, np.int32)
    forced[:, 1::2] = tokens[:, P + 2 :: 2]
    out = generate(
        decoder, params, tokens[:, : P + 1], 2 * task.length - 1, key, forced=forced, **sampling
    )
    return np.asarray(out)[:, ::2], tokens[:, P + 1 :: 2]


def format_tokens(tokens, task: TaskConfig) -> str:
    names = []
    for t in np.asarray(tokens).tolist():
        if t == task.separator:
            names.append("|")
        elif task.name == "recall":
            names.append(f"k{t}" if t < task.vocab_size else f"v{t - task.vocab_size}")
        else:
            names.append(str(t))
    return " ".join(names)


# --- plots ----------------------------------------------------------------------------------


def _pyplot():
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def plot_losses(curves: dict, path) -> None:
    """Loss curves ``{label: [(step, loss)]}`` to a PNG (matplotlib imported here)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_length(rows: list[dict], task_name: str, path) -> None:
    plt = _pyplot()

    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [r["attention_accuracy"] for r in rows], "o-", label="attention")
    ax.plot(lengths, [r["rnn_accuracy"] for r in rows], "s-", label=rows[0]["rnn_label"])
    ax.axhline(rows[0]["chance"], color="gray", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"{task_name} length")
    ax.set_ylabel("accuracy on target tokens")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- what the attention layers look at -------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _sown_intermediates(decoder: Decoder, params, tokens):
    _, state = decoder.apply(
        {"params": params}, tokens, deterministic=True, sow_weights=True, mutable=["intermediates"]
    )
    return state["intermediates"]


def attention_weights_by_layer(decoder: Decoder, params, tokens) -> list[jax.Array]:
    """Causal attention weights ``[N, T, T]`` of every layer of ``decoder`` on one
    sequence ``tokens [T]``: what each block's ``MultiHeadAttention`` sows with
    ``sow_weights=True`` (the ``"intermediates"`` collection), nothing recomputed.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must have shape [T], got {list(tokens.shape)}")
    state = _sown_intermediates(decoder, params, tokens[None])
    weights = []
    for i in range(decoder.num_layers):
        # [1, N, T, T]
        (sown,) = state[f"block_{i}"]["attention"]["attention_weights"]
        weights.append(sown[0])
    return weights


def head_figures(config: TrainRunConfig, params, *, seed: int = 0) -> dict:
    """Every head of every layer of a trained decoder on one fresh example of its task:
    ``{"trained_layer_<i>": figure}`` (:func:`jax_attn.apps.plots.plot_heads`).

    In a model trained on ``copy`` (``configs/copy.toml``), the first layer's heads, from
    the separator on, put most of their weight on the token ``length`` positions back:
    the symbol the model writes next.
    """
    from jax_attn.apps import plots

    task = config.task
    tokens, _ = make_batch(jax.random.key(seed), task, 1)
    labels = format_tokens(tokens[0], task).split()
    weights = attention_weights_by_layer(build_decoder(config), params, tokens[0])
    return {
        f"trained_layer_{i}": plots.plot_heads(
            layer_weights,
            labels,
            title=f"Trained decoder ({task.name}, length {task.length}), layer {i}: "
            f"every head (query token down, key token across)",
        )
        for i, layer_weights in enumerate(weights)
    }


def checkpoint_params(path):
    """The ``params`` of a checkpoint :func:`save_checkpoint` wrote, as plain arrays (no
    template needed). A file is read as an older ``checkpoint.msgpack``
    (``flax.serialization``)."""
    path = Path(path)
    if path.is_file():
        return serialization.msgpack_restore(path.read_bytes())["params"]
    ocp = _orbax()
    # arrays saved on devices this process lacks (another process count) come onto its
    # first device
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _checkpointer() as checkpointer:
        restored = checkpointer.restore(
            path.absolute(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=here)),
        )
    return restored["state"]["params"]


# --- commands -------------------------------------------------------------------------------


def say(*args, **kwargs) -> None:
    """``print`` on process 0 only: one report per run, however many processes run it."""
    if jax.process_index() == 0:
        print(*args, **kwargs)


def _same_arrays(a, b) -> bool:
    """Same dtype and bits, compared on this process's shards (a global array's other
    shards live in other processes, which compare their own)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not isinstance(a, jax.Array) or not isinstance(b, jax.Array):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    theirs = {str(shard.index): shard.data for shard in b.addressable_shards}
    return all(
        str(shard.index) in theirs and np.array_equal(shard.data, theirs[str(shard.index)])
        for shard in a.addressable_shards
    )


def _on_this_process(tree):
    """Every leaf whole in this process (gathered from the others where it is split
    across processes), for the steps that run on one process's devices."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(tree, tiled=True))


def describe_mesh(mesh) -> str:
    """``"mesh data=2,model=2 (4 devices, 2 processes)"``."""
    axes = ",".join(f"{name}={size}" for name, size in dict(mesh.shape).items() if size > 1)
    processes = len({d.process_index for d in np.asarray(mesh.devices).flat})
    return f"mesh {axes or 'data=1'} ({mesh.size} devices, {processes} processes)"


def run_training(
    config: TrainRunConfig,
    out_dir: Path,
    progress: bool = True,
    written: list | None = None,
    *,
    mesh=None,
    resume=None,
) -> dict:
    """Train, save, restore (bit-exact check), evaluate and generate; returns the summary.

    The checkpoint (an orbax directory: state and config), ``loss.png`` and
    ``summary.json`` go into ``out_dir``; their paths are appended to ``written``.
    ``mesh`` and ``resume`` as in :func:`train`. Under ``jax.distributed`` every process
    calls it: each writes its share of the checkpoint and checks its own shards of the
    restored state; process 0 prints, plots and writes the summary."""
    written = [] if written is None else written
    task, model = config.task, build_decoder(config)
    if mesh is not None:
        say(f"{describe_mesh(mesh)}, process {jax.process_index()} of {jax.process_count()}")
    state, losses, seconds = train(
        model, task, config.train, progress=progress, mesh=mesh, resume=resume
    )
    say(
        f"trained {count_params(state['params']):,} parameters for {config.train.steps} steps "
        f"in {seconds:.1f} s; final loss {losses[-1][1]:.4f}"
    )

    checkpoint = out_dir / CHECKPOINT
    save_checkpoint(checkpoint, state, config)
    written.append(checkpoint)
    # the state as the target: only its tree (optax's namedtuples included), dtypes and
    # shardings are used, as jax.ShapeDtypeStructs
    restored = restore_checkpoint(checkpoint, state)
    # PyTreeDef's == is defined in C++, which jax's stubs leave out
    same_tree = jax.tree.structure(restored) == jax.tree.structure(state)  # type: ignore[operator]
    exact = same_tree and all(
        _same_arrays(a, b)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
    )
    say(f"checkpoint {checkpoint} restored: {'bit-exact' if exact else 'MISMATCH'}")
    if not exact:
        raise RuntimeError(f"restored checkpoint {checkpoint} differs from the saved state")
    params = _on_this_process(restored["params"])

    decoder = build_decoder(config, decode=True)
    start = time.perf_counter()
    token_acc, answer_acc, generated = generation_accuracy(
        decoder, params, task, config.train.eval_examples
    )
    gen_seconds = time.perf_counter() - start
    say(
        f"greedy generation through the KV cache, {config.train.eval_examples} new examples: "
        f"token accuracy {token_acc:.2%}, whole answers {answer_acc:.2%} ({gen_seconds:.1f} s)"
    )

    tokens, _ = make_batch(jax.random.key(777), task, config.generate.show)
    greedy, answers = generate_answers(decoder, params, task, tokens)
    sampled, _ = generate_answers(
        decoder,
        params,
        task,
        tokens,
        jax.random.key(3),
        temperature=config.generate.temperature,
        top_k=config.generate.top_k,
    )
    label = f"T={config.generate.temperature}, top-k={config.generate.top_k}"
    for i in range(config.generate.show):
        say(f"  prompt  {format_tokens(tokens[i, : task.prompt_length], task)}")
        say(f"  greedy  {format_tokens(greedy[i], task)}")
        say(f"  sampled {format_tokens(sampled[i], task)}  ({label})")
        say(f"  target  {format_tokens(answers[i], task)}")

    loss_png = out_dir / "loss.png"
    if jax.process_index() == 0:
        plot_losses({"attention": losses}, loss_png)
    written.append(loss_png)
    say(f"loss curve: {loss_png}")
    summary = {
        "task": dataclasses.asdict(task),
        "params": count_params(params),
        "steps": config.train.steps,
        "train_seconds": seconds,
        "final_loss": losses[-1][1],
        "generation_token_accuracy": token_acc,
        "generation_answer_accuracy": answer_acc,
        "checkpoint": str(checkpoint),
    }
    if mesh is not None:
        summary["mesh"] = describe_mesh(mesh)
    if resume is not None:
        summary["resumed_from"] = str(resume)
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    written.append(out_dir / "summary.json")
    return summary


def run_comparison(
    config: TrainRunConfig, out_dir: Path, progress: bool = True, written: list | None = None
) -> list[dict]:
    """Attention vs RNN at each length of ``config.compare``: table, PNG and JSON (their
    paths appended to ``written``)."""
    written = [] if written is None else written
    compare = config.compare
    assert compare is not None, "run_comparison needs a [compare] table"
    rows, curves = [], {}
    total_start = time.perf_counter()
    for length in compare.lengths:
        task = dataclasses.replace(config.task, length=length)
        run_config = dataclasses.replace(config, task=task)
        attention = build_decoder(run_config)
        rnn = RNNLanguageModel(
            task.tokens, config.model.d_model, compare.rnn_hidden, compare.rnn_cell
        )
        row = {
            "length": length,
            "rnn_label": f"{compare.rnn_cell.upper()} ({compare.rnn_hidden})",
            "chance": 1.0 / config.task.vocab_size,
        }
        for label, model, lr in (
            ("attention", attention, None),
            ("rnn", rnn, compare.rnn_learning_rate),
        ):
            state, losses, seconds = train(
                model,
                task,
                config.train,
                learning_rate=lr,
                desc=f"{label} L={length}",
                progress=progress,
            )
            row[f"{label}_accuracy"] = evaluate(
                model, state["params"], task, config.train.eval_examples
            )
            row[f"{label}_params"] = count_params(state["params"])
            row[f"{label}_seconds"] = seconds
            curves[f"{label} L={length}"] = losses
            print(
                f"  L={length:<4} {label:<9} accuracy {row[f'{label}_accuracy']:.3f} "
                f"({row[f'{label}_params']:,} params, {seconds:.1f} s)",
                flush=True,
            )
        rows.append(row)
    total = time.perf_counter() - total_start

    print(
        f"\n{config.task.name}: accuracy on target tokens (teacher-forced, "
        f"{config.train.eval_examples} fresh examples), chance {rows[0]['chance']:.3f}"
    )
    print(
        f"{'length':>7} {'attention':>10} {rows[0]['rnn_label']:>12} {'att params':>11} "
        f"{'rnn params':>11} {'att s':>7} {'rnn s':>7}"
    )
    for r in rows:
        print(
            f"{r['length']:>7} {r['attention_accuracy']:>10.3f} {r['rnn_accuracy']:>12.3f} "
            f"{r['attention_params']:>11,} {r['rnn_params']:>11,} "
            f"{r['attention_seconds']:>7.1f} {r['rnn_seconds']:>7.1f}"
        )
    print(f"total {total:.1f} s on {jax.devices()[0].platform}")
    png = out_dir / "accuracy_vs_length.png"
    plot_accuracy_vs_length(rows, config.task.name, png)
    plot_losses(curves, out_dir / "loss.png")
    (out_dir / "comparison.json").write_text(
        json.dumps(
            {"rows": rows, "total_seconds": total, "device": str(jax.devices()[0])}, indent=2
        )
    )
    written.extend([png, out_dir / "loss.png", out_dir / "comparison.json"])
    print(f"plot: {png}")
    return rows


def decode_benchmark(
    *,
    prompt: int = 768,
    new_tokens: int = 256,
    context: int = 1024,
    d_model: int = 768,
    num_heads: int = 12,
    batch: int = 1,
    repeats: int = 5,
) -> dict:
    """GPT-2-small attention: a cached decode step vs recomputing the full causal pass.

    Cached: ``new_tokens`` one-token steps after a ``prompt``-token prefill, in one jitted
    ``lax.scan``. Recompute: the full causal pass over the sequence so far, timed at the
    first, middle and last length of the generation and averaged. Medians of ``repeats``,
    compile time excluded.
    """
    module = MultiHeadAttention(d_model, d_model, context, 0.0, num_heads, decode=True)
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, prompt + new_tokens, d_model))
    variables = module.init(key, jnp.zeros((batch, context, d_model)))
    params = variables["params"]
    full = module.clone(decode=False)

    @kv_cache.checked
    def prefill(cache, x_prompt):
        return module.apply({"params": params, "cache": cache}, x_prompt, mutable=["cache"])

    @kv_cache.checked
    def decode(cache, x_new):
        def step(cache, x_t):
            y, updated = module.apply(
                {"params": params, "cache": cache}, x_t[:, None], mutable=["cache"]
            )
            return updated["cache"], y[:, 0]

        return jax.lax.scan(step, cache, jnp.swapaxes(x_new, 0, 1))

    def forward(x_seq) -> jax.Array:  # no mutable collections: apply returns the output only
        return cast(jax.Array, full.apply({"params": params}, x_seq))

    recompute = jax.jit(lambda x_seq: forward(x_seq)[:, -1])

    def median_seconds(fn, *args):
        return timing.median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)

    _, prefilled = prefill(variables["cache"], x[:, :prompt])
    cache = prefilled["cache"]
    decode_seconds = median_seconds(decode, cache, x[:, prompt:])
    cached_step = decode_seconds / new_tokens
    lengths = (prompt + 1, prompt + new_tokens // 2, prompt + new_tokens)
    recompute_steps = {n: median_seconds(recompute, x[:, :n]) for n in lengths}
    recompute_step = float(np.mean(list(recompute_steps.values())))

    # the cached outputs are the full pass's
    _, outs = decode(cache, x[:, prompt:])
    # [B, new_tokens, D]: scan stacked the steps first
    outs = jnp.swapaxes(outs, 0, 1)
    expected = forward(x)[:, prompt:]
    max_error = float(jnp.max(jnp.abs(outs - expected)))
    return {
        "benchmark": "decode: cached step vs full causal recompute (MultiHeadAttention)",
        "shape": {
            "batch": batch,
            "d_model": d_model,
            "num_heads": num_heads,
            "context_length": context,
            "prompt": prompt,
            "new_tokens": new_tokens,
        },
        "cached_step_ms": cached_step * 1e3,
        "recompute_step_ms": recompute_step * 1e3,
        "recompute_ms_at_length": {str(n): t * 1e3 for n, t in recompute_steps.items()},
        "speedup": recompute_step / cached_step,
        "max_abs_error_vs_full_pass": max_error,
        "device": str(jax.devices()[0]),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "machine": platform.machine(),
        "repeats": repeats,
        "note": "median after warm-up, compile excluded",
    }


WROTE = "wrote:"
"""The line before the paths a command wrote, the last lines it prints."""


def print_written(paths) -> None:
    """The command's final lines: :data:`WROTE`, then each file or directory it wrote."""
    print(WROTE)
    for path in paths:
        print(path)


MESH_AXES = ("data", "model")
"""The axes ``--mesh`` may name: batch over ``"data"``, attention heads over ``"model"``."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,model=2"`` -> ``{"data": 2, "model": 2}``; errors name the part."""
    sizes = {}
    for part in text.split(","):
        name, _, size = part.strip().partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in sizes:
            raise ValueError(
                f"--mesh: expected comma-separated AXIS=SIZE with AXIS one of "
                f"{list(MESH_AXES)} (each once) and SIZE a positive int, got {part!r} "
                f"in {text!r}"
            )
        sizes[name] = int(size)
    return sizes


def distributed_settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    detect: bool = False,
    environ=None,
) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize``, or ``None`` to run as one
    process without it.

    Flags given: those (JAX takes what is missing from ``JAX_COORDINATOR_ADDRESS`` or its
    cluster detection). None: ``{}`` (JAX detects everything) where ``detect`` or the
    environment says that several processes were started together: ``srun`` of several
    tasks (``SLURM_NTASKS``), ``mpirun`` of several (``OMPI_COMM_WORLD_SIZE``),
    ``JAX_COORDINATOR_ADDRESS``; otherwise ``None``. (A Cloud TPU pod's workers cannot
    tell from their environment alone: pass ``--distributed`` there.)
    """
    environ = os.environ if environ is None else environ
    given = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if given:
        return given

    def several(name):
        value = environ.get(name, "")
        return value.isdigit() and int(value) > 1

    started_together = (
        ("SLURM_JOB_ID" in environ and several("SLURM_NTASKS"))
        or several("OMPI_COMM_WORLD_SIZE")
        or bool(environ.get("JAX_COORDINATOR_ADDRESS"))
    )
    return {} if detect or started_together else None


def start_distributed(settings: dict) -> None:
    """Joins the other processes (``jax.distributed.initialize(**settings)``); CPU
    collectives across processes go over gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="jax-attn train",
        description="Train a small decoder on a generated task and generate with the KV cache.",
    )
    parser.add_argument(
        "--config",
        help="configs/<name>.toml or a shipped config's name (default: copy, or with "
        "--resume the checkpoint's own)",
    )
    parser.add_argument("--out", help="output directory (default: the config's output_dir)")
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="override train.steps; this also shortens the learning-rate warm-up to "
        "min(train.warmup_steps, max(N // 10, 1)) steps",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--decode-bench",
        action="store_true",
        help="time a cached decode step against a full recompute (GPT-2 small)",
    )
    parser.add_argument(
        "--heads-of",
        metavar="CHECKPOINT",
        help="draw every head of every layer of the model in CHECKPOINT (trained with "
        "--config) as trained_layer_<i>.png in --out, and exit",
    )
    parser.add_argument(
        "--bench-out",
        default="benchmarks/results/decode.json",
        help="JSON written by --decode-bench",
    )
    many = parser.add_argument_group(
        "many processes",
        "run the same command in every process (one per host); process 0 prints and plots",
    )
    many.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's address, the same everywhere"
    )
    many.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    many.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    many.add_argument(
        "--distributed",
        action="store_true",
        help="join the others, JAX detecting coordinator, count and id (SLURM, Open MPI, "
        "Cloud TPU); implied under srun/mpirun of several tasks",
    )
    many.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="lay the training state out on a mesh of all processes' devices: batch over "
        "data, attention heads over model (default on many processes: data=all devices)",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue the run saved in CHECKPOINT up to --steps (any process count)",
    )
    args = parser.parse_args(argv)

    try:
        mesh_sizes = None if args.mesh is None else parse_mesh(args.mesh)
    except ValueError as error:
        parser.error(str(error))
    settings = distributed_settings(
        args.coordinator, args.num_processes, args.process_id, detect=args.distributed
    )
    if settings is not None:
        start_distributed(settings)

    if args.decode_bench:
        result = decode_benchmark()
        print(json.dumps(result, indent=2))
        path = Path(args.bench_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"cached step {result['cached_step_ms']:.3f} ms vs recompute "
            f"{result['recompute_step_ms']:.2f} ms: {result['speedup']:.0f}x"
        )
        print_written([path])
        return 0
    resumed_step = None
    try:
        if args.resume is not None and args.config is None:
            config = checkpoint_config(args.resume)
        else:
            config = load_train_config(args.config or "copy")
        if args.resume is not None:
            resumed_step = checkpoint_config(args.resume).train.steps
    except ConfigError as error:
        print(f"jax-attn train: {error}", file=sys.stderr)
        return 2
    if args.steps is not None:
        warmup = min(config.train.warmup_steps, max(args.steps // 10, 1))
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, steps=args.steps, warmup_steps=warmup)
        )
    out_dir = Path(args.out or config.output_dir)
    if args.heads_of:
        from jax_attn.apps.plots import save_figures

        figures = head_figures(config, checkpoint_params(args.heads_of))
        print_written(save_figures(figures, out_dir))
        return 0
    # the config the run ran, as its checkpoint keeps it: --steps and --out applied
    config = dataclasses.replace(config, output_dir=str(out_dir))
    if resumed_step is not None and resumed_step >= config.train.steps:
        parser.error(
            f"--resume: {args.resume} is at step {resumed_step}; pass --steps above it "
            f"(the run's steps are {config.train.steps})"
        )
    if args.resume is not None and config.compare is not None:
        parser.error("--resume continues a training run, not a [compare] config")
    mesh = None
    if mesh_sizes is not None or jax.process_count() > 1:
        if config.compare is not None:
            parser.error("--mesh and many processes serve a training run, not [compare]")
        mesh_sizes = mesh_sizes or {"data": jax.device_count()}
        try:
            mesh = sharding.make_mesh(**mesh_sizes)
        except ValueError as error:
            parser.error(f"--mesh {args.mesh}: {error}")
        if config.train.batch_size % mesh_sizes.get("data", 1):
            parser.error(
                f"--mesh: batch_size={config.train.batch_size} must divide over "
                f"data={mesh_sizes.get('data', 1)}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written: list[Path] = []
    if resumed_step is not None:
        say(f"resumed from step {resumed_step}: {args.resume}")
    if config.compare is not None:
        run_comparison(config, out_dir, progress=not args.no_progress, written=written)
    else:
        run_training(
            config,
            out_dir,
            progress=not args.no_progress,
            written=written,
            mesh=mesh,
            resume=args.resume,
        )
    seconds = time.perf_counter() - start
    say(f"done in {seconds:.1f} s wall clock on {jax.devices()[0].platform}")
    if jax.process_index() == 0:
        print_written(written)
    if settings is not None:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
