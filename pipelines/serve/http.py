"""The HTTP contract of the Serve app: request options, request-body reading under a byte limit, the API token,
the error table (every bad input gets a 4xx JSON {"error", "detail"}; overload 429, time budget 504) and the
response models shown in OpenAPI."""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from coltran.imageio import ImageDecodeError

MAX_NUM_SAMPLES = 8
# ImageDecodeError.reason -> HTTP status. too_small is a valid image the service will not take: 422.
REASON_STATUS = {"empty": 400, "corrupt": 400, "truncated": 400, "not_an_image": 415, "unsupported": 415,
                 "too_large": 413, "too_small": 422}


@dataclass(frozen=True)
class Limits:
    """What one request may send and ask for, and how much one ingress replica takes on. max_bytes bounds the
    whole request body (multipart framing included), checked from Content-Length and while reading, before
    anything is decoded; max_output_pixels bounds output width x height x num_samples, checked from the image
    header before any model work; max_in_flight requests per ingress replica (reading, waiting or computing),
    beyond which a request gets 429 with Retry-After at once; timeout_s is the time budget of one request (504)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000  # decoded width x height, checked from the header before decoding
    min_side: int = 8
    max_output_pixels: int = 50_000_000  # width x height x num_samples of the answer (e.g. 2 x 25 Mpx, 8 x 6 Mpx)
    max_in_flight: int = 16
    timeout_s: float = 300.0
    retry_after_s: int = 2

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "min_side", "max_output_pixels", "max_in_flight", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"limits.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


TOKEN_ENV = "COLTRAN_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Auth:
    """The API token of the HTTP app (`args.auth`): read in the ingress replica from `token_file` if given,
    else from the environment variable `token_env` (e.g. set from a Kubernetes secret). `disabled: true` turns
    authentication off: an explicit setting, logged as a warning by every ingress replica."""

    token_file: str | None = None
    token_env: str = TOKEN_ENV
    disabled: bool = False

    def __post_init__(self):
        if not isinstance(self.disabled, bool):
            raise ValueError(f"auth.disabled must be true or false, got {self.disabled!r}")
        if self.token_file is not None and not isinstance(self.token_file, str):
            raise ValueError(f"auth.token_file must be a path, got {self.token_file!r}")
        if not isinstance(self.token_env, str) or not self.token_env:
            raise ValueError(f"auth.token_env must be an environment variable name, got {self.token_env!r}")

    def token(self) -> bytes | None:
        """The expected token (None when disabled); raises when authentication is on but no token is found."""
        if self.disabled:
            log.warning("ColTran API authentication is DISABLED (auth.disabled: true): anyone who can reach the "
                        "HTTP port can use the service")
            return None
        if self.token_file is not None:
            path = Path(self.token_file).expanduser()
            if not path.is_file():
                raise ValueError(f"auth.token_file {str(path)!r} does not exist on this node")
            value = path.read_text().strip()
        else:
            value = os.environ.get(self.token_env, "").strip()
        if len(value) < MIN_TOKEN_CHARS:
            where = f"file {self.token_file}" if self.token_file else f"${self.token_env}"
            raise ValueError(f"no API token: {where} must hold a token of at least {MIN_TOKEN_CHARS} characters "
                             f"(got {len(value)}); set one, or turn authentication off explicitly with "
                             "auth: {disabled: true}")
        return value.encode()


# The token this process's Ingress replica read. It lives here, not in ingress.py: Serve pickles the Ingress class
# by value (its methods get a copy of ingress.py's globals), while this module is imported in the replica.
_EXPECTED: dict[str, bytes | None] = {}


def set_expected_token(token: bytes | None) -> None:
    _EXPECTED["token"] = token


def auth_required() -> bool:
    return _EXPECTED.get("token", b"") is not None


async def require_token(request: Request) -> None:
    """FastAPI dependency of the protected routes: 401 before the request's options or body are looked at."""
    if "token" not in _EXPECTED:
        raise ApiError(503, "unavailable", "the ingress has not read its API token yet")
    check_token(_EXPECTED["token"], request.headers.get("authorization"))


