"""Shape-annotated array types with the shape letters of jax.nn, for signatures and docs.

B batch, T query length, S key/value length, N query heads, K key/value heads,
H head dim (``Hv`` for values), D model width. A leading ``*B`` means "batched or not":
``Float[Array, "*B T N H"]`` is ``[B, T, N, H]`` or ``[T, N, H]``.

These are annotations only. Library modules import them under ``TYPE_CHECKING`` (with
``from __future__ import annotations``), so importing :mod:`jax_attn` never needs
jaxtyping (a ``dev`` extra). The test suite resolves the annotations with
:func:`resolve_hints` and checks real calls against them with jaxtyping. Without
jaxtyping installed, ``Float[...]`` and friends fall back to plain ``jax.Array``.

>>> import jax.numpy as jnp
>>> isinstance(jnp.ones((2, 5, 4, 8)), Queries)       # [B, T, N, H]
True
"""

from __future__ import annotations

import typing
from typing import Any

import jax

__all__ = [
    "HAVE_JAXTYPING",
    "Array",
    "Bool",
    "Float",
    "Int",
    "Shaped",
    "PRNGKey",
    "Queries",
    "Keys",
    "Values",
    "Outputs",
    "Logits",
    "Weights",
    "Mask",
    "Lengths",
    "resolve_hints",
]

Array = jax.Array

try:
    from jaxtyping import Bool, Float, Int, Shaped

    HAVE_JAXTYPING = True
except ImportError:  # pragma: no cover - exercised only without the dev extra
    HAVE_JAXTYPING = False

    class _Fallback:
        """``Float[Array, "B T"]`` -> ``jax.Array`` when jaxtyping is missing."""

        def __class_getitem__(cls, item):
            return jax.Array

    Bool = Float = Int = Shaped = _Fallback  # type: ignore[misc,assignment]

PRNGKey = Array
Queries = Float[Array, "*B T N H"]
Keys = Float[Array, "*B S K H"]
Values = Float[Array, "*B S K Hv"]
Outputs = Float[Array, "*B T N Hv"]
Logits = Float[Array, "*B N T S"]
Weights = Float[Array, "*B N T S"]
Mask = Bool[Array, "*mask"]
Lengths = Int[Array, " B"]


def resolve_hints(fn) -> dict[str, Any]:
    """``fn``'s annotations evaluated with this module's names in scope (they are strings
    under ``from __future__ import annotations`` and imported only for type checkers)."""
    namespace = dict(getattr(fn, "__globals__", {}))
    namespace.update({name: globals()[name] for name in __all__})
    return typing.get_type_hints(fn, globalns=namespace)
