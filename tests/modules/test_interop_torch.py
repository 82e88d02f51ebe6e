"""PyTorch parity through jax_attn.interop, and the book's initialisers.

The book's five classes are written below in PyTorch with the chapter's semantics; weights
are copied with ``interop`` in both directions and outputs must agree to 1e-5. The parity
tests are skipped when torch is missing (the ``torch`` extra); the error and initialiser
tests run without it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_attn as ja
from jax_attn.interop import (
    TorchLayout,
    TorchTensor,
    params_from_torch,
    params_to_torch,
    torch_layout,
)

D_IN, D_OUT, CONTEXT, HEADS, DROPOUT = 6, 4, 8, 2, 0.25
T, B = 5, 2
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
TORCH_MISSING = "torch is not installed: the PyTorch parity tests need the 'torch' extra"


@pytest.fixture(autouse=True)
def float32_matmuls():
    """True float32 matmuls: GPUs default to TF32, which the 1e-5 tolerances do not allow."""
    with jax.default_matmul_precision("float32"):
        yield


def book_classes():
    """The chapter's classes in PyTorch (``keys.transpose(-2, -1)`` for the book's ``.T`` so
    the single-head classes take batches too)."""
    torch = pytest.importorskip("torch", reason=TORCH_MISSING)
    nn = torch.nn

    class SelfAttention_v1(nn.Module):  # noqa: N801 - the book's name
        def __init__(self, d_in, d_out):
            super().__init__()
            self.W_query = nn.Parameter(torch.rand(d_in, d_out))
            self.W_key = nn.Parameter(torch.rand(d_in, d_out))
            self.W_value = nn.Parameter(torch.rand(d_in, d_out))

        def forward(self, x):
            keys, queries, values = x @ self.W_key, x @ self.W_query, x @ self.W_value
            attn_scores = queries @ keys.transpose(-2, -1)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            return attn_weights @ values

    class SelfAttention_v2(nn.Module):  # noqa: N801
        def __init__(self, d_in, d_out, qkv_bias=False):
            super().__init__()
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

        def forward(self, x):
            keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
            attn_scores = queries @ keys.transpose(-2, -1)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            return attn_weights @ values

    class CausalAttention(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
            super().__init__()
            self.d_out = d_out
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.dropout = nn.Dropout(dropout)
            self.register_buffer(
                "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
            )

        def forward(self, x):
            b, num_tokens, d_in = x.shape
            keys, queries, values = self.W_key(x), self.W_query(x), self.W_value(x)
            attn_scores = queries @ keys.transpose(1, 2)
            attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            return attn_weights @ values

    class MultiHeadAttentionWrapper(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
            super().__init__()
            self.heads = nn.ModuleList(
                [
                    CausalAttention(d_in, d_out, context_length, dropout, qkv_bias)
                    for _ in range(num_heads)
                ]
            )

        def forward(self, x):
            return torch.cat([head(x) for head in self.heads], dim=-1)

    class MultiHeadAttention(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
            super().__init__()
            assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
            self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.out_proj = nn.Linear(d_out, d_out)
            self.dropout = nn.Dropout(dropout)
            self.register_buffer(
                "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
            )

        def forward(self, x):
            b, num_tokens, d_in = x.shape
            shape = (b, num_tokens, self.num_heads, self.head_dim)
            keys = self.W_key(x).view(shape).transpose(1, 2)
            queries = self.W_query(x).view(shape).transpose(1, 2)
            values = self.W_value(x).view(shape).transpose(1, 2)
            attn_scores = queries @ keys.transpose(2, 3)
            attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            context_vec = (attn_weights @ values).transpose(1, 2)
            context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
            return self.out_proj(context_vec)

    return torch, {
        "SelfAttentionV1": SelfAttention_v1,
        "SelfAttentionV2": SelfAttention_v2,
        "CausalAttention": CausalAttention,
        "MultiHeadAttentionWrapper": MultiHeadAttentionWrapper,
        "MultiHeadAttention": MultiHeadAttention,
    }


@pytest.fixture(scope="module")
def book():
    return book_classes()


def constructor_args(name, qkv_bias):
    """Positional arguments shared by the book's class and ours, and the flax module."""
    args = {
        "SelfAttentionV1": (D_IN, D_OUT),
        "SelfAttentionV2": (D_IN, D_OUT, qkv_bias),
        "CausalAttention": (D_IN, D_OUT, CONTEXT, DROPOUT, qkv_bias),
        "MultiHeadAttentionWrapper": (D_IN, D_OUT, CONTEXT, DROPOUT, HEADS, qkv_bias),
        "MultiHeadAttention": (D_IN, D_OUT, CONTEXT, DROPOUT, HEADS, qkv_bias),
    }[name]
    return args, getattr(ja, name)(*args)


