"""The OpenAPI document matches the server: its rules checked on the live document, then schemathesis
(all checks, over a thousand generated cases) against a real paid server on the dev chain.

The rules hold for every operation in the document, so routes added later are held to them too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate import devchain
from imagegate.validation import MAX_RESULTS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from tests.integration.conftest import network_payments
from tests.ops.conftest import Served, base_config, serve, toml
from tests.support.models import tiny_catalog_overrides
from tests.support.payments import Terms, sign, v1_header

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
ERROR_SCHEMAS = {"#/components/schemas/ErrorBody", "#/components/schemas/PaymentRequiredBody"}
# The OpenAI-compatible route answers its errors in OpenAI's format, as OpenAI clients expect.
OPENAI_ERROR_SCHEMAS = {"#/components/schemas/OpenAIErrorBody"}
OPENAI_PATH = "/v1/images/generations"
# Generated cases per operation and phase; with the coverage phase this makes well over 1,000 cases.
MAX_EXAMPLES = 200
MIN_CASES = 1000


@pytest.fixture(scope="module")
def api(ops_chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory,
        tiny_model_paths: dict[str, Path]) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ops-openapi")
    config = base_config(root)
    # Every model listed can run: built-in ids on tiny local pipelines, the rest off.
    tiny = tiny_catalog_overrides(tiny_model_paths, root / "missing")
    for model in ("flux-schnell", "sdxl", "sd-1.5"):
        config["models"][model] = {**tiny[model], "enabled": True}
    config["payments"] = network_payments(root, ops_chain.rpc_url)
    config["logging"] = {"access_log": False}
    config["jobs"] = {"request_stream_wait_s": 1}
    with serve(root, config) as served:
        yield served


@pytest.fixture(scope="module")
def document(api: Served) -> dict[str, Any]:
    response = httpx.get(f"{api.base_url}/openapi.json", trust_env=False, timeout=60)
    assert response.status_code == 200
    openapi: dict[str, Any] = response.json()
    return openapi


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item[method]


def test_every_error_is_documented_in_the_one_format(document: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, method, operation in operations(document):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)
        for status, response in responses.items():
            assert "X-Request-ID" in response["headers"], (method, path, status)
            if int(status) >= 400:
                (content,) = response["content"].values()
                allowed = OPENAI_ERROR_SCHEMAS if path == OPENAI_PATH else ERROR_SCHEMAS
                assert content["schema"]["$ref"] in allowed, (method, path, status)
    generate = document["paths"]["/v1/images/generate"]["post"]["responses"]
    assert {"200", "202", "400", "402", "429", "500", "503"} == set(generate)
    assert {"200", "304", "404", "429"} == set(document["paths"]["/images/{name}"]["get"]["responses"])
    assert "Retry-After" in generate["429"]["headers"] and "Retry-After" in generate["503"]["headers"]


def test_request_schemas_carry_the_validators_limits(api: Served, document: dict[str, Any]) -> None:
    listing = httpx.get(f"{api.base_url}/v1/images/models", trust_env=False, timeout=120).json()
    models = {model["id"]: model for model in listing["models"]}
    for path in ("/v1/images/generate", "/v1/images/estimate"):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        variants = {variant["title"]: variant for variant in schema["oneOf"]}
        assert set(variants) == set(models)
        for model_id, variant in variants.items():
            model, properties = models[model_id], variant["properties"]
            assert variant["additionalProperties"] is False
            assert ("prompt" in variant["required"]) == (path == "/v1/images/generate")
            assert properties["prompt"]["minLength"] == 2 and properties["prompt"]["maxLength"] == 3000
            for side in ("width", "height"):
                assert (properties[side]["minimum"], properties[side]["maximum"], properties[side]["multipleOf"]) == (
                    MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE)
            assert properties["numberResults"]["maximum"] == MAX_RESULTS
            if model["supportsSteps"]:
                assert (properties["steps"]["minimum"], properties["steps"]["maximum"]) == (
                    model["minSteps"], model["maxSteps"])
            else:
                assert properties["steps"]["type"] == "null"
            assert (properties["guidance"]["type"] == "null") != model["supportsGuidance"]
            assert (properties["negativePrompt"]["type"] == "null") != model["supportsNegativePrompt"]
            model_rule = properties["model"]
            assert model_rule.get("const") == model_id or model_rule.get("enum") == [model_id, None]


def test_405_answers_carry_allow(api: Served, document: dict[str, Any]) -> None:
    with httpx.Client(base_url=api.base_url, trust_env=False, timeout=120) as http:
        for path, item in document["paths"].items():
            documented = {method.upper() for method in item if method in HTTP_METHODS}
            concrete = path.replace("{name}", "some-image.png")
            for method in {m.upper() for m in HTTP_METHODS} - documented:
                response = http.request(method, concrete)
                assert response.status_code == 405, (method, path)
                assert response.json()["error"] == "METHOD_NOT_ALLOWED"
                assert set(response.headers["allow"].replace(" ", "").split(",")) == documented


def test_schemathesis_finds_no_failure(api: Served, tmp_path: Path) -> None:
    # One real image, so the image route is fuzzed with names that exist as well as names that do not.
    amount = int(httpx.post(f"{api.base_url}/v1/images/estimate", json={"width": 128, "height": 128},
                            timeout=120, trust_env=False).json()["estimatedCost"]["amount"])
    terms = Terms(amount=amount)
    paid = httpx.post(f"{api.base_url}/v1/images/generate", trust_env=False, timeout=120,
                      json={"prompt": "a red circle", "width": 128, "height": 128},
                      headers=v1_header(terms, sign(terms)))
    assert paid.status_code == 200, paid.text
    image = paid.json()["images"][0]
    name = image["url"].rsplit("/", 1)[1]
    etag = httpx.get(image["url"], trust_env=False, timeout=120).headers["etag"]

    config = tmp_path / "schemathesis.toml"
    config.write_text(toml({
        # A valid request for a paid route is answered 402 (pay first): that is acceptance.
        "checks": {"positive_data_acceptance": {"expected-statuses": [
            "2xx", "3xx", "401", "402", "403", "404", "409", "429", "5xx"]}},
        "dictionaries": {"images": {"values": [name, image["uuid"]]}, "etags": {"values": [etag]}},
        "parameters": {"path.name": {"dictionary": "images", "probability": 0.5},
                       "header.If-None-Match": {"dictionary": "etags", "probability": 0.5}},
    }))
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{api.base_url}/openapi.json", "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--workers", "2",
         "--seed", "13", "--request-timeout", "60", "--report", "json", "--report-json-path", str(report),
         # Event streams stay open until their job or request ends (tests/jobs reads them as a client does):
         # a fuzzer reading each to its end would measure the stream's lifetime, not its contract. Their
         # documentation is held to the same rules as every route by the tests above.
         "--exclude-path-regex", "/events$"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # its cache goes there, not in the repo
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    cases = json.loads(report.read_text())["test_cases"]
    assert (cases["with_failures"], cases["errored"]) == (0, 0), output[-8000:]
    assert cases["generated"] >= MIN_CASES, output[-3000:]
