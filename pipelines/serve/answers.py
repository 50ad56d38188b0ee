"""Answers of POST /colorize with several images, streamed one image at a time so that no response is built
whole in memory: JSON (base64 images, the ColorizeResult fields) or multipart/mixed (binary parts). Every
restore-and-encode runs in a worker thread, off the ingress's event loop."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import weakref
from collections.abc import AsyncIterator, Callable


async def encoded(job: Callable[[], bytes]) -> bytes:
    return await asyncio.to_thread(job)


async def json_chunks(meta: dict, gray: Callable[[], bytes], samples: list[Callable[[], bytes]],
                      start: float) -> AsyncIterator[bytes]:
    """{**meta, "gray": base64, "samples": [base64, ...], "elapsed_ms"}, written as each image is encoded."""
    yield (json.dumps(meta)[:-1] + ', "gray": "').encode()
    yield base64.b64encode(await encoded(gray))
    yield b'", "samples": ['
    for k, job in enumerate(samples):
        yield (b', "' if k else b'"') + base64.b64encode(await encoded(job)) + b'"'
    yield f'], "elapsed_ms": {round(1000 * (time.perf_counter() - start), 1)}}}'.encode()


async def multipart_chunks(boundary: str, media_type: str, ext: str, gray: Callable[[], bytes],
                           samples: list[Callable[[], bytes]]) -> AsyncIterator[bytes]:
    """multipart/mixed: the gray input (name "gray") then sample k (name "sample-k"), each image/png|jpeg."""
    for name, job in [("gray", gray), *((f"sample-{k}", job) for k, job in enumerate(samples))]:
        data = await encoded(job)
        yield (f"--{boundary}\r\nContent-Type: {media_type}\r\nContent-Length: {len(data)}\r\n"
               f'Content-Disposition: attachment; name="{name}"; filename="{name}.{ext}"\r\n\r\n').encode()
        yield data + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


async def primed(chunks: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """`chunks` with its first chunk already computed (so that errors and time-outs come before the status line
    is sent), calling `release` (idempotent) once the stream ends, fails or is dropped unread."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        release()
        raise

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            release()

    gen = stream()
    weakref.finalize(gen, release)  # a client gone before the first chunk was sent: the stream never starts
    return gen
