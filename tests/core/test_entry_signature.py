"""The public ``dot_product_attention`` functions are plain ``def``s: the signature an IDE
or type checker reads is the one written, the same for the dispatcher and the reference."""

import inspect

from jax_attn import dispatch, reference
from jax_attn.validation import check_attention_args

# DESIGN.md's order: the jax.nn arguments, then implementation, then the functions.
KEYWORDS = [
    "mask",
    "bias",
    "is_causal",
    "scale",
    "query_seq_lengths",
    "key_value_seq_lengths",
    "local_window_size",
    "dropout_rate",
    "dropout_rng",
    "implementation",
    "mask_fn",
    "score_fn",
    "block_mask",
    "alibi_slopes",
    "logit_soft_cap",
]


def test_dispatcher_and_reference_share_one_written_signature():
    for fn in (dispatch.dot_product_attention, reference.dot_product_attention):
        assert "__signature__" not in vars(fn) and not hasattr(fn, "__wrapped__")
        parameters = inspect.signature(fn).parameters
        assert list(parameters)[:3] == ["query", "key", "value"]
        assert list(parameters)[3:] == KEYWORDS
        kinds = {p.kind for name, p in parameters.items() if name in KEYWORDS}
        assert kinds == {inspect.Parameter.KEYWORD_ONLY}
        assert fn.__doc__ and ">>>" in fn.__doc__
    assert inspect.signature(dispatch.dot_product_attention) == inspect.signature(
        reference.dot_product_attention
    )


def test_defaults_match_the_checks():
    """Every keyword but ``implementation`` and the score options (folded into
    ``score_fn`` before the checks, both default ``None``) is one of
    ``check_attention_args``'s, with the same default."""
    checks = inspect.signature(check_attention_args).parameters
    parameters = inspect.signature(dispatch.dot_product_attention).parameters
    assert parameters["alibi_slopes"].default is parameters["logit_soft_cap"].default is None
    for name, parameter in parameters.items():
        if name in ("query", "key", "value", "implementation", "alibi_slopes", "logit_soft_cap"):
            continue
        assert parameter.default == checks[name].default, name
    assert (
        inspect.signature(dispatch.dot_product_attention).parameters["implementation"].default
        is None
    )
