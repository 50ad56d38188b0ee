"""The Serve app's ingress: FastAPI routes (POST /colorize, GET /healthz, the web page at /, OpenAPI at /docs)
that decode and prepare the image (step 1), chain the stage deployments' handles (steps 2-4) and restore and
encode the result (step 5).
No `from __future__ import annotations` here: FastAPI must see real types on the Serve-wrapped methods."""

import asyncio
import base64
import secrets
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve

from coltran import __version__
from coltran.imageio import ImageDecodeError, decode_image, encode_image
from coltran.inputs import PreparedImage, prepare_image
from coltran.pipeline import ColTranPipeline
from coltran.transforms import rgb_to_gray
from pipelines.serve.http import (
    ERROR_RESPONSES,
    REQUEST_BODY_DOC,
    ApiError,
    ColorizeOptions,
    ColorizeResult,
    Limits,
    decode_error,
    image_bytes,
    install_error_handlers,
    wants_json,
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


# Serve pickles the deployment class when it is decorated: module globals its methods use must exist by then.
def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, colorizer, color_upsampler, spatial_upsampler, limits: dict | None = None):
        self.colorizer, self.color_upsampler, self.spatial_upsampler = colorizer, color_upsampler, spatial_upsampler
        self.limits = Limits(**(limits or {}))
        self.page = WEB_PAGE.read_text()
        self.model_info: dict | None = None

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
        """Ready when every stage deployment answers with the model it loaded; 503 otherwise."""
        try:
            models = await asyncio.wait_for(self._models(refresh=True), timeout=30)
        except Exception as err:
            raise ApiError(503, "unavailable", f"a stage deployment did not answer: {type(err).__name__}: "
                           f"{err}") from None
        return {"status": "ok", "version": __version__, "models": models,
                "untrained": any(m.get("untrained") for m in models.values()),
                "limits": vars(self.limits)}

    @app.post("/colorize", openapi_extra=REQUEST_BODY_DOC, response_model=None, responses={
        200: {"description": "the colouring (image/png or image/jpeg), or JSON for several samples",
              "content": {"image/png": {}, "image/jpeg": {}, "application/json": {
                  "schema": ColorizeResult.model_json_schema()}}}, **ERROR_RESPONSES})
    async def colorize(self, request: Request, options: Annotated[ColorizeOptions, Query()]) -> Response:
        start = time.perf_counter()
        as_json = wants_json(options, request.headers.get("accept", ""))
        data = await image_bytes(request, self.limits.max_bytes)
        prepared = await asyncio.to_thread(self._prepare, data, options.crop)
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
        colors = self.colorizer.colorize.remote(prepared.gray_64, seed, options.num_samples,
                                                options.temperature, options.mode)
        rgb_64 = self.color_upsampler.upsample.remote(prepared.gray_64, colors)  # resolved by Serve, not here
        rgb_256 = await self.spatial_upsampler.upsample.remote(prepared.gray_256, rgb_64)
        untrained = any(m.get("untrained") for m in (await self._models()).values())
        if not as_json:
            data = await asyncio.to_thread(self._image, prepared, rgb_256[0], options)
            return Response(data, media_type=MEDIA_TYPES[options.format], headers={
                "X-ColTran-Seed": str(seed), "X-ColTran-Untrained": str(untrained).lower(),
                "Content-Disposition": f'inline; filename="colorized_{seed}.{options.format}"'})
        gray, samples, (height, width) = await asyncio.to_thread(self._json_images, prepared, rgb_256, options)
        result = ColorizeResult(seed=seed, num_samples=options.num_samples, width=width, height=height,
                                resolution=options.resolution, media_type=MEDIA_TYPES[options.format],
                                untrained=untrained, gray=gray, samples=samples,
                                elapsed_ms=round(1000 * (time.perf_counter() - start), 1))
        return Response(result.model_dump_json(), media_type="application/json")

    def _prepare(self, data: bytes, crop: str) -> PreparedImage:
        """Step 1, after decoding under the limits (pixel count checked from the header first)."""
        try:
            decoded = decode_image(data, max_pixels=self.limits.max_pixels, min_side=self.limits.min_side)
        except ImageDecodeError as err:
            raise decode_error(err) from None
        return prepare_image(decoded.rgb, crop=crop)

    @staticmethod
    def _restore(prepared: PreparedImage, rgb_256: np.ndarray, resolution: str) -> np.ndarray:
        """Step 5 at resolution 'full' (the input's own luma and size); the 256x256 output itself otherwise."""
        return rgb_256 if resolution == "256" else ColTranPipeline.restore(prepared, rgb_256)

    def _image(self, prepared: PreparedImage, rgb_256: np.ndarray, options: ColorizeOptions) -> bytes:
        return encode_image(self._restore(prepared, rgb_256, options.resolution), options.format)

    def _json_images(self, prepared: PreparedImage, rgb_256: np.ndarray,
                     options: ColorizeOptions) -> tuple[str, list[str], tuple[int, int]]:
        """base64 of the gray input (as the model sees it, at the output size) and of every sample; (H, W)."""
        gray = prepared.gray_256 if options.resolution == "256" else rgb_to_gray(prepared.luma_source)
        samples = [_base64(encode_image(self._restore(prepared, rgb, options.resolution), options.format))
                   for rgb in rgb_256]
        return _base64(encode_image(gray, options.format)), samples, gray.shape[:2]
