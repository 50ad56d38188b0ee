"""The Serve app's ingress: FastAPI routes (POST /colorize, GET /healthz, the web page at /, OpenAPI at /docs)
that decode and prepare the image (step 1), chain the stage deployments' handles (steps 2-4) and restore and
encode the result (step 5).
No `from __future__ import annotations` here: FastAPI must see real types on the Serve-wrapped methods."""

import asyncio
import io
import secrets
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError

from coltran import __version__
from coltran.imageio import ImageDecodeError, decode_image, encode_image
from coltran.inputs import PreparedImage, prepare_image
from coltran.pipeline import ColTranPipeline
from coltran.transforms import rgb_to_gray
from pipelines.serve.answers import json_chunks, multipart_chunks, primed
from pipelines.serve.deployments import DRAIN_CHECK_S
from pipelines.serve.http import (
    ERROR_RESPONSES,
    REQUEST_BODY_DOC,
    ApiError,
    Auth,
    ColorizeOptions,
    ColorizeResult,
    Limits,
    answer_kind,
    auth_required,
    decode_error,
    image_bytes,
    install_error_handlers,
    require_token,
    set_expected_token,
)

WEB_PAGE = Path(__file__).with_name("web") / "index.html"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}

app = FastAPI(title="ColTran colorization service", version=__version__, description=(
    "Colorizes grayscale (or colour, converted to gray first) photos with ColTran's three stages "
    "(colorizer -> colour upsampler -> spatial upsampler), each a Ray Serve deployment.\n\n"
    "POST /colorize: the image as the raw request body (any Content-Type) or as a multipart/form-data file "
    "field `file`; options as query parameters. One sample answers with the image itself, several with JSON "
    "(see `response`). Errors answer JSON {\"error\", \"detail\"}. Default limits: 20 MiB request body, "
    "25 Mpx, 8 px minimum side (GET /healthz shows this deployment's)."))
install_error_handlers(app)


# Shown in OpenAPI (Swagger's Authorize button); the check itself is require_token's.
BEARER = Depends(HTTPBearer(auto_error=False, description="the service's API token (coltran serve prints it)"))
PROTECTED = [BEARER, Depends(require_token)]


# Serve pickles the deployment class when it is decorated: module globals its methods use must exist by then.


class Slot:
    """One of the replica's max_in_flight places, held from admission until the answer is sent or fails."""

    def __init__(self, ingress):
        self.ingress, self.held = ingress, True
        ingress.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.ingress.in_flight -= 1


