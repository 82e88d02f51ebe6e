"""Shared by the chapter-3 notebooks: the book's inputs, what the book prints, and how to compare.

The book's inputs and the values its first sections print live in the package
(``jax_attn.data.book_values()``). Sections 3.5 and 3.6 print values that depend on weights
PyTorch draws from a seed (``torch.manual_seed(789)`` for ``SelfAttention_v2``,
``torch.manual_seed(123)`` for ``CausalAttention``, ``MultiHeadAttentionWrapper`` and
``MultiHeadAttention``). Those weights are written out below (``nn.Linear`` weights in
PyTorch's ``[d_out, d_in]`` layout, exactly as the seeded draws give them) so that the
notebooks run without PyTorch; ``03_modules.ipynb`` draws them again with PyTorch, when it is
installed, and checks they are these.

The printed values come from the book's companion notebook
(``ch03/01_main-chapter-code/ch03.ipynb`` in ``rasbt/LLMs-from-scratch``), 4 decimals.
"""

from __future__ import annotations

import io

import numpy as np

from jax_attn.data import book_values

__all__ = [
    "BOOK",
    "BOOK_ATOL",
    "INPUTS",
    "PRINTED",
    "TOKENS",
    "TORCH_WEIGHTS",
    "compare",
    "kernel",
    "show",
    "state_dict",
]

BOOK = book_values()
INPUTS = np.asarray(BOOK["inputs"], np.float32)  # [T=6, D=3]
TOKENS = BOOK["sentence"].split()  # ["Your", "journey", ...]

#: The book prints 4 decimals: a correct value is within half a unit of the last one.
BOOK_ATOL = 5e-5

# --- weights the book draws from a seed (PyTorch layout: nn.Linear.weight is [d_out, d_in]) -

_CAUSAL_123 = {
    "W_query.weight": [
        [-0.23542964458465576, 0.019124476239085197, -0.28674593567848206],
        [0.21772661805152893, -0.491934210062027, 0.423223078250885],
    ],
    "W_key.weight": [
        [-0.4196414053440094, -0.45901766419410706, -0.3648201823234558],
        [0.2614781856536865, -0.21332639455795288, 0.21605217456817627],
    ],
    "W_value.weight": [
        [-0.49001413583755493, -0.35029205679893494, -0.21198919415473938],
        [-0.1134607195854187, -0.440439373254776, 0.37804362177848816],
    ],
}

TORCH_WEIGHTS = {
    # 3.4.2 / 3.5.1: torch.manual_seed(789); SelfAttention_v2(3, 2)
    "SelfAttention_v2": {
        "W_query.weight": [
            [0.31605908274650574, 0.45680856704711914, 0.5118348598480225],
            [-0.16828539967536926, -0.3378770351409912, -0.0917738676071167],
        ],
        "W_key.weight": [
            [0.4058058261871338, -0.4704205393791199, 0.23680520057678223],
            [0.2133607417345047, -0.2600506544113159, -0.5105429887771606],
        ],
        "W_value.weight": [
            [0.25256988406181335, -0.1414782702922821, -0.19618134200572968],
            [0.5191074013710022, -0.08516757935285568, -0.2043270468711853],
        ],
    },
    # 3.5.3: torch.manual_seed(123); CausalAttention(3, 2, 6, 0.0)
    "CausalAttention": dict(_CAUSAL_123),
    # 3.6.1: torch.manual_seed(123); MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
    "MultiHeadAttentionWrapper": {
        **{f"heads.0.{name}": w for name, w in _CAUSAL_123.items()},
        "heads.1.W_query.weight": [
            [-0.13615716993808746, 0.1853223294019699, 0.4082694947719574],
            [0.107563816010952, 0.1578768491744995, 0.5572923421859741],
        ],
        "heads.1.W_key.weight": [
            [-0.26039040088653564, 0.18287640810012817, -0.2568724453449249],
            [0.4126031696796417, 0.46110451221466064, -0.5323009490966797],
        ],
        "heads.1.W_value.weight": [
            [0.4928526282310486, 0.27569305896759033, 0.25159022212028503],
            [0.237680584192276, 0.4799507260322571, -0.07623306661844254],
        ],
    },
    # 3.6.2: torch.manual_seed(123); MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    "MultiHeadAttention": {
        **_CAUSAL_123,
        "out_proj.weight": [
            [-0.16675779223442078, 0.2269725799560547],
            [0.5000259876251221, 0.13173823058605194],
        ],
        "out_proj.bias": [0.1933588683605194, 0.6825409531593323],
    },
}

# --- what the book prints in sections 3.4.2 to 3.6 (4 decimals) ----------------------------

_CAUSAL_OUT = [
    [-0.4519, 0.2216],
    [-0.5874, 0.0058],
    [-0.6300, -0.0632],
    [-0.5675, -0.0843],
    [-0.5526, -0.0981],
    [-0.5299, -0.1081],
]

