"""The book's PyTorch ``state_dict`` <-> Flax params of :mod:`jax_attn.linen_modules`.

>>> import numpy as np, jax_attn as ja
>>> from jax_attn.interop import params_from_torch, params_to_torch
>>> module = ja.SelfAttentionV2(3, 2)
>>> state = {f"W_{n}.weight": np.ones((2, 3), np.float32) for n in ("query", "key", "value")}
>>> params = params_from_torch(module, state)
>>> params["W_query"]["kernel"].shape
(3, 2)
>>> sorted(params_to_torch(module, params))
['W_key.weight', 'W_query.weight', 'W_value.weight']

Names are the book's: ``W_query``, ``W_key``, ``W_value`` (``[d_in, d_out]`` matrices) for
``SelfAttention_v1``; ``W_query.weight`` (``nn.Linear``, ``[d_out, d_in]``) and
``W_query.bias`` ... for the others; ``out_proj.weight`` and ``out_proj.bias`` for
``MultiHeadAttention``; ``heads.0.W_query.weight`` ... for ``MultiHeadAttentionWrapper``.
The ``mask`` buffers carry no parameters: ``params_from_torch`` ignores them and
``params_to_torch`` leaves them out unless ``include_buffers=True``.

Arrays come out as numpy arrays (dtype kept; torch bfloat16 becomes numpy bfloat16):
``module.apply({"params": params}, x)`` takes them as they are. The expected shapes
follow from the module's hyper-parameters, so a checkpoint that does not fit the module
is a ``ValueError`` naming every missing, unexpected or misshapen key with both shapes.

The :mod:`jax_attn.nnx_modules` modules work through their ``linen_module()`` (params in the
Linen layout: :func:`jax_attn.nnx_modules.nnx_from_linen_params` loads them). Another module
family plugs in with :func:`register_layout`: a function from a module to its
:class:`TorchLayout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util
from flax.core import meta

from jax_attn import linen_modules as linen
from jax_attn.module_spec import PROJECTIONS, AttentionSpec

__all__ = [
    "TorchLayout",
    "TorchTensor",
    "params_from_torch",
    "params_to_torch",
    "register_layout",
    "torch_layout",
]


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """One PyTorch parameter and where it lives in the Flax params.

    ``flax_shape`` is the Flax array's shape; with ``transpose`` (``nn.Linear`` weights)
    the PyTorch tensor is its transpose.
    """

    torch_name: str
    flax_path: tuple[str, ...]
    flax_shape: tuple[int, ...]
    transpose: bool = False

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.flax_shape[::-1] if self.transpose else self.flax_shape


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """A module's PyTorch parameters and its buffers (name -> shape, no parameters)."""

    tensors: tuple[TorchTensor, ...]
    buffers: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


LayoutFn = Callable[[object], TorchLayout]
_LAYOUTS: dict[type | str, LayoutFn] = {}


def register_layout(cls: type | str, layout_fn: LayoutFn) -> None:
    """Teach interop a module class, by the class itself (an NNX ``MultiHeadAttention``
    does not clash with the linen one) or by its name."""
    _LAYOUTS[cls] = layout_fn


def torch_layout(module) -> TorchLayout:
    """The PyTorch tensors ``module``'s parameters map to, shapes from its hyper-parameters.

    Looked up through the module's MRO (registered class, then registered class name); a
    module with a ``linen_module()`` method (the :mod:`jax_attn.nnx_modules` classes) uses the
    layout of its Linen equivalent.
    """
    for cls in type(module).__mro__:
        for key in (cls, cls.__name__):
            if key in _LAYOUTS:
                return _LAYOUTS[key](module)
    if callable(getattr(module, "linen_module", None)):
        return torch_layout(module.linen_module())
    known = sorted(f"{k.__module__}.{k.__name__}" if isinstance(k, type) else k for k in _LAYOUTS)
    raise TypeError(
        f"interop: module must be one of {known} or offer linen_module(), "
        f"got {type(module).__name__}"
    )


def _linear(
    torch_prefix: str, flax_path: tuple[str, ...], fan_in: int, features: int, use_bias: bool
) -> list[TorchTensor]:
    tensors = [
        TorchTensor(
            f"{torch_prefix}.weight", (*flax_path, "kernel"), (fan_in, features), transpose=True
        )
    ]
    if use_bias:
        tensors.append(TorchTensor(f"{torch_prefix}.bias", (*flax_path, "bias"), (features,)))
    return tensors


def _projections(spec: AttentionSpec, prefix: str = "", path: tuple[str, ...] = ()):
    return [
        tensor
        for name in PROJECTIONS
        for tensor in _linear(
            prefix + name, (*path, name), spec.d_in, spec.features(name), spec.qkv_bias
        )
    ]


def _self_attention_v1_layout(module) -> TorchLayout:
    shape = (module.d_in, module.d_out)
    return TorchLayout(tuple(TorchTensor(name, (name,), shape) for name in PROJECTIONS))


def _self_attention_v2_layout(module) -> TorchLayout:
    return TorchLayout(tuple(_projections(AttentionSpec.of(module))))


def _causal_attention_layout(module) -> TorchLayout:
    ctx = module.context_length
    return TorchLayout(tuple(_projections(AttentionSpec.of(module))), {"mask": (ctx, ctx)})


