from __future__ import annotations

import pytest

from imagegate import pricing
from imagegate.catalog import build_catalog
from imagegate.config import load_settings
from imagegate.types import Price


@pytest.fixture(scope="module")
def catalog():  # type: ignore[no-untyped-def]
    return build_catalog(load_settings())


def test_reference_price(catalog) -> None:  # type: ignore[no-untyped-def]
    # The reference product's published estimate for flux-schnell at 1024x1024: $0.006955.
    price = pricing.quote(catalog["flux-schnell"], 1024, 1024, 1, 4)
    assert price == Price(6955) and price.usd() == "0.006955"


def test_scales_with_area_count_and_steps(catalog) -> None:  # type: ignore[no-untyped-def]
    spec = catalog["flux-schnell"]
    assert pricing.quote(spec, 512, 512, 1, 4).amount == 1739  # 6955 / 4, rounded up
    assert pricing.quote(spec, 512, 512, 4, 4).amount == 4 * 1739
    assert pricing.quote(spec, 1024, 1024, 2, 10).amount == 2 * 17388  # 6955 * 10 / 4 = 17387.5 -> up
    assert pricing.quote(spec, 2048, 2048, 1, 4).amount == 4 * 6955


def test_never_zero_and_integer_only(catalog) -> None:  # type: ignore[no-untyped-def]
    spec = catalog["sd-turbo"]
    for width in range(128, 2049, 64):
        for height in (128, 1024, 2048):
            amount = pricing.quote(spec, width, height, 1, 1).amount
            assert isinstance(amount, int) and amount >= spec.price.minimum


@pytest.mark.parametrize(("amount", "usd"), [(0, "0.000000"), (1, "0.000001"), (6955, "0.006955"),
                                             (1_000_000, "1.000000"), (123_456_789, "123.456789")])
def test_usd_strings(amount: int, usd: str) -> None:
    assert Price(amount).usd() == usd
