"""Configs as frozen dataclasses, read from TOML files with :mod:`tomllib`.

Every key of a table must be a field of its dataclass and every field without a
default must be present; a wrong key, a missing key, a wrong type or a bad value is a
:class:`ConfigError` (a ``ValueError``) that names the key and the file.

>>> cfg = load_config("configs/gpt2-small.toml")          # doctest: +SKIP
>>> cfg.attention.num_heads, cfg.run.batch                 # doctest: +SKIP
(12, 2)

:func:`load_dataclass` is the generic reader: any frozen dataclass whose fields are
``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]`` or another
dataclass (read from a sub-table).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CONFIG_DIR",
    "AttentionConfig",
    "Config",
    "ConfigError",
    "RunConfig",
    "available_configs",
    "check_choice",
    "from_dict",
    "load_config",
    "load_dataclass",
    "read_toml",
    "resolve_config_path",
]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: The shipped configs: ``jax_attn/configs`` in an installed wheel, else the repository's
#: ``configs/`` (a source checkout, ``pip install -e .``).
CONFIG_DIR = next(
    (d for d in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs") if d.is_dir()),
    _PACKAGE_DIR.parent / "configs",
)

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file that does not match its dataclass; the message names key and file."""


def check_choice(key: str, value, choices) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r}")


# --- the configs of this project --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """A multi-head attention layer, the book's constructor arguments plus a name.

    ``ja.MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias)``;
    see :meth:`multi_head_attention`.
    """

    name: str
    d_in: int
    d_out: int
    num_heads: int
    context_length: int
    dropout: float
    qkv_bias: bool

    def __post_init__(self):
        for key in ("d_in", "d_out", "num_heads", "context_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_out % self.num_heads:
            raise ValueError(f"d_out={self.d_out} must be divisible by num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        """``H = d_out // num_heads``."""
        return self.d_out // self.num_heads

    def multi_head_attention(self, **options):
        """``ja.MultiHeadAttention`` with these arguments (``options``: its keyword-only ones)."""
        from jax_attn.linen_modules import MultiHeadAttention

        return MultiHeadAttention(
            self.d_in,
            self.d_out,
            self.context_length,
            self.dropout,
            self.num_heads,
            self.qkv_bias,
            **options,
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Input shape and dtype for running a layer (the demo's GPT-2 check): ``[batch, seq_len,
    d_in]`` in ``dtype``."""

    batch: int
    seq_len: int
    dtype: str

    def __post_init__(self):
        for key in ("batch", "seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclasses.dataclass(frozen=True)
class Config:
    """A file of ``configs/``: an ``[attention]`` table and a ``[run]`` table."""

    attention: AttentionConfig
    run: RunConfig

    def __post_init__(self):
        if self.run.seq_len > self.attention.context_length:
            raise ValueError(
                f"run.seq_len={self.run.seq_len} is more than "
                f"attention.context_length={self.attention.context_length}"
            )


def available_configs() -> list[str]:
    """Names of the configs shipped in :data:`CONFIG_DIR` (``"gpt2-small"``...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """An existing file path as given, else ``CONFIG_DIR/<name>.toml`` (``"gpt2-small"``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    shipped = CONFIG_DIR / f"{stem}.toml"
    if path.parent == Path(".") or path.parent.name == "configs":
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"config file {str(name_or_path)!r} not found (shipped configs: "
        f"{', '.join(available_configs()) or 'none'} in {CONFIG_DIR})"
    )


def load_config(name_or_path: str | Path) -> Config:
    """Reads a project config (see :func:`resolve_config_path` for names)."""
    return load_dataclass(resolve_config_path(name_or_path), Config)


# --- the generic reader ------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file as a dict; a syntax error names the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_dataclass(path: str | Path, cls: type[T], section: str | None = None) -> T:
    """Reads ``cls`` from the TOML file ``path`` (from its table ``section`` if given).

    With ``section``, other top-level tables of the file are left alone (another
    reader may own them); without it, the whole file must match ``cls``.
    """
    path = Path(path)
    data = read_toml(path)
    where = ""
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: missing table [{section}]")
        data, where = data[section], section
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{section}] must be a table, got {data!r}")
    return from_dict(cls, data, source=str(path), where=where)


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<dict>", where: str = "") -> T:
    """Builds the dataclass ``cls`` from ``data``, checking keys, types and values.

    ``source`` (a file name) and ``where`` (a dotted table path) go into error messages.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict: cls must be a dataclass, got {cls!r}")
    table = f"[{where}]" if where else "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {table} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {_dotted(where, unknown[0])!r} in {table} "
            f"(expected keys: {', '.join(fields)})"
        )
    values = {}
    for name, field in fields.items():
        key = _dotted(where, name)
        if name not in data:
            no_default = dataclasses.MISSING
            if field.default is no_default and field.default_factory is no_default:
                raise ConfigError(f"{source}: missing key {key!r} in {table}")
            continue
        values[name] = _convert(hints[name], data[name], source, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {table}: {e}") from None


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(annotation, value, source: str, key: str):
    """``value`` checked against ``annotation`` (ints are accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {errors}")
    if origin is tuple:
        if not isinstance(value, list):
            raise _type_error(source, key, "an array", value)
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _convert(item_type, item, source, f"{key}[{i}]") for i, item in enumerate(value)
        )
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, source=source, where=key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise _type_error(source, key, "true or false", value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(source, key, "an integer", value)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(source, key, "a number", value)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _type_error(source, key, "a string", value)
        return value
    raise TypeError(f"from_dict: unsupported field type {annotation!r} for {key!r}")


def _type_error(source: str, key: str, expected: str, value) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {expected}, got {value!r}")