def _wrapper_layout(module) -> TorchLayout:
    ctx = module.context_length
    tensors, buffers = [], {}
    spec = AttentionSpec.of(module)
    for i in range(module.num_heads):
        tensors += _projections(spec, f"heads.{i}.", (f"heads_{i}",))
        buffers[f"heads.{i}.mask"] = (ctx, ctx)
    return TorchLayout(tuple(tensors), buffers)


def _multi_head_attention_layout(module) -> TorchLayout:
    """The book's layout. With ``num_kv_heads=K`` (GQA/MQA, which chapter 3 does not
    have) the names stay and ``W_key``/``W_value`` have ``K * head_dim`` outputs, as in
    the usual PyTorch GQA where query head ``n`` uses key/value head ``n // (N // K)``
    (``repeat_interleave`` over heads)."""
    ctx = module.context_length
    tensors = _projections(AttentionSpec.of(module)) + _linear(
        "out_proj", ("out_proj",), module.d_out, module.d_out, True
    )
    return TorchLayout(tuple(tensors), {"mask": (ctx, ctx)})


register_layout(linen.SelfAttentionV1, _self_attention_v1_layout)
register_layout(linen.SelfAttentionV2, _self_attention_v2_layout)
register_layout(linen.CausalAttention, _causal_attention_layout)
register_layout(linen.MultiHeadAttentionWrapper, _wrapper_layout)
register_layout(linen.MultiHeadAttention, _multi_head_attention_layout)


def to_numpy(x) -> np.ndarray:
    """A torch tensor (any device, bfloat16 too) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _describe(module) -> str:
    fields = ("d_in", "d_out", "context_length", "num_heads", "num_kv_heads", "qkv_bias")
    given = ", ".join(f"{f}={getattr(module, f)}" for f in fields if hasattr(module, f))
    return f"{type(module).__name__}({given})"


def _check(
    where: str,
    module,
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, tuple[int, ...]],
) -> None:
    problems = []
    for key, shape in expected.items():
        if key not in given:
            problems.append(f"missing {key!r}: expected shape {list(shape)}, given none")
        elif tuple(given[key]) != tuple(shape):
            problems.append(
                f"wrong shape for {key!r}: expected {list(shape)}, given {list(given[key])}"
            )
    for key in given:
        if key not in expected:
            problems.append(f"unexpected {key!r}: expected none, given shape {list(given[key])}")
    if problems:
        raise ValueError(
            f"{where}: the tensors do not fit {_describe(module)}:\n  " + "\n  ".join(problems)
        )


def params_from_torch(module, state_dict: Mapping) -> dict:
    """The book's PyTorch ``state_dict`` (tensors or arrays) as Flax params for ``module``.

    Returns the nested dict that goes under ``"params"``:
    ``module.apply({"params": params_from_torch(module, sd)}, x)``. Arrays are numpy,
    ``nn.Linear`` weights transposed to Flax's ``[d_in, d_out]`` kernels. ``mask``
    buffers are ignored; any other missing, unexpected or misshapen key is a ValueError.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"params_from_torch: state_dict must be a mapping of names to tensors, "
            f"got {type(state_dict).__name__}"
        )
    layout = torch_layout(module)
    arrays = {k: to_numpy(v) for k, v in state_dict.items() if k not in layout.buffers}
    expected = {t.torch_name: t.torch_shape for t in layout.tensors}
    _check("params_from_torch", module, expected, {k: a.shape for k, a in arrays.items()})
    flat = {}
    for tensor in layout.tensors:
        array = arrays[tensor.torch_name]
        flat[tensor.flax_path] = np.array(array.T if tensor.transpose else array)
    return traverse_util.unflatten_dict(flat)


def _plain(tree):
    """Nested mappings as plain dicts, partition boxes (``nn.with_partitioning``) unboxed."""
    tree = meta.unbox(tree)
    if isinstance(tree, Mapping):
        return {key: _plain(value) for key, value in tree.items()}
    return tree


def _flax_name(path: tuple[str, ...]) -> str:
    return "params" + "".join(f"[{p!r}]" for p in path)


def params_to_torch(
    module, params: Mapping, *, include_buffers: bool = False
) -> dict[str, np.ndarray]:
    """Flax params of ``module`` as numpy arrays in PyTorch layout, keyed by the book's names.

    ``params`` is the inner dict or ``{"params": ...}``, boxed with partition metadata
    (``model_axis=``) or not. Without buffers, load with
    ``torch_module.load_state_dict({k: torch.from_numpy(v) ...}, strict=False)``; with
    ``include_buffers=True`` the causal ``mask`` buffers (``triu(ones, 1)``, float32) are
    added, so ``strict=True`` loading works.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params_to_torch: params must be a nested mapping, got {type(params).__name__}"
        )
    layout = torch_layout(module)
    if set(params) == {"params"}:
        params = params["params"]
    flat = {
        path: to_numpy(value) for path, value in traverse_util.flatten_dict(_plain(params)).items()
    }
    expected = {_flax_name(t.flax_path): t.flax_shape for t in layout.tensors}
    _check(
        "params_to_torch", module, expected, {_flax_name(path): a.shape for path, a in flat.items()}
    )
    state = {}
    for tensor in layout.tensors:
        array = flat[tensor.flax_path]
        state[tensor.torch_name] = np.array(array.T if tensor.transpose else array)
    if include_buffers:
        for name, (rows, cols) in layout.buffers.items():
            state[name] = np.triu(np.ones((rows, cols), np.float32), k=1)
    return state
