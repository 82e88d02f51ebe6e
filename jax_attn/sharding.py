"""Scale-out on JAX's own machinery: meshes, tensor-parallel multi-head attention and
sequence-parallel ring attention.

* :func:`make_mesh` builds a ``jax.sharding.Mesh`` with axes ``("data", "model", "seq")``.
* :func:`shard_params` places any params tree: every :class:`jax_attn.MultiHeadAttention`
  subtree tensor-parallel over ``"model"`` (Megatron style: the query/key/value
  projections split by heads, ``out_proj`` on its input dim, so each device runs its own
  heads and the output is reduced once), Flax partition metadata honoured where present,
  the rest replicated. :func:`shard_batch` puts activations batch-parallel over
  ``"data"``. ``jax.jit``'s SPMD partitioner does the rest.
* Many processes (``jax.distributed.initialize()``, one global mesh):
  :func:`process_batch_rows` says which rows of a global batch this process feeds, and
  :func:`global_batch` joins every process's rows into one batch-parallel array.
* :func:`ring_attention` is sequence-parallel attention over a named mesh axis; the kernel
  lives in :mod:`jax_attn.kernels.ring` (also ``dot_product_attention(...,
  implementation="ring")`` under ``jax.set_mesh``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_attn.kernels import ring
from jax_attn.kernels.ring import default_block_size, ring_axes
from jax_attn.module_spec import PROJECTIONS, partition_names
from jax_attn.validation import check_attention_args

__all__ = [
    "AXIS_NAMES",
    "make_mesh",
    "param_specs",
    "shard_params",
    "batch_sharding",
    "shard_batch",
    "process_batch_rows",
    "global_batch",
    "ring_attention",
    "ring_axes",
    "default_block_size",
]

AXIS_NAMES = ("data", "model", "seq")


# --- meshes --------------------------------------------------------------------------------


def _check_axis_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"make_mesh: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"make_mesh: {name} must be >= 1, got {value}")
    return int(value)


def make_mesh(data: int = 1, model: int = 1, seq: int = 1, *, devices=None) -> Mesh:
    """A mesh of shape ``(data, model, seq)`` with axes ``("data", "model", "seq")``.

    ``data * model * seq`` must equal the number of ``devices``. By default all of
    ``jax.devices()``, ordered by ``mesh_utils.create_device_mesh`` (topology-aware on
    TPU); given ``devices`` (e.g. ``jax.devices()[:n]``, a subset) keep their order.
    """
    sizes = {
        "data": _check_axis_size("data", data),
        "model": _check_axis_size("model", model),
        "seq": _check_axis_size("seq", seq),
    }
    explicit_order = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    product = math.prod(sizes.values())
    if product != len(devices):
        spelled = " * ".join(f"{k}={v}" for k, v in sizes.items())
        hint = (
            f"; to use a subset pass devices=jax.devices()[:{product}]"
            if product < len(devices)
            else "; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
            "importing jax gives N virtual devices"
        )
        raise ValueError(
            f"make_mesh: {spelled} = {product} must equal the number of devices, "
            f"{len(devices)} ({devices[0].platform if devices else 'none'}){hint}"
        )
    shape = tuple(sizes.values())
    grid = np.asarray(devices, dtype=object).reshape(shape)
    if not explicit_order:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # noqa: BLE001 - topology-aware order is an optimisation only
            pass
    return Mesh(grid, AXIS_NAMES)


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def _check_mesh(owner: str, mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{owner}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")


# --- tensor-parallel multi-head attention --------------------------------------------------


_ATTENTION_LAYERS = (*PROJECTIONS, "out_proj")


def _is_box(x) -> bool:
    """A Flax partition-metadata box (``nn.with_partitioning``'s ``nn.Partitioned``)."""
    return isinstance(x, meta.AxisMetadata)


def _is_attention(node) -> bool:
    """A :class:`~jax_attn.MultiHeadAttention` subtree: its four dense layers."""
    return isinstance(node, Mapping) and all(
        isinstance(node.get(name), Mapping) for name in _ATTENTION_LAYERS
    )


def _box_spec(box) -> P:
    return P(*box.names) if hasattr(box, "names") else P()


def _d_out(module, name: str) -> int | None:
    """Output features of ``module[name]``'s kernel ``[d_in, d_out]`` (``None``: no kernel)."""
    kernel = module[name].get("kernel")
    kernel = kernel.unbox() if _is_box(kernel) else kernel
    return None if kernel is None else int(jnp.shape(kernel)[-1])


def _tensor_parallel_layers(module, model_size: int | None, num_heads: int | None) -> tuple:
    """Which of the attention layers split whole heads over a ``model_size`` axis.

    With as many key/value heads as query heads (``W_key`` as wide as ``W_query``): all
    four. With fewer (GQA/MQA), ``K = num_heads * d_k / d_q`` key/value heads: all four
    when ``K`` divides over ``model_size``; for ``K == 1`` the query heads and
    ``out_proj`` only (the key/value projections replicated); otherwise none (the query
    heads are grouped ``[K, G]`` per key/value head, and neither a head nor that grouping
    can be cut across devices). Without ``num_heads``, ``K`` is unknown: none.
    ``model_size=None`` (no mesh known): all four, the metadata's layout.
    """
    if model_size is None or model_size == 1:
        return _ATTENTION_LAYERS
    d_q, d_k = _d_out(module, "W_query"), _d_out(module, "W_key")
    if d_q is None or d_k is None or d_k == d_q:
        return _ATTENTION_LAYERS
    if num_heads is None or (num_heads * d_k) % d_q:
        return ()
    kv_heads = num_heads * d_k // d_q
    if kv_heads % model_size == 0:
        return _ATTENTION_LAYERS
    return ("W_query", "out_proj") if kv_heads == 1 else ()


def _attention_specs(module, model_axis: str | None, model_size, num_heads) -> dict:
    """Megatron layout of one attention module: q/k/v kernels ``[d_in, d_out]`` and
    biases split on the output (heads), ``out_proj`` kernel on its input, its bias whole.
    Layers :func:`_tensor_parallel_layers` leaves out are replicated (unless boxed)."""
    split_layers = _tensor_parallel_layers(module, model_size, num_heads)
    specs = {}
    for name, layer in module.items():
        if name not in _ATTENTION_LAYERS:
            specs[name] = _tree_specs(layer, model_axis, model_size, num_heads)
            continue
        split = {}
        if name in split_layers:
            split = {leaf: _split_spec(name, leaf, model_axis) for leaf in ("kernel", "bias")}
        specs[name] = {
            leaf: _box_spec(x) if _is_box(x) else split.get(leaf, P()) for leaf, x in layer.items()
        }
    return specs


def _split_spec(name: str, leaf: str, model_axis: str | None) -> P:
    """The tensor-parallel spec of ``name/leaf``: the modules' partition metadata
    (:func:`jax_attn.module_spec.partition_names`, the one statement of the rule), ``P()``
    where it splits nothing."""
    names = partition_names(name, leaf, model_axis)
    return P(*names) if names is not None and any(names) else P()


def _tree_specs(node, model_axis: str | None, model_size=None, num_heads=None):
    if _is_box(node):
        return _box_spec(node)
    if _is_attention(node):
        return _attention_specs(node, model_axis, model_size, num_heads)
    if isinstance(node, Mapping):
        return {
            key: _tree_specs(child, model_axis, model_size, num_heads)
            for key, child in node.items()
        }
    if isinstance(node, list | tuple):
        return type(node)(_tree_specs(child, model_axis, model_size, num_heads) for child in node)
    return P()


def param_specs(
    params,
    model_axis: str | None = "model",
    *,
    model_size: int | None = None,
    num_heads: int | None = None,
):
    """PartitionSpecs for a params tree (same tree, a spec per array).

    Flax partition metadata (``nn.with_partitioning`` boxes, as
    ``nn.get_partition_spec`` reads them) wins where present. Otherwise every
    :class:`~jax_attn.MultiHeadAttention` subtree found is laid out tensor-parallel:
    query/key/value kernels ``[d_in, d_out]`` and their biases split their output
    (heads) over ``model_axis``; ``out_proj``'s kernel splits its input, its bias is
    whole. Everything else is replicated.

    Fewer key/value heads than divide over the model axis (``model_size``, the size of
    ``model_axis``; GQA/MQA with ``num_kv_heads % model_size != 0``): no head is cut
    across devices. With one key/value head (MQA) ``W_key``/``W_value`` are replicated
    and the queries still split; with more, the whole module is replicated (the query
    heads are grouped per key/value head). The key/value head count is
    ``num_heads * d_k / d_q``: without ``num_heads`` it is unknown and a GQA module is
    replicated whenever ``model_size > 1``. Boxes are kept as they are (shard_params
    raises when they would cut heads).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"param_specs: params must be a dict, got {type(params).__name__}")
    return _tree_specs(params, model_axis, model_size, num_heads)


def _attention_modules(node):
    """Every MultiHeadAttention subtree of ``node`` (boxes unboxed)."""
    if _is_attention(node):
        yield node
    elif isinstance(node, Mapping):
        for child in node.values():
            yield from _attention_modules(child)


def _check_divisible(params, mesh: Mesh, num_heads: int | None) -> None:
    model = _axis_size(mesh, "model")
    if num_heads is not None and num_heads % model:
        raise ValueError(
            f"shard_params: num_heads={num_heads} must be divisible by the mesh's model axis "
            f"size {model} so that every device holds whole heads"
        )
    for module in _attention_modules(params):
        d_out = _d_out(module, "W_query") or 0
        if d_out % model:
            raise ValueError(
                f"shard_params: d_out={d_out} must be divisible by the mesh's model axis "
                f"size {model}"
            )
        split_layers = _tensor_parallel_layers(module, model, num_heads)
        boxed = [
            name
            for name in _ATTENTION_LAYERS
            if name not in split_layers
            and any(_is_box(x) and "model" in _box_spec(x) for x in module[name].values())
        ]
        if boxed and num_heads is not None:
            kv_heads = num_heads * (_d_out(module, "W_key") or 0) // d_out
            raise ValueError(
                f"shard_params: the partition metadata splits {boxed} over 'model', but "
                f"num_kv_heads={kv_heads} (num_heads={num_heads}) does not divide over the "
                f"mesh's model axis size {model}: a key/value head would be cut across "
                "devices. Build the module without model_axis (shard_params then replicates "
                "what cannot split) or use num_kv_heads divisible by the model axis size"
            )


def shard_params(params, mesh: Mesh, *, num_heads: int | None = None):
    """``params`` (any tree: a module's, a whole model's, with or without ``{"params":
    ...}``) placed on ``mesh`` by :func:`param_specs`: attention modules tensor-parallel
    over ``"model"``, partition metadata honoured, the rest replicated.

    Returns the same tree (metadata boxes kept, their values placed). Axes a spec names
    that the mesh lacks are dropped (replicated). With ``num_heads`` it also checks that
    heads split evenly over ``"model"``. Key/value projections with fewer heads than
    divide over ``"model"`` (``num_kv_heads % model != 0``) are replicated, even where
    their metadata names ``"model"`` (see :func:`param_specs`; pass ``num_heads`` so
    that GQA key/value heads that do divide are split). Where partition metadata would
    cut a key/value head (and ``num_heads`` says so) it raises instead.
    """
    _check_mesh("shard_params", mesh)
    if not isinstance(params, Mapping):
        raise TypeError(f"shard_params: params must be a dict, got {type(params).__name__}")
    _check_divisible(params, mesh, num_heads)
    model_axis = "model" if "model" in mesh.axis_names else None
    specs = param_specs(
        params, model_axis, model_size=_axis_size(mesh, "model"), num_heads=num_heads
    )

    def on_mesh(axis):
        if isinstance(axis, tuple):
            kept = tuple(a for a in axis if a in mesh.axis_names)
            return kept or None
        return axis if axis in mesh.axis_names else None

    def place(x, spec):
        spec = P(*(on_mesh(axis) for axis in spec))
        if _is_box(x):
            return x.replace_boxed(jax.device_put(x.unbox(), NamedSharding(mesh, spec)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, params, specs, is_leaf=_is_box)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Activations ``[B, ...]`` split over ``"data"`` on the batch dim, replicated otherwise."""
    _check_mesh("batch_sharding", mesh)
    data_axis = "data" if "data" in mesh.axis_names else None
    return NamedSharding(mesh, P(data_axis, *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh):
    """``x [B, ...]`` placed batch-parallel over ``"data"``; ``B`` must divide evenly."""
    x = jnp.asarray(x)
    data = _axis_size(mesh, "data")
    if x.ndim == 0 or x.shape[0] % data:
        raise ValueError(
            f"shard_batch: batch dim of x (shape {list(x.shape)}) must be divisible by the "
            f"mesh's data axis size {data}"
        )
    return jax.device_put(x, batch_sharding(mesh, x.ndim))


def process_batch_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch ``[batch_size, ...]`` that this process feeds to
    :func:`global_batch`: those its own devices hold under :func:`batch_sharding`.

    One process: every row. Under ``jax.distributed`` the ``"data"`` axis is cut across
    processes; a process whose devices hold several data shards feeds them all, one
    contiguous block (``make_mesh`` keeps each process's devices together).
    """
    _check_mesh("process_batch_rows", mesh)
    data = _axis_size(mesh, "data")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"process_batch_rows: batch_size must be an int, got {batch_size!r}")
    if batch_size < 1 or batch_size % data:
        raise ValueError(
            f"process_batch_rows: batch_size={batch_size} must be a positive multiple of the "
            f"mesh's data axis size {data}"
        )
    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((int(batch_size),))
    blocks = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
    first, last = blocks[0][0], blocks[-1][1]
    if sum(stop - start for start, stop in blocks) != last - first:
        raise ValueError(
            f"process_batch_rows: this process's devices hold rows {blocks} of the batch, "
            "not one contiguous block; build the mesh so that each process's devices are "
            "neighbours on the data axis (make_mesh(devices=...) in process order)"
        )
    return slice(first, last)


def global_batch(local, mesh: Mesh, batch_size: int | None = None) -> jax.Array:
    """One batch-parallel array ``[batch_size, ...]`` (:func:`batch_sharding`) made from
    every process's ``local`` rows (:func:`process_batch_rows`), without any process
    holding the whole batch: ``jax.make_array_from_process_local_data``.

    ``batch_size`` (the global batch) defaults to ``local``'s rows scaled from the data
    shards this process holds to all of them. With one process it is :func:`shard_batch`
    of ``local``.
    """
    _check_mesh("global_batch", mesh)
    local = np.asarray(local) if not isinstance(local, jax.Array) else local
    if local.ndim == 0:
        raise ValueError("global_batch: local must have a batch dim, got a scalar")
    if batch_size is None:
        data = _axis_size(mesh, "data")
        # one row per data shard: this process's rows are the shards it holds
        mine = process_batch_rows(mesh, data)
        shards = mine.stop - mine.start
        if local.shape[0] % shards:
            raise ValueError(
                f"global_batch: this process holds {shards} of the {data} data shards, so "
                f"local's rows must divide by {shards}, got shape {list(local.shape)}"
            )
        batch_size = local.shape[0] // shards * data
    rows = process_batch_rows(mesh, int(batch_size))
    if local.shape[0] != rows.stop - rows.start:
        raise ValueError(
            f"global_batch: this process feeds rows {rows.start}:{rows.stop} of a batch of "
            f"{batch_size}, so local must have {rows.stop - rows.start} rows, got "
            f"{local.shape[0]} (shape {list(local.shape)})"
        )
    global_shape = (int(batch_size), *local.shape[1:])
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, local.ndim), local, global_shape
    )


# --- ring attention ------------------------------------------------------------------------


def ring_attention(
    q,
    k,
    v,
    *,
    mesh: Mesh,
    axis_name: str,
    is_causal: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
    batch_axis_name: str | None = None,
):
    """Sequence-parallel attention: q ``[B, T, N, H]``, k/v ``[B, S, K, H]`` split along the
    sequence over the mesh axis ``axis_name`` -> ``[B, T, N, H]``, sharded the same way.

    Same result as :func:`jax_attn.dot_product_attention` (``N % K == 0``; causal needs
    ``T == S`` and ``T`` divisible by twice the axis size). Each ring step runs in blocks
    of ``block_size`` queries by ``block_size`` keys, so one device holds O(T / P)
    activations and ``[B, N, block_size, block_size]`` logits; the default is the
    largest divisor of the local chunk up to ``DEFAULT_MAX_BLOCK_SIZE`` (the whole chunk
    when that divisor is tiny), for queries and keys separately.
    ``batch_axis_name`` also splits the batch over another mesh axis. Differentiable
    (custom VJP: a second ring pass).
    """
    _check_mesh("ring_attention", mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"ring_attention: axis_name must be one of the mesh axes {list(mesh.axis_names)}, "
            f"got {axis_name!r}"
        )
    if batch_axis_name is not None and (
        batch_axis_name not in mesh.axis_names or batch_axis_name == axis_name
    ):
        raise ValueError(
            f"ring_attention: batch_axis_name must be another mesh axis "
            f"({[a for a in mesh.axis_names if a != axis_name]}), got {batch_axis_name!r}"
        )
    call = check_attention_args(q, k, v, is_causal=is_causal, scale=scale)
    if not call.batched:
        raise ValueError(
            f"ring_attention: q must have shape [B, T, N, H], got {list(jnp.shape(q))}"
        )
    reason = ring.ring_unsupported(call, mesh, axis_name)
    if reason is not None:
        raise ValueError(f"ring_attention: {reason}")
    if batch_axis_name is not None and call.B % _axis_size(mesh, batch_axis_name):
        raise ValueError(
            f"ring_attention: batch B={call.B} must be divisible by mesh axis "
            f"{batch_axis_name!r} of size {_axis_size(mesh, batch_axis_name)}"
        )
    return ring.ring_attention_core(
        q,
        k,
        v,
        call=call,
        mesh=mesh,
        axis_name=axis_name,
        block_size=block_size,
        batch_axis_name=batch_axis_name,
    )
