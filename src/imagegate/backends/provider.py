"""What every hosted-provider backend shares: settings and API keys, HTTP with bounded retries,
the mapping of provider failures to our errors, request checks, and fetching the provider's images.

Failure policy (the client is never charged: payment settles only after images are stored):

* the provider rejects our input (400/413/422)       -> ``InvalidParameter`` with the provider's message;
* auth, quota or balance (401/402/403, or as a provider says) -> ``UpstreamUnavailable`` + a warning log;
* timeouts, connection errors, 408/425/429/5xx       -> retried with exponential backoff (honouring
  Retry-After), then ``UpstreamUnavailable`` with ``retry_after``;
* anything else (404 unknown model, ...)             -> ``UpstreamUnavailable`` + a warning log;
* output we cannot use (bad JSON, wrong count, an image that does not decode or has the wrong size)
                                                     -> ``GenerationFailed`` + an error log;
* an image the provider's safety checker flagged     -> ``GenerationFailed`` (``safety_flagged``) + a warning.

API keys live in environment variables or files, are read per request (so rotating one needs no
restart), and are redacted from every message we log or return.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import functools
import io
import json
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagegate.backends.base import Availability, Backend
from imagegate.catalog import ModelSpec
from imagegate.config import Settings
from imagegate.errors import GenerationFailed, ImagegateError, InvalidParameter, ModelUnavailable, UpstreamUnavailable
from imagegate.types import ImageRequest

log = logging.getLogger("imagegate.providers")

Sleep = Callable[[float], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MAX_MESSAGE_CHARS = 500


# --- settings and keys -------------------------------------------------------------------------


class ProviderSettings(BaseModel):
    """One ``[providers.<name>]`` table; each provider subclasses it with its own defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    # The key is read from this file when set (relative to the config file's folder), else from the
    # environment variable; the catalog and config file never hold keys.
    api_key_env: str
    api_key_file: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    # Retries after the first attempt, for timeouts, connection errors, 429 and 5xx.
    max_retries: int = Field(default=3, ge=0, le=10)
    # Delay before the first retry; doubles per retry up to backoff_max_s (Retry-After wins if longer).
    backoff_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    # A Retry-After longer than this is not waited out: the client gets it instead.
    max_retry_after_s: float = Field(default=30.0, ge=0)
    # Retry-After we send our client when the provider named none.
    retry_after_s: int = Field(default=10, ge=1)
    max_image_bytes: int = Field(default=64 * 1024 * 1024, gt=0)


class PollingSettings(ProviderSettings):
    """For providers whose generations are jobs we poll."""

    poll_interval_s: float = Field(default=0.5, gt=0)
    # Polling stops after max_wait_s / poll_interval_s status checks.
    max_wait_s: float = Field(default=300.0, gt=0)

    @property
    def max_polls(self) -> int:
        return max(1, math.ceil(self.max_wait_s / self.poll_interval_s))


def gave_up_waiting(provider: str, settings: PollingSettings) -> UpstreamUnavailable:
    log.warning("%s: no result after %gs of polling", provider, settings.max_wait_s)
    return UpstreamUnavailable(
        "the upstream image provider did not finish in time; try again later", retry_after=settings.retry_after_s
    )


S = TypeVar("S", bound=ProviderSettings)


class ProviderConfigError(ValueError):
    pass


def load_provider_settings(settings: Settings, name: str, model: type[S]) -> S:
    table = dict(settings.providers.get(name, {}))
    try:
        parsed = model.model_validate(table)
    except ValidationError as exc:
        raise ProviderConfigError(f"[providers.{name}] is invalid: {exc}") from exc
    key_file = parsed.api_key_file
    if key_file is not None and not key_file.expanduser().is_absolute():
        base = settings.config_file.parent if settings.config_file else Path.cwd()
        parsed = parsed.model_copy(update={"api_key_file": base / key_file.expanduser()})
    return parsed


