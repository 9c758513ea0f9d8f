"""The OpenAPI document, made to match what the server does.

FastAPI writes the document from the routes and their ``responses=``; ``complete`` then applies the
rules that hold for every route, so routes added later follow them without special cases:

- no 422 anywhere (validation failures are 400 ``INVALID_PARAMETER``, in the one error format): an
  operation whose body or parameters can be refused documents 400 instead;
- rate-limited routes (``limits.LIMITED_ROUTES``) document 429 ``RATE_LIMITED`` with ``Retry-After``;
- every answer documents ``X-Request-ID``;
- the image request bodies carry the served catalog's rules (``schemas.request_body_schema``).

``tests/ops/test_openapi.py`` checks the rules on the live document and runs schemathesis against it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from imagegate import openai_compat, schemas
from imagegate.catalog import Catalog
from imagegate.limits import LimitedRoute

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
PAYMENT_REQUIRED_REF = {"$ref": "#/components/schemas/PaymentRequiredBody"}
OPENAI_ERROR_REF = {"$ref": "#/components/schemas/OpenAIErrorBody"}
REQUEST_ID_REF = {"$ref": "#/components/headers/RequestId"}
RETRY_AFTER_REF = {"$ref": "#/components/headers/RetryAfter"}
MAYBE_RETRY_AFTER_REF = {"$ref": "#/components/headers/MaybeRetryAfter"}
HEADERS = {
    "RequestId": {"description": "The request's id: the client's X-Request-ID when it sent a usable one, else a new "
                                 "one. Log lines of the request carry it.", "schema": {"type": "string"}},
    "RetryAfter": {"description": "Seconds to wait before retrying.", "required": True,
                   "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "MaybeRetryAfter": {"description": "Seconds to wait before retrying, when the server can tell.",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"}},
}
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Routes whose JSON body is an image request (``require_prompt``: the prompt is mandatory).
IMAGE_REQUEST_BODIES = {("post", "/v1/images/generate"): True, ("post", "/v1/images/estimate"): False}
# Routes that answer errors in OpenAI's format rather than the one error format.
OPENAI_SHAPED = frozenset({("post", openai_compat.PATH)})


def error_response(description: str, *, headers: dict[str, Any] | None = None,
                   openai: bool = False) -> dict[str, Any]:
    """A documented error answer in the one error format (``openai``: in OpenAI's)."""
    schema = OPENAI_ERROR_REF if openai else ERROR_REF
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _can_be_invalid(operation: dict[str, Any]) -> bool:
    """A body, or a parameter that is more than any string (a number, a pattern, a length), can be refused."""
    if operation.get("requestBody"):
        return True
    for parameter in operation.get("parameters", []):
        rules = {key: rule for key, rule in parameter.get("schema", {}).items() if key not in ("title", "description")}
        if rules != {"type": "string"} or (parameter.get("required") and parameter["in"] != "path"):
            return True
    return False


def complete(document: dict[str, Any], *, catalog: Catalog, limited: Iterable[LimitedRoute]) -> dict[str, Any]:
    document = copy.deepcopy(document)
    limited_operations = {(route.method.lower(), route.template) for route in limited}
    for path, item in document.get("paths", {}).items():
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            responses.pop("422", None)
            openai = (method, path) in OPENAI_SHAPED
            if _can_be_invalid(operation):
                responses.setdefault("400", error_response("INVALID_PARAMETER (and the other 400 codes)",
                                                           openai=openai))
            if (method, path) in limited_operations:
                responses["429"] = error_response("RATE_LIMITED: too many requests of this kind from the client",
                                                  headers={"Retry-After": RETRY_AFTER_REF}, openai=openai)
            for response in responses.values():
                response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_REF
            if openai:
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": openai_compat.request_body_schema(catalog)}}}
            require_prompt = IMAGE_REQUEST_BODIES.get((method, path))
            if require_prompt is not None:
                operation["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": schemas.request_body_schema(catalog, require_prompt=require_prompt)}}}
    components = document.setdefault("components", {})
    component_schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        component_schemas.pop(unused, None)
    for model in (schemas.ErrorBody, schemas.PaymentRequiredBody, schemas.OpenAIErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        component_schemas.update(schema.pop("$defs", {}))  # nested models become components of their own
        component_schemas[model.__name__] = schema
    components.setdefault("headers", {}).update(HEADERS)
    return document