def check_token(expected: bytes | None, authorization: str | None) -> None:
    """401 unless the Authorization header is `Bearer <the token>` (compared in constant time)."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "this service needs an API token: send the header "
                       "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), expected):
        raise ApiError(401, "unauthorized", "the API token is wrong",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def decode_error(err: ImageDecodeError) -> ApiError:
    return ApiError(REASON_STATUS[err.reason], err.reason, str(err))


class ColorizeOptions(BaseModel):
    """Query parameters of POST /colorize."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(1, ge=1, le=MAX_NUM_SAMPLES, description="colourings to draw (1..8)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="base seed; random when absent (the one used "
                             "is returned in JSON `seed` and the X-ColTran-Seed header)")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="sampling temperature, > 0")
    resolution: Literal["256", "full"] = Field("full", description="'full': the input's own size (its own "
                                               "luminance, predicted chroma); '256': the model's 256x256 output")
    format: Literal["png", "jpeg"] = Field("png", description="output image format")
    mode: Literal["sample", "argmax"] = Field("sample", description="colorizer decoding")
    crop: Literal["full", "center"] = Field("full", description="'full': the whole frame; 'center': the "
                                            "centre square (the paper's crop)")
    response: Literal["auto", "image", "json", "multipart"] = Field(
        "auto", description="'image': the image bytes (num_samples=1 only); 'json': base64 images, streamed sample "
        "by sample; 'multipart': multipart/mixed, the gray input then each sample as a binary part, streamed; "
        "'auto': JSON when num_samples > 1 or when Accept asks for application/json and not for an image, else image")
    timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="this request's time budget "
                                    "in seconds (504 when exceeded, its work cancelled); at most the server's "
                                    "limits.timeout_s, which applies when absent")


class ColorizeResult(BaseModel):
    """JSON answer of POST /colorize."""

    seed: int
    num_samples: int
    width: int
    height: int
    resolution: str
    media_type: str
    untrained: bool = Field(description="the models are untrained (coltran init-models): colours are meaningless")
    gray: str = Field(description="base64 of the gray input as the model sees it, at the output size")
    samples: list[str] = Field(description="base64 of each colouring, sample order")
    elapsed_ms: float


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable reason, e.g. truncated, not_an_image, too_large")
    detail: str = Field(description="what was wrong and what was expected")


def answer_kind(options: ColorizeOptions, accept: str) -> str:
    """'image', 'json' or 'multipart'."""
    if options.response == "image":
        if options.num_samples > 1:
            raise ApiError(422, "invalid_options", f"response=image returns one image but num_samples="
                           f"{options.num_samples}; use num_samples=1, response=json or response=multipart")
        return "image"
    if options.response in ("json", "multipart"):
        return options.response
    accept = accept.lower()
    return "json" if options.num_samples > 1 or ("application/json" in accept and "image/" not in accept) else "image"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ApiError(400, "bad_request", f"Content-Length must be a byte count, got {length!r}")
        if int(length) > max_bytes:
            raise ApiError(413, "request_too_large", f"request body is {int(length):,} bytes; the limit is "
                           f"{max_bytes:,} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, "request_too_large", f"request body exceeds the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, max_bytes: int) -> bytes:
    """The image from a raw body (any Content-Type but multipart) or from a multipart form's file field."""
    body = await read_body(request, max_bytes)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except MultiPartException as err:
        raise ApiError(400, "bad_multipart", f"multipart body cannot be parsed: {err.message}") from None
    files = [v for v in ([form.get("file")] + list(form.values())) if isinstance(v, UploadFile)]
    if not files:
        raise ApiError(400, "missing_file", f"multipart body has no file part (fields: {sorted(form.keys())}); "
                       "send the image as a file field named 'file'")
    return await files[0].read()


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(err: RequestValidationError) -> str:
    valid = ", ".join(ColorizeOptions.model_fields)
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "body"))
        text = f"{loc or 'request'}: {item.get('msg')}"
        if item.get("type") == "extra_forbidden":
            text += f" (valid options: {valid})"
        elif "input" in item:
            text += f" (got {item['input']!r})"
        parts.append(text)
    return "; ".join(parts)


def install_error_handlers(app) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError):
        return error_response(err.status, err.error, err.detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        return error_response(422, "invalid_options", _validation_detail(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, err: StarletteHTTPException):
        error = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, error, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(_request, err: Exception):
        return error_response(500, "internal", f"{type(err).__name__}: {err}")


ERROR_RESPONSES = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "empty, corrupt or truncated image; unparsable multipart; no file part"),
    (401, "no API token, or a wrong one (header 'Authorization: Bearer <token>')"),
    (413, "request body above limits.max_bytes, more pixels than limits.max_pixels (decompression bombs), or an "
          "answer above limits.max_output_pixels (width x height x num_samples)"),
    (415, "not an image, or an unsupported format (PDF, SVG, PSD, HEIC, ...)"),
    (422, "invalid options, or an image smaller than limits.min_side"),
    (429, "overloaded: limits.max_in_flight requests already in this replica, or a stage's queue is full; "
          "retry after the Retry-After header's seconds"),
    (504, "the request took longer than its time budget (limits.timeout_s, or the smaller timeout_s option); "
          "its work was cancelled"),
)}
REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
}}}
