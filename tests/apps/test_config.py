"""configs/*.toml and the frozen-dataclass reader of jax_attn.apps.config."""

import dataclasses
import re
from pathlib import Path

import pytest

import jax_attn as ja
from jax_attn.apps import config
from jax_attn.apps.config import (
    AttentionConfig,
    Config,
    ConfigError,
    available_configs,
    from_dict,
    load_config,
    load_dataclass,
    resolve_config_path,
)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

VALID = """\
[attention]
name = "tiny"
d_in = 16
d_out = 8
num_heads = 2
context_length = 32
dropout = 0.0
qkv_bias = true

[run]
batch = 2
seq_len = 8
dtype = "float32"
"""


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, width, heads, context, qkv_bias",
    [
        ("book", (3, 2), 2, 6, False),
        ("gpt2-small", (768, 768), 12, 1024, True),
        ("gpt2-medium", (1024, 1024), 16, 1024, True),
        ("gpt2-large", (1280, 1280), 20, 1024, True),
        ("gpt2-xl", (1600, 1600), 25, 1024, True),
    ],
)
def test_shipped_configs(name, width, heads, context, qkv_bias):
    cfg = load_config(REPO_CONFIGS / f"{name}.toml")
    a = cfg.attention
    assert (a.name, (a.d_in, a.d_out), a.num_heads, a.context_length, a.qkv_bias) == (
        name,
        width,
        heads,
        context,
        qkv_bias,
    )
    assert 0.0 <= a.dropout < 1.0
    assert cfg.run.seq_len <= a.context_length
    assert load_config(name) == cfg


def test_available_configs_lists_the_shipped_ones():
    assert {"book", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(
        available_configs()
    )


def test_configs_are_frozen():
    cfg = load_config("gpt2-small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.attention.num_heads = 1


def test_config_builds_the_multi_head_attention_module():
    a = load_config("gpt2-small").attention
    module = a.multi_head_attention(deterministic=True)
    assert isinstance(module, ja.MultiHeadAttention)
    assert (
        module.d_in,
        module.d_out,
        module.context_length,
        module.dropout,
        module.num_heads,
        module.qkv_bias,
        module.deterministic,
    ) == (768, 768, 1024, a.dropout, 12, True, True)
    assert a.head_dim == 64


def test_valid_file(tmp_path):
    cfg = load_config(write(tmp_path, VALID))
    assert cfg == Config(
        AttentionConfig("tiny", 16, 8, 2, 32, 0.0, True), config.RunConfig(2, 8, "float32")
    )


@pytest.mark.parametrize("table, key", [("attention", "heads"), ("run", "steps")])
def test_unknown_key_names_key_and_file(tmp_path, table, key):
    text = VALID.replace(f"[{table}]\n", f"[{table}]\n{key} = 3\n")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{table}.{key}")) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_table_names_it_and_file(tmp_path):
    path = write(tmp_path, VALID + "\n[train]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="'train'") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "line, key",
    [
        ("num_heads = 2\n", "attention.num_heads"),
        ("qkv_bias = true\n", "attention.qkv_bias"),
        ('dtype = "float32"\n', "run.dtype"),
    ],
)
def test_missing_key_names_key_and_file(tmp_path, line, key):
    path = write(tmp_path, VALID.replace(line, ""))
    with pytest.raises(ConfigError, match=re.escape(f"missing key '{key}'")) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_table_names_it(tmp_path):
    path = write(tmp_path, VALID.split("[run]")[0])
    with pytest.raises(ConfigError, match="missing key 'run'"):
        load_config(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("d_in = 16", 'd_in = "16"', "attention.d_in must be an integer"),
        ("d_in = 16", "d_in = 16.0", "attention.d_in must be an integer"),
        ("qkv_bias = true", "qkv_bias = 1", "attention.qkv_bias must be true or false"),
        ("num_heads = 2", "num_heads = true", "attention.num_heads must be an integer"),
        ("num_heads = 2", "num_heads = 3", "d_out=8 must be divisible by num_heads=3"),
        ("dropout = 0.0", "dropout = 1.0", "dropout must be in [0, 1)"),
        ("d_out = 8", "d_out = 0", "d_out must be > 0"),
        ("seq_len = 8", "seq_len = 64", "run.seq_len=64 is more than attention.context_length=32"),
        ('dtype = "float32"', 'dtype = "int8"', "dtype must be one of"),
    ],
)
def test_bad_value_names_key_and_file(tmp_path, old, new, message):
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_integer_dropout_is_read_as_float(tmp_path):
    cfg = load_config(write(tmp_path, VALID.replace("dropout = 0.0", "dropout = 0")))
    assert cfg.attention.dropout == 0.0 and isinstance(cfg.attention.dropout, float)


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "[attention\nd_in = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="gpt2-small"):
        resolve_config_path("no-such-config")


def test_resolve_finds_shipped_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/gpt2-small.toml") == REPO_CONFIGS / "gpt2-small.toml"
    assert resolve_config_path("gpt2-xl") == REPO_CONFIGS / "gpt2-xl.toml"


# --- the generic reader, as another config would use it ----------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizer:
    learning_rate: float
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int
    optimizer: Optimizer
    checkpoint: str | None = None


def test_load_dataclass_reads_one_section_and_leaves_the_others(tmp_path):
    path = write(
        tmp_path,
        VALID + "\n[train]\nsteps = 10\n[train.optimizer]\n"
        "learning_rate = 1e-3\nbetas = [0.8, 0.9]\n",
    )
    train = load_dataclass(path, Train, section="train")
    assert train == Train(10, Optimizer(1e-3, (0.8, 0.9)), None)
    assert load_dataclass(path, AttentionConfig, section="attention").d_in == 16


def test_load_dataclass_nested_unknown_key_is_dotted(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 1\n[train.optimizer]\nlearning_rate = 1\nlr = 2\n")
    with pytest.raises(ConfigError, match=re.escape("'train.optimizer.lr'")) as info:
        load_dataclass(path, Train, section="train")
    assert str(path) in str(info.value)


def test_load_dataclass_missing_section(tmp_path):
    path = write(tmp_path, VALID)
    with pytest.raises(ConfigError, match=re.escape("missing table [train]")):
        load_dataclass(path, Train, section="train")


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"steps": 1, "optimizer": {"learning_rate": 1.0, "betas": [0.9, "x"]}},
            "train.optimizer.betas[1] must be a number",
        ),
        (
            {"steps": 1, "optimizer": {"learning_rate": 1.0}, "checkpoint": 3},
            "train.checkpoint must be a string",
        ),
        ({"steps": 1, "optimizer": 2}, "[train.optimizer] must be a table"),
    ],
)
def test_from_dict_type_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(Train, data, source="x.toml", where="train")


def test_from_dict_rejects_a_class_that_is_not_a_dataclass():
    with pytest.raises(TypeError, match="dataclass"):
        from_dict(dict, {})