def output_pixels(data: bytes, options: ColorizeOptions) -> tuple[int, int] | None:
    """(pixels per output image, pixels of the decoded input) from the header, before decoding; None when the
    header cannot be read (decode_image then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.width * im.height
    except Exception:
        return None
    return (256 * 256 if options.resolution == "256" else pixels), pixels


@serve.deployment(name="Ingress", max_ongoing_requests=64, max_queued_requests=256,
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, colorizer, color_upsampler, spatial_upsampler, limits: dict | None = None,
                 auth: dict | None = None):
        self.colorizer, self.color_upsampler, self.spatial_upsampler = colorizer, color_upsampler, spatial_upsampler
        self.limits = Limits(**(limits or {}))
        set_expected_token(Auth(**(auth or {})).token())  # raises (the replica fails to start) when none is set
        self.page = WEB_PAGE.read_text()
        self.model_info: dict | None = None
        self.in_flight = 0
        self.counts = {"served": 0, "overloaded": 0, "timed_out": 0}

    async def _models(self, refresh: bool = False) -> dict:
        """What each stage's replica loaded (asked once; again on every health check)."""
        if self.model_info is None or refresh:
            infos = await asyncio.gather(self.colorizer.info.remote(), self.color_upsampler.info.remote(),
                                         self.spatial_upsampler.info.remote())
            self.model_info = {k: v for info in infos for k, v in info.items()}
        return self.model_info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Ready when every stage deployment answers with the model it loaded; 503 otherwise. No token needed."""
        try:
            models = await asyncio.wait_for(self._models(refresh=True), timeout=30)
        except Exception as err:
            raise ApiError(503, "unavailable", f"a stage deployment did not answer: {type(err).__name__}: "
                           f"{err}") from None
        return {"status": "ok", "version": __version__, "models": models,
                "untrained": any(m.get("untrained") for m in models.values()),
                "auth": auth_required(), "limits": vars(self.limits)}

    @app.get("/stats", dependencies=PROTECTED, responses={401: ERROR_RESPONSES[401]})
    async def stats(self) -> dict:
        """This ingress replica's load (in flight, served, refused, timed out) and each stage replica's record
        (batch sizes and seconds, cancelled calls)."""
        stages = await asyncio.gather(self.colorizer.stats.remote(), self.color_upsampler.stats.remote(),
                                      self.spatial_upsampler.stats.remote())
        return {"in_flight": self.in_flight, "max_in_flight": self.limits.max_in_flight, **self.counts,
                **dict(zip(("colorizer", "color_upsampler", "spatial_upsampler"), stages, strict=True))}

    @app.post("/colorize", openapi_extra=REQUEST_BODY_DOC, response_model=None,
              dependencies=PROTECTED, responses={
        200: {"description": "the colouring (image/png or image/jpeg), JSON, or multipart/mixed for several samples",
              "content": {"image/png": {}, "image/jpeg": {}, "multipart/mixed": {}, "application/json": {
                  "schema": ColorizeResult.model_json_schema()}}}, **ERROR_RESPONSES})
    async def colorize(self, request: Request, options: Annotated[ColorizeOptions, Query()]) -> Response:
        kind = answer_kind(options, request.headers.get("accept", ""))
        if self.in_flight >= self.limits.max_in_flight:
            self.counts["overloaded"] += 1
            raise self._overloaded(f"{self.in_flight} requests are in progress in this replica "
                                   f"(limits.max_in_flight = {self.limits.max_in_flight})")
        slot = Slot(self)
        budget = min(self.limits.timeout_s, options.timeout_s or self.limits.timeout_s)
        try:
            async with asyncio.timeout(budget):
                response = await self._answer(request, options, kind, slot)
        except TimeoutError:
            slot.release()
            self.counts["timed_out"] += 1
            raise ApiError(504, "timeout", f"the request took longer than its time budget of {budget:g} s "
                           f"(limits.timeout_s = {self.limits.timeout_s:g}); its work was cancelled") from None
        except BaseException:
            slot.release()
            raise
        self.counts["served"] += 1
        return response

    def _overloaded(self, why: str) -> ApiError:
        retry = str(self.limits.retry_after_s)
        return ApiError(429, "overloaded", f"the service is at capacity: {why}; retry after {retry} s",
                        {"Retry-After": retry})

    async def _answer(self, request: Request, options: ColorizeOptions, kind: str, slot: Slot) -> Response:
        start = time.perf_counter()
        data = await image_bytes(request, self.limits.max_bytes)
        prepared = await asyncio.to_thread(self._prepare, data, options)
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
        rgb_256 = await self._run_stages(prepared, seed, options)
        untrained = any(m.get("untrained") for m in (await self._models()).values())
        media_type = MEDIA_TYPES[options.format]
        if kind == "image":
            data = await asyncio.to_thread(self._image, prepared, rgb_256[0], options)
            slot.release()
            return Response(data, media_type=media_type, headers={
                "X-ColTran-Seed": str(seed), "X-ColTran-Untrained": str(untrained).lower(),
                "Content-Disposition": f'inline; filename="colorized_{seed}.{options.format}"'})
        gray = prepared.gray_256 if options.resolution == "256" else rgb_to_gray(prepared.luma_source)
        gray_job = lambda: encode_image(gray, options.format)  # noqa: E731
        jobs = [lambda rgb=rgb: self._image(prepared, rgb, options) for rgb in rgb_256]
        headers = {"X-ColTran-Seed": str(seed), "X-ColTran-Untrained": str(untrained).lower()}
        if kind == "json":
            meta = {"seed": seed, "num_samples": options.num_samples, "width": gray.shape[1],
                    "height": gray.shape[0], "resolution": options.resolution, "media_type": media_type,
                    "untrained": untrained}
            chunks = await primed(json_chunks(meta, gray_job, jobs, start), slot.release)
            return StreamingResponse(chunks, media_type="application/json", headers=headers)
        boundary = secrets.token_hex(16)
        chunks = await primed(multipart_chunks(boundary, media_type, options.format, gray_job, jobs), slot.release)
        return StreamingResponse(chunks, media_type=f"multipart/mixed; boundary={boundary}", headers={
            **headers, "X-ColTran-Width": str(gray.shape[1]), "X-ColTran-Height": str(gray.shape[0])})

    async def _run_stages(self, prepared: PreparedImage, seed: int, options: ColorizeOptions) -> np.ndarray:
        """Steps 2-4 through the stage deployments; all three calls are cancelled if this request is (time budget,
        client gone); a stage whose queue is full refuses at once (429)."""
        colors = self.colorizer.colorize.remote(prepared.gray_64, seed, options.num_samples,
                                                options.temperature, options.mode)
        rgb_64 = self.color_upsampler.upsample.remote(prepared.gray_64, colors)  # resolved by Serve, not here
        rgb_256 = self.spatial_upsampler.upsample.remote(prepared.gray_256, rgb_64)
        try:
            return await rgb_256
        except BackPressureError as err:
            self.counts["overloaded"] += 1
            raise self._overloaded(f"a stage's queue is full ({err})") from None
        except BaseException:
            for call in (colors, rgb_64, rgb_256):
                call.cancel()
            raise

    def _prepare(self, data: bytes, options: ColorizeOptions) -> PreparedImage:
        """Step 1, after decoding under the limits (pixel count and output budget checked from the header)."""
        sizes = output_pixels(data, options)
        if sizes is not None and sizes[1] <= self.limits.max_pixels:
            asked = sizes[0] * options.num_samples
            if asked > self.limits.max_output_pixels:
                raise ApiError(413, "output_too_large", f"the answer would hold {options.num_samples} x "
                               f"{sizes[0]:,} = {asked:,} pixels; limits.max_output_pixels is "
                               f"{self.limits.max_output_pixels:,}: ask fewer samples or resolution=256")
        try:
            decoded = decode_image(data, max_pixels=self.limits.max_pixels, min_side=self.limits.min_side)
        except ImageDecodeError as err:
            raise decode_error(err) from None
        return prepare_image(decoded.rgb, crop=options.crop)

    @staticmethod
    def _restore(prepared: PreparedImage, rgb_256: np.ndarray, resolution: str) -> np.ndarray:
        """Step 5 at resolution 'full' (the input's own luma and size); the 256x256 output itself otherwise."""
        return rgb_256 if resolution == "256" else ColTranPipeline.restore(prepared, rgb_256)

    def _image(self, prepared: PreparedImage, rgb_256: np.ndarray, options: ColorizeOptions) -> bytes:
        return encode_image(self._restore(prepared, rgb_256, options.resolution), options.format)