CASES = [("SelfAttentionV1", False)] + [
    (name, qkv_bias)
    for name in (
        "SelfAttentionV2",
        "CausalAttention",
        "MultiHeadAttentionWrapper",
        "MultiHeadAttention",
    )
    for qkv_bias in (False, True)
]
CASE_IDS = [f"{name}-bias{int(bias)}" for name, bias in CASES]
# The fast set: each class once, qkv_bias both ways. The other cases run in the slow set
# (CI's `-m slow` step); they take the same conversion path with another bias flag.
FAST_CASES = {
    ("SelfAttentionV1", False),
    ("SelfAttentionV2", True),
    ("CausalAttention", False),
    ("MultiHeadAttentionWrapper", True),
    ("MultiHeadAttention", True),
}


def sweep(fast=FAST_CASES, batched=None):
    """``CASES`` as params (times ``batched`` when given); those outside ``fast`` are slow.

    With ``batched``, the unbatched path runs fast for one class (``MultiHeadAttention``,
    the only one that reshapes heads) and slow for the rest."""
    params = []
    for case, case_id in zip(CASES, CASE_IDS, strict=True):
        for b in [None] if batched is None else batched:
            values = case if b is None else (*case, b)
            fast_case = case in fast and (b in (None, True) or case[0] == "MultiHeadAttention")
            marks = () if fast_case else (pytest.mark.slow,)
            suffix = "" if b is None else ("-batched" if b else "-unbatched")
            params.append(pytest.param(*values, marks=marks, id=case_id + suffix))
    return params


def inputs(batched: bool, seed: int = 0):
    shape = (B, T, D_IN) if batched else (T, D_IN)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def torch_output(torch, torch_module, x):
    """The book's module in eval mode; unbatched inputs go through as a batch of one."""
    torch_module.eval()
    with torch.no_grad():
        batch = torch.from_numpy(x if x.ndim == 3 else x[None])
        out = torch_module(batch).numpy()
    return out if x.ndim == 3 else out[0]


@pytest.mark.parametrize(("name", "qkv_bias", "batched"), sweep(batched=[True, False]))
def test_torch_to_flax_outputs_match(book, name, qkv_bias, batched):
    torch, classes = book
    args, module = constructor_args(name, qkv_bias)
    torch.manual_seed(CASES.index((name, qkv_bias)))
    torch_module = classes[name](*args)
    params = params_from_torch(module, torch_module.state_dict())
    x = inputs(batched)
    ours = module.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), torch_output(torch, torch_module, x), **TOLERANCE)


@pytest.mark.parametrize(("name", "qkv_bias", "batched"), sweep(batched=[True, False]))
def test_flax_to_torch_outputs_match(book, name, qkv_bias, batched):
    torch, classes = book
    args, module = constructor_args(name, qkv_bias)
    x = inputs(batched, seed=1)
    params = module.init(jax.random.key(CASES.index((name, qkv_bias))), x)["params"]
    torch_module = classes[name](*args)
    state = params_to_torch(module, params)
    result = torch_module.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(torch_layout(module).buffers)
    ours = module.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), torch_output(torch, torch_module, x), **TOLERANCE)


# fast: the classes with the book's mask buffer; V1/V2 have none (slow set), and their
# include_buffers=True key sets are checked fast in test_round_trip_is_exact
@pytest.mark.parametrize(
    ("name", "qkv_bias"),
    sweep(FAST_CASES - {("SelfAttentionV1", False), ("SelfAttentionV2", True)}),
)
def test_include_buffers_loads_strictly_and_equals_book_mask(book, name, qkv_bias):
    torch, classes = book
    args, module = constructor_args(name, qkv_bias)
    torch_module = classes[name](*args)
    params = module.init(jax.random.key(0), inputs(False))["params"]
    state = params_to_torch(module, params, include_buffers=True)
    book_state = torch_module.state_dict()
    assert set(state) == set(book_state)
    for key in torch_layout(module).buffers:
        np.testing.assert_array_equal(state[key], book_state[key].numpy())
    torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


