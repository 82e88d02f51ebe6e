"""Constants the C++ kernel states again (it cannot import Python) equal the Python ones."""

import re
from pathlib import Path

import numpy as np

from jax_attn import functional
from jax_attn.masks import MASKED_LOGIT

CPU_FLASH_CC = Path(__file__).resolve().parents[2] / "jax_attn" / "kernels" / "cpu_flash.cc"
FLOAT_LITERAL = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?f?"


def _float_product(expression: str) -> np.float32:
    """A C++ ``constexpr float`` product of float literals, evaluated in float32 as C++
    evaluates it (each literal rounded to float, each product rounded)."""
    factors = [f.strip() for f in expression.split("*")]
    assert factors and all(re.fullmatch(FLOAT_LITERAL, f) for f in factors), expression
    value = np.float32(1.0)
    for factor in factors:
        value = np.float32(value * np.float32(float(factor.rstrip("fF"))))
    return value


def test_cpu_flash_masked_logit_is_the_python_one():
    source = CPU_FLASH_CC.read_text()
    found = re.findall(r"constexpr\s+float\s+kMasked\s*=\s*([^;]+);", source)
    assert len(found) == 1, f"expected one kMasked in {CPU_FLASH_CC.name}, found {found}"
    # The C++ kernel's empty rows get lse = -kMasked, which the Python side compares
    # against MASKED_LOGIT (chunked's maps run on cpu_flash's lse): bit-equal in float32.
    assert _float_product(found[0]) == np.float32(MASKED_LOGIT)


def test_the_functional_core_masks_with_the_same_logit():
    assert float(functional.large_negative(np.float32)) == np.float32(MASKED_LOGIT)
