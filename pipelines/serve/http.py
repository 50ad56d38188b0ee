"""The HTTP contract of the Serve app: request options, request-body reading under a byte limit, the error
table (every bad input gets a 4xx JSON {"error", "detail"}) and the response models shown in OpenAPI."""

from __future__ import annotations

from dataclasses import dataclass
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
    """What one request may send. max_bytes bounds the whole request body (multipart framing included),
    checked from Content-Length and while reading, before anything is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000  # decoded width x height, checked from the header before decoding
    min_side: int = 8

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "min_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


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
    response: Literal["auto", "image", "json"] = Field(
        "auto", description="'image': the image bytes (num_samples=1 only); 'json': base64 images; 'auto': "
        "JSON when num_samples > 1 or when Accept asks for application/json and not for an image, else image")


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


def wants_json(options: ColorizeOptions, accept: str) -> bool:
    if options.response == "image":
        if options.num_samples > 1:
            raise ApiError(422, "invalid_options", f"response=image returns one image but num_samples="
                           f"{options.num_samples}; use num_samples=1 or response=json")
        return False
    if options.response == "json" or options.num_samples > 1:
        return True
    accept = accept.lower()
    return "application/json" in accept and "image/" not in accept


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


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


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
        return error_response(err.status, err.error, err.detail)

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
    (413, "request body above limits.max_bytes, or more pixels than limits.max_pixels (decompression bombs)"),
    (415, "not an image, or an unsupported format (PDF, SVG, PSD, HEIC, ...)"),
    (422, "invalid options, or an image smaller than limits.min_side"),
)}
REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
}}}
