"""Every validation rule of the spec, on both sides of each boundary."""

from __future__ import annotations

from typing import Any

import pytest

from imagegate.catalog import Catalog, build_catalog
from imagegate.config import load_settings
from imagegate.errors import InvalidDimensions, InvalidModel, InvalidParameter, InvalidRequest
from imagegate.validation import parse_image_request, parse_json_body


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(load_settings(catalog={"default_model": "flux-schnell"}, models={"fixed": {
        "name": "Fixed", "backend": "diffusers", "source": "x/y", "steps": {"supported": False, "default": 4},
        "guidance": {"mode": "none"}, "negative_prompt": "none", "price": {"unit": 10}}}))


def parse(catalog: Catalog, **fields: Any) -> Any:
    body = {"prompt": "a red fox"} | fields
    return parse_image_request(body, catalog, require_prompt=True)


def rejects(catalog: Catalog, error: type[InvalidRequest], field: str, **fields: Any) -> InvalidRequest:
    with pytest.raises(error) as caught:
        parse(catalog, **fields)
    assert type(caught.value) is error
    assert caught.value.field == field
    assert caught.value.message
    return caught.value


def test_defaults_follow_the_spec(catalog: Catalog) -> None:
    request = parse(catalog)
    assert (request.model, request.width, request.height, request.number_results) == ("flux-schnell", 1024, 1024, 1)
    assert request.steps == 4 and not request.steps_sent
    assert request.seed is None and request.guidance is None and request.negative_prompt is None


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize(("value", "ok"), [(127, False), (128, True), (64, False), (2048, True), (2112, False),
                                            (960, True), (1000, False), (0, False), (-128, False)])
def test_dimensions(catalog: Catalog, side: str, value: int, ok: bool) -> None:
    if ok:
        assert getattr(parse(catalog, **{side: value}), side) == value
    else:
        rejects(catalog, InvalidDimensions, side, **{side: value})


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", ["512", 512.5, True, None.__class__, [512], {"v": 512}])
def test_dimensions_must_be_integers(catalog: Catalog, side: str, value: Any) -> None:
    if value is None.__class__:
        return
    rejects(catalog, InvalidDimensions, side, **{side: value})


def test_integral_floats_are_integers(catalog: Catalog) -> None:
    request = parse(catalog, width=512.0, numberResults=2.0)
    assert request.width == 512 and request.number_results == 2


@pytest.mark.parametrize(("length", "ok"), [(1, False), (2, True), (3000, True), (3001, False)])
def test_prompt_length(catalog: Catalog, length: int, ok: bool) -> None:
    if ok:
        assert len(parse(catalog, prompt="p" * length).prompt) == length
    else:
        rejects(catalog, InvalidParameter, "prompt", prompt="p" * length)


@pytest.mark.parametrize("prompt", [42, ["a cat"], True, "  ", "\n\n\t"])
def test_prompt_type_and_blank(catalog: Catalog, prompt: Any) -> None:
    rejects(catalog, InvalidParameter, "prompt", prompt=prompt)


def test_missing_prompt(catalog: Catalog) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_image_request({"width": 512}, catalog, require_prompt=True)
    assert caught.value.field == "prompt"
    # The estimate endpoint prices a request without a prompt (spec Example 9).
    assert parse_image_request({"width": 512}, catalog, require_prompt=False).prompt is None


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (4, True), (5, False), (-1, False), (1.5, False),
                                            ("2", False)])
def test_number_results(catalog: Catalog, value: Any, ok: bool) -> None:
    if ok:
        assert parse(catalog, numberResults=value).number_results == value
    else:
        rejects(catalog, InvalidParameter, "numberResults", numberResults=value)


@pytest.mark.parametrize(("length", "ok"), [(0, True), (1, True), (3000, True), (3001, False)])
def test_negative_prompt_length(catalog: Catalog, length: int, ok: bool) -> None:
    if ok:
        request = parse(catalog, negativePrompt="n" * length)
        assert request.negative_prompt == ("n" * length or None)
    else:
        rejects(catalog, InvalidParameter, "negativePrompt", negativePrompt="n" * length)


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (50, True), (51, False), (10.5, False),
                                            ("10", False), (True, False)])