class ApiKey:
    """A secret that prints as ``<redacted>``; ``reveal()`` only where it goes on the wire."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "<redacted>")

    def __repr__(self) -> str:
        return "ApiKey(<redacted>)"

    __str__ = __repr__


def lookup_api_key(provider: str, settings: ProviderSettings) -> ApiKey | str:
    """The key, or why there is none (naming the variable or file, never a key)."""
    if settings.api_key_file is not None:
        path = settings.api_key_file.expanduser()
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError:
            return f"no {provider} API key: [providers.{provider}] api_key_file {path} cannot be read"
        return ApiKey(value) if value else f"no {provider} API key: the file {path} is empty"
    value = os.environ.get(settings.api_key_env, "").strip()
    if value:
        return ApiKey(value)
    return (
        f"no {provider} API key: set the environment variable {settings.api_key_env} "
        f"(or [providers.{provider}] api_key_file)"
    )


# --- failures ----------------------------------------------------------------------------------


class Fault(enum.Enum):
    INPUT = "input"
    ACCOUNT = "account"
    TRANSIENT = "transient"
    OTHER = "other"


def _transient(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


def fault_for_status(status: int, body: object) -> Fault:
    """The usual meaning of a failed API status; providers override it where they say otherwise."""
    if status in (400, 413, 422):
        return Fault.INPUT
    if status in (401, 402, 403):
        return Fault.ACCOUNT
    return Fault.TRANSIENT if _transient(status) else Fault.OTHER


def _download_fault(status: int, body: object) -> Fault:
    # A CDN's 403/404 (an expired signed URL) says nothing about the client's input or our account.
    return Fault.TRANSIENT if _transient(status) else Fault.OTHER


MessageOf = Callable[[object], str | None]
FaultOf = Callable[[int, object], Fault]


def retry_after_seconds(value: str | None) -> int | None:
    """Retry-After as whole seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, math.ceil((when - datetime.now(UTC)).total_seconds()))


def usd_to_micros(usd: Decimal) -> int:
    """Decimal USD -> integer micro-USD, rounded up so the operator's cost is never understated."""
    return int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    content: bytes


class _TooLarge(Exception):
    pass


