"""The public API over real HTTP, payments off: spec fields, defaults, errors, images, seeds."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagegate.app import app_from_settings
from tests.integration.conftest import tiny_settings
from tests.support.server import live_server

SPEC_EXAMPLE_1 = {"prompt": "a cute cat sitting on a windowsill, photorealistic", "model": "flux-schnell",
                  "width": 512, "height": 512, "numberResults": 1}
SPEC_EXAMPLE_5 = {"prompt": "an elegant art deco interior, luxury and sophistication",
                  "negativePrompt": "modern, minimalist, plain, simple", "model": "flux-schnell",
                  "width": 1024, "height": 1024, "numberResults": 2, "steps": 10, "guidance": 8.0, "seed": 12345}


@pytest.fixture(scope="module")
def http(free_api: str) -> httpx.Client:
    return httpx.Client(base_url=free_api, timeout=120, trust_env=False)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code and isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.text
    return body


def test_manifest_health_and_openapi(http: httpx.Client) -> None:
    manifest = http.get("/").json()
    assert {route["path"] for route in manifest["routes"]} >= {
        "/v1/images/generate", "/v1/images/estimate", "/v1/images/models", "/healthz", "/openapi.json"}
    assert http.get("/healthz").json() == {"status": "ok"}
    openapi = http.get("/openapi.json").json()
    generate = openapi["paths"]["/v1/images/generate"]["post"]
    # One variant per catalog model, each with the validator's limits (tests/ops/test_openapi.py has the rest).
    variants = generate["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {variant["title"] for variant in variants} == {model["id"] for model in http.get("/v1/images/models")
                                                          .json()["models"]}
    for variant in variants:
        assert variant["properties"]["numberResults"]["maximum"] == 4 and "prompt" in variant["required"]
    assert "422" not in generate["responses"]


def test_models_list(http: httpx.Client) -> None:
    listing = http.get("/v1/images/models").json()
    models = {model["id"]: model for model in listing["models"]}
    assert {"flux-schnell", "flux-dev", "sdxl", "sdxl-turbo", "sd-turbo", "sd-1.5"} <= set(models)
    schnell = models["flux-schnell"]
    assert schnell["default"] and listing["defaultModel"] == "flux-schnell"
    steps = (schnell["supportsSteps"], schnell["defaultSteps"], schnell["minSteps"], schnell["maxSteps"])
    assert steps == (True, 4, 1, 50)
    assert schnell["supportsGuidance"] and schnell["supportsNegativePrompt"] and "true classifier-free" in schnell[
        "parameterNotes"]
    assert (schnell["defaultWidth"], schnell["defaultHeight"]) == (1024, 1024)
    assert schnell["pricing"]["usdPer1024Image"] == "0.006955"
    assert schnell["available"] is True and schnell["unavailableReason"] is None
    assert models["sd-turbo"]["available"] is False and "model_index.json" in models["sd-turbo"]["unavailableReason"]
    assert models["flux-dev"]["available"] is False and models["flux-dev"]["unavailableReason"]


@pytest.mark.parametrize(("body", "code", "field"), [
    ({"prompt": "a cat", "width": 127}, "INVALID_DIMENSIONS", "width"),
    ({"prompt": "a cat", "height": 2112}, "INVALID_DIMENSIONS", "height"),
    ({"prompt": "a cat", "width": 500}, "INVALID_DIMENSIONS", "width"),
    ({"prompt": "a cat", "model": "dall-e-3"}, "INVALID_MODEL", "model"),
    ({"prompt": "a"}, "INVALID_PARAMETER", "prompt"),
    ({"prompt": "p" * 3001}, "INVALID_PARAMETER", "prompt"),
    ({"width": 512}, "INVALID_PARAMETER", "prompt"),
    ({"prompt": "a cat", "numberResults": 5}, "INVALID_PARAMETER", "numberResults"),
    ({"prompt": "a cat", "numberResults": 0}, "INVALID_PARAMETER", "numberResults"),
    ({"prompt": "a cat", "negativePrompt": "n" * 3001}, "INVALID_PARAMETER", "negativePrompt"),
    ({"prompt": "a cat", "steps": 51}, "INVALID_PARAMETER", "steps"),
    ({"prompt": "a cat", "steps": 0}, "INVALID_PARAMETER", "steps"),
    ({"prompt": "a cat", "guidance": 0.9}, "INVALID_PARAMETER", "guidance"),
    ({"prompt": "a cat", "guidance": 31}, "INVALID_PARAMETER", "guidance"),
    ({"prompt": "a cat", "seed": "42"}, "INVALID_PARAMETER", "seed"),
    ({"prompt": "a cat", "width": "512"}, "INVALID_DIMENSIONS", "width"),
    ({"prompt": "a cat", "numberResults": 1.5}, "INVALID_PARAMETER", "numberResults"),
])
@pytest.mark.parametrize("path", ["/v1/images/generate", "/v1/images/estimate"])
def test_validation_errors(http: httpx.Client, path: str, body: dict[str, Any], code: str, field: str) -> None:
    if path.endswith("estimate") and field == "prompt" and "prompt" not in body:
        return  # the estimate prices a request without a prompt
    error = error_of(http.post(path, json=body), 400, code)
    assert error["details"]["field"] == field


@pytest.mark.parametrize("raw", [b"{", b"[]", b"", b'{"prompt": "a cat",}', b"\xff"])
def test_malformed_json_is_invalid_parameter(http: httpx.Client, raw: bytes) -> None:
    error_of(http.post("/v1/images/generate", content=raw, headers={"Content-Type": "application/json"}), 400,
             "INVALID_PARAMETER")


def test_unknown_routes_and_methods_use_the_error_shape(http: httpx.Client) -> None:
    error_of(http.get("/v1/nope"), 404, "NOT_FOUND")
    error_of(http.get("/v1/images/generate"), 405, "METHOD_NOT_ALLOWED")
    error_of(http.get("/images/not-a-uuid.png"), 404, "NOT_FOUND")


def test_estimate_matches_the_spec_example(http: httpx.Client) -> None:
    # Spec Example 9, step 1.
    estimate = http.post("/v1/images/estimate", json={"model": "flux-schnell", "width": 1024, "height": 1024,
                                                      "numberResults": 1}).json()
    assert estimate["model"] == "flux-schnell" and estimate["dimensions"] == "1024×1024"
    assert estimate["number_of_images"] == 1
    assert estimate["estimatedCost"]["usd"] == "0.006955" and estimate["estimatedCost"]["note"]
    assert estimate["estimatedCost"]["amount"] == "6955"


def test_unavailable_model_is_503_not_500(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/images/generate", json={"prompt": "a cat", "model": "sd-turbo"}), 503,
                     "MODEL_UNAVAILABLE")
    assert "sd-turbo" in error["message"]
    error_of(http.post("/v1/images/generate", json={"prompt": "a cat", "model": "flux-dev"}), 503,
             "MODEL_UNAVAILABLE")


def _fetch(http: httpx.Client, url: str) -> httpx.Response:
    response = http.get(url)
    assert response.status_code == 200
    return response


def test_spec_example_1_and_permanent_urls(http: httpx.Client, free_api: str) -> None:
    response = http.post("/v1/images/generate", json=SPEC_EXAMPLE_1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "flux-schnell" and len(body["images"]) == 1
    image = body["images"][0]
    assert image["url"].startswith(free_api) and image["uuid"] in image["url"]
    assert (image["width"], image["height"]) == (512, 512) and isinstance(image["seed"], int)
    served = _fetch(http, image["url"])
    assert served.headers["content-type"] == "image/png"
    assert "immutable" in served.headers["cache-control"] and "max-age=31536000" in served.headers["cache-control"]
    assert served.headers["etag"] == f'"{hashlib.sha256(served.content).hexdigest()}"'
    assert Image.open(io.BytesIO(served.content)).size == (512, 512)
    assert http.get(image["url"], headers={"If-None-Match": served.headers["etag"]}).status_code == 304


def test_four_results_are_four_distinct_stored_images(http: httpx.Client) -> None:
    body = http.post("/v1/images/generate", json={"prompt": "four shapes", "width": 256, "height": 256,
                                                   "numberResults": 4, "seed": 100}).json()
    assert [image["seed"] for image in body["images"]] == [100, 101, 102, 103]
    assert len({image["uuid"] for image in body["images"]}) == 4
    digests = {hashlib.sha256(_fetch(http, image["url"]).content).hexdigest() for image in body["images"]}
    assert len(digests) == 4


def test_same_seed_same_bytes(http: httpx.Client) -> None:
    request = {"prompt": "a red circle", "width": 256, "height": 256, "numberResults": 2, "seed": 42}
    first = http.post("/v1/images/generate", json=request).json()
    second = http.post("/v1/images/generate", json=request).json()
    assert [i["uuid"] for i in first["images"]] != [i["uuid"] for i in second["images"]]
    for a, b in zip(first["images"], second["images"], strict=True):
        assert _fetch(http, a["url"]).content == _fetch(http, b["url"]).content
    other = http.post("/v1/images/generate", json={**request, "seed": 43}).json()
    assert _fetch(http, other["images"][0]["url"]).content != _fetch(http, first["images"][0]["url"]).content


def test_seed_reported_without_one_reproduces_the_image(http: httpx.Client) -> None:
    drawn = http.post("/v1/images/generate", json={"prompt": "a blue square", "width": 256, "height": 256}).json()
    seed = drawn["images"][0]["seed"]
    again = http.post("/v1/images/generate", json={"prompt": "a blue square", "width": 256, "height": 256,
                                                   "seed": seed}).json()
    assert _fetch(http, drawn["images"][0]["url"]).content == _fetch(http, again["images"][0]["url"]).content


def test_spec_example_5_all_quality_parameters(http: httpx.Client) -> None:
    response = http.post("/v1/images/generate", json=SPEC_EXAMPLE_5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["steps"] == 10 and [i["seed"] for i in body["images"]] == [12345, 12346]
    without_negative = http.post("/v1/images/generate", json={
        k: v for k, v in SPEC_EXAMPLE_5.items() if k not in ("negativePrompt", "guidance")}).json()
    assert _fetch(http, body["images"][0]["url"]).content != _fetch(http, without_negative["images"][0]["url"]).content


@pytest.mark.parametrize(("model", "extra"), [("sdxl", {"guidance": 6.5, "negativePrompt": "blurry"}),
                                              ("sd-1.5", {"steps": 3})])
def test_other_pipeline_families(http: httpx.Client, model: str, extra: dict[str, Any]) -> None:
    body = http.post("/v1/images/generate", json={"prompt": "a tiny house", "model": model, "width": 256,
                                                   "height": 384, **extra}).json()
    assert body["model"] == model
    assert Image.open(io.BytesIO(_fetch(http, body["images"][0]["url"]).content)).size == (256, 384)


@pytest.mark.parametrize(("output_format", "media_type"), [("webp", "image/webp"), ("jpeg", "image/jpeg")])
def test_output_formats(http: httpx.Client, output_format: str, media_type: str) -> None:
    body = http.post("/v1/images/generate", json={"prompt": "a green tree", "width": 128, "height": 128,
                                                   "outputFormat": output_format}).json()
    assert _fetch(http, body["images"][0]["url"]).headers["content-type"] == media_type


def test_body_without_content_type_is_parsed(http: httpx.Client) -> None:
    response = http.post("/v1/images/generate", content=b'{"prompt": "a cat", "width": 128, "height": 128}',
                         headers={"Content-Type": "text/plain"})
    assert response.status_code == 200, response.text


def test_public_base_url_fronts_the_image_urls(tmp_path: Path, tiny_model_paths: dict[str, Path]) -> None:
    settings = tiny_settings(tmp_path, tiny_model_paths, payments={"enabled": False},
                             server={"public_base_url": "https://cdn.example.com/gen"})
    with live_server(app_from_settings(settings)) as base_url, httpx.Client(base_url=base_url, timeout=120,
                                                                           trust_env=False) as client:
        body = client.post("/v1/images/generate", json={"prompt": "a cat", "width": 128, "height": 128}).json()
        url = body["images"][0]["url"]
        assert url.startswith("https://cdn.example.com/gen/images/") and url.endswith(".png")
        # The CDN forwards the path: the same path is served here.
        assert client.get(url.removeprefix("https://cdn.example.com/gen")).status_code == 200