@pytest.mark.parametrize(("name", "qkv_bias"), sweep())
def test_round_trip_is_exact(book, name, qkv_bias):
    torch, classes = book
    args, module = constructor_args(name, qkv_bias)
    torch.manual_seed(7)
    book_state = {k: v.numpy() for k, v in classes[name](*args).state_dict().items()}
    params = params_from_torch(module, book_state)
    back = params_to_torch(module, {"params": params}, include_buffers=True)
    assert set(back) == set(book_state)
    for key, value in book_state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # Flax side: the converted params have exactly the shapes that init makes.
    init_shapes = jax.eval_shape(module.init, jax.random.key(0), inputs(False))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init_shapes)


def test_torch_tensors_on_grad_and_bfloat16_convert(book):
    torch, classes = book
    args, module = constructor_args("SelfAttentionV2", True)
    torch_module = classes["SelfAttentionV2"](*args)
    grad_state = {k: v.requires_grad_(True) for k, v in torch_module.state_dict().items()}
    params = params_from_torch(module, grad_state)
    assert params["W_query"]["kernel"].dtype == np.float32
    bf16_state = {k: v.to(torch.bfloat16) for k, v in torch_module.state_dict().items()}
    params = params_from_torch(module, bf16_state)
    assert params["W_query"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        params["W_query"]["kernel"].astype(np.float32),
        bf16_state["W_query.weight"].float().numpy().T,
    )


# --- errors: no torch needed, the state dicts are numpy -------------------------------------


def numpy_state(module):
    """A state dict that fits ``module``, from its own layout."""
    rng = np.random.default_rng(0)
    layout = torch_layout(module)
    return {t.torch_name: rng.normal(size=t.torch_shape).astype(np.float32) for t in layout.tensors}


ERROR_MODULES = [
    ja.SelfAttentionV1(D_IN, D_OUT),
    ja.SelfAttentionV2(D_IN, D_OUT, qkv_bias=True),
    ja.CausalAttention(D_IN, D_OUT, CONTEXT, DROPOUT),
    ja.MultiHeadAttentionWrapper(D_IN, D_OUT, CONTEXT, DROPOUT, HEADS, qkv_bias=True),
    ja.MultiHeadAttention(D_IN, D_OUT, CONTEXT, DROPOUT, HEADS),
]
ERROR_IDS = [type(m).__name__ for m in ERROR_MODULES]


@pytest.mark.parametrize("module", ERROR_MODULES, ids=ERROR_IDS)
def test_missing_key_names_key_and_shape(module):
    state = numpy_state(module)
    key = sorted(state)[-1]
    shape = state.pop(key).shape
    with pytest.raises(ValueError, match="missing") as error:
        params_from_torch(module, state)
    assert repr(key) in str(error.value) and str(list(shape)) in str(error.value)


@pytest.mark.parametrize("module", ERROR_MODULES, ids=ERROR_IDS)
def test_unexpected_key_names_key_and_shape(module):
    state = numpy_state(module)
    state["W_extra.weight"] = np.zeros((3, 7), np.float32)
    with pytest.raises(ValueError, match="unexpected") as error:
        params_from_torch(module, state)
    assert "'W_extra.weight'" in str(error.value) and "[3, 7]" in str(error.value)


@pytest.mark.parametrize("module", ERROR_MODULES, ids=ERROR_IDS)
def test_wrong_shape_names_key_and_both_shapes(module):
    state = numpy_state(module)
    key = sorted(state)[0]
    expected = state[key].shape
    state[key] = np.zeros((*expected, 2), np.float32)
    with pytest.raises(ValueError, match="wrong shape") as error:
        params_from_torch(module, state)
    message = str(error.value)
    assert repr(key) in message
    assert str(list(expected)) in message and str([*expected, 2]) in message


@pytest.mark.parametrize("module", ERROR_MODULES, ids=ERROR_IDS)
def test_params_to_torch_errors_name_flax_path_and_shapes(module):
    params = params_from_torch(module, numpy_state(module))
    leaf_path, leaf = jax.tree_util.tree_flatten_with_path(params)[0][0]
    keys = [p.key for p in leaf_path]
    node = params
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = np.zeros((*leaf.shape, 3), np.float32)
    with pytest.raises(ValueError, match="wrong shape") as error:
        params_to_torch(module, params)
    message = str(error.value)
    assert "".join(f"[{k!r}]" for k in keys) in message
    assert str(list(leaf.shape)) in message and str([*leaf.shape, 3]) in message
    del node[keys[-1]]
    with pytest.raises(ValueError, match="missing"):
        params_to_torch(module, params)