PRINTED = {
    # print(sa_v2(inputs))
    "3.4.2 sa_v2(inputs)": [
        [-0.0739, 0.0713],
        [-0.0748, 0.0703],
        [-0.0749, 0.0702],
        [-0.0760, 0.0685],
        [-0.0763, 0.0679],
        [-0.0754, 0.0693],
    ],
    # softmax(queries @ keys.T / sqrt(d_k)) with sa_v2's weights
    "3.5.1 attn_weights": [
        [0.1921, 0.1646, 0.1652, 0.1550, 0.1721, 0.1510],
        [0.2041, 0.1659, 0.1662, 0.1496, 0.1665, 0.1477],
        [0.2036, 0.1659, 0.1662, 0.1498, 0.1664, 0.1480],
        [0.1869, 0.1667, 0.1668, 0.1571, 0.1661, 0.1564],
        [0.1830, 0.1669, 0.1670, 0.1588, 0.1658, 0.1585],
        [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529],
    ],
    # attn_scores.masked_fill(mask.bool(), -torch.inf) (unscaled scores)
    "3.5.1 masked": [
        [0.2899, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf],
        [0.4656, 0.1723, -np.inf, -np.inf, -np.inf, -np.inf],
        [0.4594, 0.1703, 0.1731, -np.inf, -np.inf, -np.inf],
        [0.2642, 0.1024, 0.1036, 0.0186, -np.inf, -np.inf],
        [0.2183, 0.0874, 0.0882, 0.0177, 0.0786, -np.inf],
        [0.3408, 0.1270, 0.1290, 0.0198, 0.1290, 0.0078],
    ],
    # masked_simple_norm, and again softmax(masked / sqrt(d_k))
    "3.5.1 causal attn_weights": [
        [1.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000],
        [0.5517, 0.4483, 0.0000, 0.0000, 0.0000, 0.0000],
        [0.3800, 0.3097, 0.3103, 0.0000, 0.0000, 0.0000],
        [0.2758, 0.2460, 0.2462, 0.2319, 0.0000, 0.0000],
        [0.2175, 0.1983, 0.1984, 0.1888, 0.1971, 0.0000],
        [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529],
    ],
    # ca(batch), batch = two copies of inputs
    "3.5.3 CausalAttention": [_CAUSAL_OUT, _CAUSAL_OUT],
    # MultiHeadAttentionWrapper(..., num_heads=2)(batch)
    "3.6.1 MultiHeadAttentionWrapper": [
        [
            row + extra
            for row, extra in zip(
                _CAUSAL_OUT,
                [
                    [0.4772, 0.1063],
                    [0.5891, 0.3257],
                    [0.6202, 0.3860],
                    [0.5478, 0.3589],
                    [0.5321, 0.3428],
                    [0.5077, 0.3493],
                ],
                strict=True,
            )
        ]
    ]
    * 2,
    # MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)(batch)
    "3.6.2 MultiHeadAttention": [
        [
            [0.3190, 0.4858],
            [0.2943, 0.3897],
            [0.2856, 0.3593],
            [0.2693, 0.3873],
            [0.2639, 0.3928],
            [0.2575, 0.4028],
        ]
    ]
    * 2,
    # the book's a @ a.transpose(2, 3) example, a of shape [1, 2, 3, 4], and its result
    "3.6.2 a": [
        [
            [
                [0.2745, 0.6584, 0.2775, 0.8573],
                [0.8993, 0.0390, 0.9268, 0.7388],
                [0.7179, 0.7058, 0.9156, 0.4340],
            ],
            [
                [0.0772, 0.3565, 0.1479, 0.5331],
                [0.4066, 0.2318, 0.4545, 0.9737],
                [0.4606, 0.5159, 0.4220, 0.5786],
            ],
        ]
    ],
    "3.6.2 a @ a.T": [
        [
            [[1.3208, 1.1631, 1.2879], [1.1631, 2.2150, 1.8424], [1.2879, 1.8424, 2.0402]],
            [[0.4391, 0.7003, 0.5903], [0.7003, 1.3737, 1.0620], [0.5903, 1.0620, 0.9912]],
        ]
    ],
}


def kernel(torch_weight) -> np.ndarray:
    """An ``nn.Linear.weight [d_out, d_in]`` as a Flax kernel ``[d_in, d_out]``."""
    return np.asarray(torch_weight, np.float32).T


def state_dict(name: str) -> dict[str, np.ndarray]:
    """``TORCH_WEIGHTS[name]`` as float32 arrays: the book's ``state_dict()`` for that class."""
    return {key: np.asarray(value, np.float32) for key, value in TORCH_WEIGHTS[name].items()}


def compare(label: str, ours, book, atol: float = BOOK_ATOL) -> None:
    """Print ``ours`` (rounded to the book's 4 decimals) beside ``book``; assert they agree.

    ``-inf`` in the book's value must be ``-inf`` (or masked out) in ours at the same place.
    """
    ours = np.asarray(ours, np.float64)
    book = np.asarray(book, np.float64)
    if ours.shape != book.shape:
        raise AssertionError(f"{label}: shape {ours.shape}, the book's is {book.shape}")
    finite = np.isfinite(book)
    same = np.array_equal(np.isfinite(ours), finite) and np.all(ours[~finite] == book[~finite])
    diff = float(np.max(np.abs(ours[finite] - book[finite]), initial=0.0))
    ok = same and diff <= atol
    with np.printoptions(precision=4, suppress=True, floatmode="fixed", linewidth=100):
        ours_lines = str(np.round(ours, 4)).splitlines()
        book_lines = str(book).splitlines()
    width = max(len(line) for line in ours_lines)
    print(
        f"{label}: {'agrees with the book' if ok else 'DIFFERS FROM THE BOOK'} "
        f"(max |diff| {diff:.1e})"
    )
    print(f"  {'jax_attn':<{width}}   book")
    for mine, theirs in zip(ours_lines, book_lines, strict=True):
        print(f"  {mine:<{width}}   {theirs}")
    assert ok, f"{label}: max |diff| {diff:.2e} > {atol} (or -inf placement differs)"


def show(fig, dpi: int = 72):
    """A matplotlib figure as a PNG (modest dpi) for the notebook; the figure is closed."""
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # figures built without pyplot need no closing
        pass
    return Image(data=buffer.getvalue(), format="png")
