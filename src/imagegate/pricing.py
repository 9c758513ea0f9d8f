"""Prices: one pure function from the request's shape to an exact integer amount.

The amount is in atomic units of a 6-decimal USD stablecoin (USDC: 1 = $0.000001). No floats
touch money: the scaling by area and steps is integer arithmetic, rounded up per image so an
estimate never undercharges and never depends on the order of operations.
"""

from __future__ import annotations

from imagegate.catalog import ModelSpec
from imagegate.types import Price

REFERENCE_PIXELS = 1024 * 1024


def quote(spec: ModelSpec, width: int, height: int, number_results: int, steps: int) -> Price:
    """The price of ``number_results`` images of ``width`` x ``height`` at ``steps`` on ``spec``."""
    numerator = spec.price.unit * width * height * steps
    denominator = REFERENCE_PIXELS * spec.steps.default
    per_image = max(spec.price.minimum, -(-numerator // denominator))
    return Price(per_image * number_results)