def test_bias_given_to_module_without_bias_is_unexpected():
    with_bias = numpy_state(ja.SelfAttentionV2(D_IN, D_OUT, qkv_bias=True))
    with pytest.raises(ValueError, match=r"unexpected 'W_query\.bias'.*\[4\]"):
        params_from_torch(ja.SelfAttentionV2(D_IN, D_OUT), with_bias)


def test_mask_buffers_are_ignored_only_where_the_book_has_them():
    causal = ja.CausalAttention(D_IN, D_OUT, CONTEXT, DROPOUT)
    state = numpy_state(causal) | {"mask": np.ones((99, 99), np.float32)}
    assert set(params_from_torch(causal, state)) == {"W_query", "W_key", "W_value"}
    v2 = ja.SelfAttentionV2(D_IN, D_OUT)
    with pytest.raises(ValueError, match="unexpected 'mask'"):
        params_from_torch(v2, numpy_state(v2) | {"mask": np.ones((8, 8), np.float32)})


def test_unknown_module_and_non_mapping_are_type_errors():
    import flax.linen as nn

    with pytest.raises(TypeError, match="module must be one of"):
        params_from_torch(nn.Dense(3), {})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        params_from_torch(ja.SelfAttentionV1(D_IN, D_OUT), [np.zeros(3)])


def grouped_query_attention_class(torch):
    """The book's MultiHeadAttention with ``num_kv_heads`` key/value heads, each shared by
    ``num_heads // num_kv_heads`` consecutive query heads (``repeat_interleave``)."""
    nn = torch.nn

    class GroupedQueryAttention(nn.Module):
        def __init__(self, d_in, d_out, context_length, num_heads, num_kv_heads, qkv_bias):
            super().__init__()
            self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
            self.num_kv_heads = num_kv_heads
            kv_out = num_kv_heads * self.head_dim
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
            self.out_proj = nn.Linear(d_out, d_out)
            self.register_buffer(
                "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
            )

        def forward(self, x):
            b, num_tokens, _ = x.shape
            group = self.num_heads // self.num_kv_heads
            kv_shape = (b, num_tokens, self.num_kv_heads, self.head_dim)
            keys = self.W_key(x).view(kv_shape).transpose(1, 2)
            values = self.W_value(x).view(kv_shape).transpose(1, 2)
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim)
            queries = queries.transpose(1, 2)
            attn_scores = queries @ keys.transpose(2, 3)
            attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
            attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            context_vec = (attn_weights @ values).transpose(1, 2)
            return self.out_proj(context_vec.contiguous().view(b, num_tokens, self.d_out))

    return GroupedQueryAttention


# fast: one kv head and qkv bias; (2 kv heads, no bias) take the same path, in the slow set
@pytest.mark.parametrize("num_kv_heads", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("qkv_bias", [pytest.param(False, marks=pytest.mark.slow), True])
def test_grouped_kv_heads_match_torch_both_ways(book, num_kv_heads, qkv_bias):
    torch, _ = book
    if "num_kv_heads" not in {f.name for f in dataclasses.fields(ja.MultiHeadAttention)}:
        pytest.skip("MultiHeadAttention has no num_kv_heads option")
    num_heads, d_out = 4, 8
    module = ja.MultiHeadAttention(
        D_IN, d_out, CONTEXT, DROPOUT, num_heads, qkv_bias=qkv_bias, num_kv_heads=num_kv_heads
    )
    torch.manual_seed(num_kv_heads)
    torch_module = grouped_query_attention_class(torch)(
        D_IN, d_out, CONTEXT, num_heads, num_kv_heads, qkv_bias
    )
    x = inputs(batched=True)
    params = params_from_torch(module, torch_module.state_dict())
    assert params["W_key"]["kernel"].shape == (D_IN, num_kv_heads * d_out // num_heads)
    ours = module.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), torch_output(torch, torch_module, x), **TOLERANCE)

    params = module.init(jax.random.key(5), x)["params"]
    state = params_to_torch(module, params, include_buffers=True)
    torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    ours = module.apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), torch_output(torch, torch_module, x), **TOLERANCE)