def test_steps(catalog: Catalog, value: Any, ok: bool) -> None:
    if ok:
        request = parse(catalog, model="sdxl", steps=value)
        assert request.steps == value and request.steps_sent
    else:
        rejects(catalog, InvalidParameter, "steps", model="sdxl", steps=value)


def test_steps_within_the_models_own_range(catalog: Catalog) -> None:
    assert parse(catalog, model="sdxl-turbo", steps=4).steps == 4
    error = rejects(catalog, InvalidParameter, "steps", model="sdxl-turbo", steps=5)
    assert "1 to 4" in error.message


def test_steps_on_a_model_without_steps_support(catalog: Catalog) -> None:
    error = rejects(catalog, InvalidParameter, "steps", model="fixed", steps=4)
    assert "supportsSteps" in error.message
    assert parse(catalog, model="fixed").steps == 4


@pytest.mark.parametrize(("value", "ok"), [(0.9, False), (1, True), (1.0, True), (7.5, True), (30, True),
                                            (30.0, True), (31, False), (30.01, False), ("7", False), (False, False)])
def test_guidance(catalog: Catalog, value: Any, ok: bool) -> None:
    if ok:
        assert parse(catalog, guidance=value).guidance == float(value)
    else:
        rejects(catalog, InvalidParameter, "guidance", guidance=value)


def test_guidance_and_negative_prompt_rejected_where_unsupported(catalog: Catalog) -> None:
    rejects(catalog, InvalidParameter, "guidance", model="fixed", guidance=5)
    rejects(catalog, InvalidParameter, "negativePrompt", model="fixed", negativePrompt="blurry")


@pytest.mark.parametrize(("value", "ok"), [(0, True), (12345, True), (2**53 - 5, True), (2**53, False),
                                            (-1, False), (1.5, False), ("42", False)])
def test_seed(catalog: Catalog, value: Any, ok: bool) -> None:
    if ok:
        assert parse(catalog, seed=value).seed == value
    else:
        rejects(catalog, InvalidParameter, "seed", seed=value)


def test_model(catalog: Catalog) -> None:
    assert parse(catalog, model="sdxl").model == "sdxl"
    error = rejects(catalog, InvalidModel, "model", model="dall-e-9")
    assert "flux-schnell" in error.message
    rejects(catalog, InvalidModel, "model", model=7)


def test_unknown_fields_are_named(catalog: Catalog) -> None:
    error = rejects(catalog, InvalidParameter, "n", n=2)
    assert "'n'" in error.message


@pytest.mark.parametrize(("value", "expected"), [("png", "png"), ("WEBP", "webp"), ("jpg", "jpeg"), ("jpeg", "jpeg")])
def test_output_format(catalog: Catalog, value: str, expected: str) -> None:
    request = parse(catalog, outputFormat=value)
    assert request.output_format is not None and request.output_format.value == expected
    rejects(catalog, InvalidParameter, "outputFormat", outputFormat="gif")


def test_nulls_mean_defaults(catalog: Catalog) -> None:
    request = parse(catalog, width=None, steps=None, seed=None, negativePrompt=None)
    assert request.width == 1024 and request.steps == 4


def test_spec_examples_4_and_5_validate(catalog: Catalog) -> None:
    example_5 = parse(catalog, prompt="an elegant art deco interior, luxury and sophistication",
                      negativePrompt="modern, minimalist, plain, simple", model="flux-schnell",
                      width=1024, height=1024, numberResults=2, steps=10, guidance=8.0, seed=12345)
    assert (example_5.steps, example_5.guidance, example_5.seed) == (10, 8.0, 12345)


@pytest.mark.parametrize("raw", [b"", b"   ", b"{", b"not json", b"[1, 2]", b'"prompt"', b"null", b"\xff\xfe",
                                 b'{"prompt": NaN}', b'{"width": Infinity}'])
def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(InvalidParameter):
        parse_json_body(raw)


def test_json_body_object() -> None:
    assert parse_json_body(b' {"prompt": "a cat"} ') == {"prompt": "a cat"}