class ProviderHttp:
    """HTTP to one provider: the key on API calls only, retries, and failures mapped to our errors."""

    def __init__(
        self,
        provider: str,
        settings: ProviderSettings,
        *,
        auth_scheme: str = "Bearer",
        message_of: MessageOf,
        fault_of: FaultOf = fault_for_status,
        trusted_urls: Sequence[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self._auth_scheme = auth_scheme
        self._message_of = message_of
        self._fault_of = fault_of
        # The key is only ever sent to these origins, whatever URL a provider reply names.
        self._origins = {_origin(url) for url in (settings.base_url, *trusted_urls)}
        self._transport = transport
        # Injectable so tests can record waits instead of sleeping; also paces job polling.
        self.sleep = sleep
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use, inside the event loop that will use it.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.timeout_s), transport=self._transport, verify=_tls()
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(
        self,
        method: str,
        url: str,
        key: ApiKey,
        *,
        json_body: object = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One API call, retried while transient; the decoded JSON reply (numbers with a point as
        ``Decimal``, so money never passes through float)."""
        if _origin(url) not in self._origins:
            log.error("%s: refusing to send the API key to %s", self.provider, _origin(url))
            raise GenerationFailed("the upstream provider replied with an unexpected address")
        all_headers = {"Authorization": f"{self._auth_scheme} {key.reveal()}", **(headers or {})}
        reply = await self._with_retries(method, url, key, self._fault_of, headers=all_headers, json_body=json_body)
        try:
            return json.loads(reply.content, parse_float=Decimal)
        except ValueError:
            raise self.unusable("a reply that is not JSON", key) from None

    async def best_effort(self, method: str, url: str, key: ApiKey) -> None:
        """A call whose failure changes nothing for the client, like cancelling an abandoned job."""
        with contextlib.suppress(ImagegateError):
            await self.call(method, url, key)

    async def _with_retries(
        self,
        method: str,
        url: str,
        key: ApiKey,
        fault_of: FaultOf,
        *,
        headers: dict[str, str],
        json_body: object,
        redirects: bool = False,
    ) -> _Reply:
        s = self.settings
        attempt = 0
        while True:
            retry_after: int | None = None
            try:
                reply = await self._exchange(method, url, headers, json_body, redirects)
            except httpx.TimeoutException:
                problem = f"timed out after {s.timeout_s:g}s"
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__})"
            except _TooLarge:
                raise self.unusable(f"a reply larger than {s.max_image_bytes} bytes", key) from None
            else:
                if 200 <= reply.status < 300:
                    return reply
                body = _error_body(reply.content)
                fault = fault_of(reply.status, body)
                # Redact before shortening, so a cut cannot leave part of the key behind.
                message = _short(key.redact(self._message_of(body) or f"HTTP {reply.status}"))
                if fault is not Fault.TRANSIENT:
                    raise self._failure(fault, reply.status, message, method, url)
                problem = f"HTTP {reply.status}: {message}"
                retry_after = retry_after_seconds(reply.headers.get("retry-after"))
            too_long = retry_after is not None and retry_after > s.max_retry_after_s
            if attempt >= s.max_retries or too_long:
                log.warning(
                    "%s: %s %s failed after %d attempt(s): %s",
                    self.provider,
                    method,
                    _path(url),
                    attempt + 1,
                    problem,
                )
                raise UpstreamUnavailable(
                    "the upstream image provider is busy or unreachable; try again later",
                    retry_after=retry_after if retry_after is not None else s.retry_after_s,
                )
            delay = min(s.backoff_s * 2**attempt, s.backoff_max_s)
            await self.sleep(max(delay, float(retry_after or 0)))
            attempt += 1

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], json_body: object, redirects: bool
    ) -> _Reply:
        request = self._http().build_request(method, url, headers=headers, json=json_body)
        response = await self._http().send(request, stream=True, follow_redirects=redirects)
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.settings.max_image_bytes:
                    raise _TooLarge
                chunks.append(chunk)
        finally:
            await response.aclose()
        return _Reply(response.status_code, response.headers, b"".join(chunks))

    def _failure(self, fault: Fault, status: int, message: str, method: str, url: str) -> ImagegateError:
        if fault is Fault.INPUT:
            return InvalidParameter(
                f"the upstream image provider rejected the request: {message}",
                details={"upstreamStatus": status},
            )
        what = "rejected our credentials, quota or balance" if fault is Fault.ACCOUNT else "failed"
        # The operator has to act (top up, fix the key or the catalog's source): say so where they look.
        log.warning("%s: %s %s %s (HTTP %d): %s", self.provider, method, _path(url), what, status, message)
        return UpstreamUnavailable(
            "the upstream image provider is unavailable; the operator has been notified",
            retry_after=self.settings.retry_after_s,
        )

    def unusable(self, what: str, key: ApiKey) -> GenerationFailed:
        log.error("%s: the provider returned %s", self.provider, key.redact(what))
        return GenerationFailed("the upstream image provider returned an unusable result")

    def parse(self, model: type[M], body: object, key: ApiKey) -> M:
        """A provider reply checked against the shape we rely on."""
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise self.unusable(f"a reply of unexpected shape ({exc.error_count()} problems)", key) from None

    async def image(self, ref: str, width: int, height: int, key: ApiKey) -> Image.Image:
        """A provider image from a URL, a data URI or bare base64, checked to decode at width x height."""
        if ref.startswith("data:"):
            data = self._b64(ref.partition(",")[2], key)
        elif ref.startswith(("http://", "https://")):
            # Fetched without our key (CDNs need none), following redirects.
            reply = await self._with_retries(
                "GET", ref, key, _download_fault, headers={}, json_body=None, redirects=True
            )
            data = reply.content
        else:
            data = self._b64(ref, key)
        return self.check_image(data, width, height, key)

    def _b64(self, text: str, key: ApiKey) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise self.unusable("image data that is not base64", key) from None

    def check_image(self, data: bytes, width: int, height: int, key: ApiKey) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            # The header is enough to reject a wrong size before decoding any pixels.
            if image.size != (width, height):
                got_w, got_h = image.size
                raise self.unusable(f"a {got_w}x{got_h} image where {width}x{height} was requested", key)
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise self.unusable("bytes that are not a readable image", key) from None
        return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle takes ~0.1 s: do it once per process, for every provider's client.
    return httpx.create_ssl_context()


def _error_body(content: bytes) -> object:
    try:
        return json.loads(content, parse_float=Decimal)
    except ValueError:
        return content.decode("utf-8", errors="replace")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _path(url: str) -> str:
    # Logs name the endpoint, never a query string (where a signed URL would carry its token).
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


async def gather_all(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; the first failure propagates and cancels the rest, which are waited for so
    their clean-up (cancelling a provider job nobody will collect) runs before the failure is raised."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


SAFETY_MESSAGE = (
    "the upstream image provider's safety checker flagged a generated image, so none are returned "
    "and nothing is charged; another seed or prompt may pass"
)


def safety_flagged(provider: str, seeds: Sequence[int | None]) -> GenerationFailed:
    """A generated image the provider's safety checker flagged: never returned, never charged.

    Every provider that documents its checker (fal ``has_nsfw_concepts``, Runware ``NSFWContent``,
    Replicate's FLUX models) describes it as a verdict on the generated image, not on the request:
    the same prompt may pass with another seed. So it is a failed generation (500, the payment is
    released), not a client error.
    """
    log.warning("%s: the provider's safety checker flagged the image(s) of seed(s) %s", provider, list(seeds))
    return GenerationFailed(SAFETY_MESSAGE, details={"reason": "provider_safety_checker"})


# --- request checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one provider model accepts; ``None`` means the provider has no such field."""

    max_images: int
    steps: tuple[int, int] | None
    guidance: tuple[float, float] | None
    negative_prompt_chars: tuple[int, int] | None
    seed: tuple[int, int] | None
    max_prompt_chars: int | None = None


def check_limits(where: str, spec: ModelSpec, request: ImageRequest, limits: Limits) -> None:
    """Reject (INVALID_PARAMETER) what ``where`` (e.g. "runware model runware:100@1") cannot honour."""
    if request.number_results > limits.max_images:
        raise InvalidParameter(
            f"{where} returns at most {limits.max_images} image(s) per request", field="numberResults"
        )
    prompt = request.prompt or ""
    if limits.max_prompt_chars is not None and len(prompt) > limits.max_prompt_chars:
        raise InvalidParameter(f"{where} takes prompts of at most {limits.max_prompt_chars} characters", field="prompt")
    if limits.steps is None:
        if request.steps_sent:
            raise InvalidParameter(f"{where} has no step count; leave steps out", field="steps")
    elif not limits.steps[0] <= request.steps <= limits.steps[1]:
        low, high = limits.steps
        raise InvalidParameter(f"{where} takes {low}-{high} steps, not {request.steps}", field="steps")
    if request.guidance is not None:
        if limits.guidance is None:
            raise InvalidParameter(f"{where} does not apply guidance; leave guidance out", field="guidance")
        if spec.guidance.mode not in ("cfg", "embedded"):
            # true_cfg needs a second, negative pass per step, which no provider API offers.
            raise InvalidParameter(
                f"guidance has no effect on {spec.id} served by {where}; leave it out", field="guidance"
            )
        low_g, high_g = limits.guidance
        if not low_g <= request.guidance <= high_g:
            raise InvalidParameter(f"{where} takes guidance {low_g:g}-{high_g:g}", field="guidance")
    if request.negative_prompt:
        if limits.negative_prompt_chars is None or spec.negative_prompt != "cfg":
            raise InvalidParameter(
                f"{where} does not apply a negative prompt to {spec.id}; leave negativePrompt out",
                field="negativePrompt",
            )
        low_n, high_n = limits.negative_prompt_chars
        if not low_n <= len(request.negative_prompt) <= high_n:
            raise InvalidParameter(
                f"{where} takes a negativePrompt of {low_n}-{high_n} characters", field="negativePrompt"
            )
    if request.seed is not None:
        if limits.seed is None:
            raise InvalidParameter(f"{where} cannot be seeded; leave seed out", field="seed")
        if not limits.seed[0] <= request.seed <= limits.seed[1]:
            raise InvalidParameter(f"{where} takes seeds {limits.seed[0]}-{limits.seed[1]}", field="seed")


def negative_prompt(text: str | None) -> str | None:
    """An empty negative prompt is no negative prompt."""
    return text or None


# --- the backend base --------------------------------------------------------------------------


class ProviderOptions(BaseModel):
    """A catalog entry's ``options`` table for one provider; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def of(cls, spec: ModelSpec) -> Self:
        try:
            return cls.model_validate(spec.options)
        except ValidationError as exc:
            raise ModelUnavailable(
                f"catalog entry {spec.id!r} has invalid options for backend {spec.backend!r}: "
                f"{exc.error_count()} problem(s), e.g. {exc.errors()[0]['msg']}"
            ) from exc


class ProviderBackend(Backend):
    """A Backend that calls a hosted API; subclasses map fields and parse replies."""

    options_model: ClassVar[type[ProviderOptions]]

    def __init__(self, settings: ProviderSettings, http: ProviderHttp) -> None:
        self.settings = settings
        self.http = http

    def api_key(self) -> ApiKey:
        found = lookup_api_key(self.name, self.settings)
        if isinstance(found, str):
            raise ModelUnavailable(found)
        return found

    def configured(self, spec: ModelSpec) -> object:
        """The model's parsed options; raises ``ModelUnavailable`` when the catalog entry is unusable."""
        return self.options_model.of(spec)

    async def availability(self, spec: ModelSpec) -> Availability:
        try:
            self.configured(spec)
        except ModelUnavailable as exc:
            return Availability(False, exc.message)
        found = lookup_api_key(self.name, self.settings)
        return Availability(False, found) if isinstance(found, str) else Availability(True)

    async def aclose(self) -> None:
        await self.http.aclose()