# --- initialisers like the book's ---------------------------------------------------------


def test_self_attention_v1_init_is_uniform_0_1_like_torch_rand():
    module = ja.SelfAttentionV1(64, 256)
    params = module.init(jax.random.key(3), jnp.zeros((1, 64)))["params"]
    for name in ("W_query", "W_key", "W_value"):
        w = np.asarray(params[name])
        assert w.shape == (64, 256)
        assert w.min() >= 0.0 and w.max() < 1.0
        assert w.min() < 0.01 and w.max() > 0.99  # the whole interval is used
        # uniform [0, 1): mean 1/2, std 1/sqrt(12); 16384 draws -> mean within ~0.01
        assert abs(w.mean() - 0.5) < 0.01
        assert abs(w.std() - 12**-0.5) < 0.01


# qkv_bias=False (slow set) draws the same kernels; its "no bias" layout is checked fast by
# test_linen_modules' parameter counts
@pytest.mark.parametrize("qkv_bias", [pytest.param(False, marks=pytest.mark.slow), True])
def test_linear_init_is_uniform_within_torch_bound(qkv_bias):
    d_in, d_out = 256, 128
    module = ja.MultiHeadAttention(d_in, d_out, 4, 0.0, 4, qkv_bias=qkv_bias)
    params = module.init(jax.random.key(4), jnp.zeros((1, d_in)))["params"]
    fan_ins = {"W_query": d_in, "W_key": d_in, "W_value": d_in, "out_proj": d_out}
    assert set(params) == set(fan_ins)
    for name, fan_in in fan_ins.items():
        bound = fan_in**-0.5
        leaves = params[name]
        assert ("bias" in leaves) == (qkv_bias or name == "out_proj")
        for leaf_name, leaf in leaves.items():
            w = np.asarray(leaf)
            assert np.abs(w).max() <= bound, (name, leaf_name)
            # uniform(-b, b): std b/sqrt(3); mean's standard error b/sqrt(3n)
            assert abs(w.mean()) < 6 * bound / np.sqrt(3 * w.size), (name, leaf_name)
            if w.size >= 1000:
                assert np.abs(w).max() > 0.99 * bound, (name, leaf_name)
                assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound, (name, leaf_name)


def test_registered_layout_by_class_does_not_replace_the_linen_one(monkeypatch):
    from jax_attn import interop

    class MultiHeadAttention:  # another family's class with the linen class's name
        d_in, d_out = D_IN, D_OUT

    monkeypatch.setitem(
        interop._LAYOUTS,
        MultiHeadAttention,
        lambda m: TorchLayout((TorchTensor("w", ("w",), (m.d_in, m.d_out)),)),
    )
    other = params_from_torch(MultiHeadAttention(), {"w": np.ones((D_IN, D_OUT), np.float32)})
    assert set(other) == {"w"}
    linen_module = ja.MultiHeadAttention(D_IN, D_OUT, CONTEXT, 0.0, HEADS)
    assert set(params_from_torch(linen_module, numpy_state(linen_module))) == {
        "W_query",
        "W_key",
        "W_value",
        "out_proj",
    }


# fast: the two multi-head classes; the single-head ones (slow set) take the same converter,
# and test_nnx.py's state-dict round trip converts every NNX class through interop
@pytest.mark.parametrize(
    "name",
    [
        n if n.startswith("MultiHead") else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted({name for name, _ in CASES})
    ],
)
def test_nnx_modules_match_torch_through_their_linen_layout(book, name):
    from flax import nnx

    from jax_attn import nnx_modules as ja_nnx

    torch, classes = book
    args, _ = constructor_args(name, qkv_bias=True)
    torch.manual_seed(11)
    torch_module = classes[name](*args)
    model = getattr(ja_nnx, name)(*args, rngs=nnx.Rngs(0))
    ja_nnx.nnx_from_linen_params(model, params_from_torch(model, torch_module.state_dict()))
    x = inputs(batched=True)
    np.testing.assert_allclose(
        np.asarray(model(x, deterministic=True)), torch_output(torch, torch_module, x), **TOLERANCE
    )
    back = params_to_torch(model, ja_nnx.linen_params_from_nnx(model))
    for key, value in back.items():
        np.testing.assert_array_equal(value, torch_module.state_dict()[key].numpy(), err_msg=key)
