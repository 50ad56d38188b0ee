"""The Serve app end to end over real HTTP on loopback, as `coltran serve` runs it (the session's `served_app`,
shared with the browser tests): photos in, images of the right size out; every bad input gets its 4xx JSON;
concurrent requests are batched; the API token, the in-flight limit (429), the time budget (504) and the output
budget (413 before any model work)."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes
from pathlib import Path

import numpy as np
import pytest
import requests
from corpus import build_bad_image_corpus
from PIL import Image
from served_app import MAX_IN_FLIGHT, ServedApp
from shared_data import needs_shared_data

from coltran.imageio import decode_image
from coltran.init_models import init_models
from pipelines.serve.app import AppSettings, build_app
from pipelines.serve.http import Auth, check_token

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
PHOTO = PHOTOS / "n01530575_brambling.JPEG"
# The HTTP contract (issue 8): decode failure reason -> status.
EXPECTED_STATUS = {"empty": 400, "corrupt": 400, "truncated": 400, "not_an_image": 415, "unsupported": 415,
                   "too_large": 413, "too_small": 422}
MAX_BYTES = 20 * 1024 * 1024  # the documented default request limit

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return init_models(tmp_path_factory.mktemp("serve") / "models", "test")


@pytest.fixture(scope="module")
def served(served_app) -> ServedApp:
    return served_app


def _post(served: ServedApp, data=None, timeout: float = 120.0, headers: dict | None = None,
          **kwargs) -> requests.Response:
    """POST /colorize with the session's token (unless `headers` brings its own Authorization)."""
    return requests.post(f"{served.url}/colorize", data=data, timeout=timeout, headers={**served.auth, **(headers or {})},
                         **kwargs)


def _idle(served: ServedApp, timeout: float = 60.0) -> dict:
    """Stats once no request is in the ingress (a finished stream's slot is released just after its last byte)."""
    deadline = time.monotonic() + timeout
    while (stats := served.stats())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats["in_flight"] == 0, stats
    return stats


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _assert_error(response: requests.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["detail"], body
    if error is not None:
        assert body["error"] == error, body
    return body


@needs_shared_data(PHOTO)
def test_photo_256_json_samples_multipart_and_reproducible_seeds(served):
    data = PHOTO.read_bytes()
    response = _post(served, files={"file": ("bird.jpg", data, "image/jpeg")},
                     params={"num_samples": 2, "seed": 11, "resolution": "256", "temperature": 0.9})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["seed"], body["num_samples"], body["width"], body["height"]) == (11, 2, 256, 256)
    assert body["untrained"] is True and body["media_type"] == "image/png"
    gray = _image(base64.b64decode(body["gray"]))
    assert gray.size == (256, 256) and gray.mode == "L"
    samples = [np.asarray(_image(base64.b64decode(s))) for s in body["samples"]]
    assert [s.shape for s in samples] == [(256, 256, 3)] * 2
    assert not np.array_equal(samples[0], samples[1]), "two samples of one request drew the same colours"
    # Sample 0 of seed 11 again, alone, as an image: the same pixels (an image's draws depend on its seed only).
    again = _post(served, data, params={"seed": 11, "resolution": "256", "temperature": 0.9})
    assert again.status_code == 200, again.text
    np.testing.assert_array_equal(np.asarray(_image(again.content)), samples[0])


@needs_shared_data(PHOTO)
def test_concurrent_requests_are_batched_and_come_back_at_their_own_size(served, tmp_path):
    """8 concurrent requests: a real photo (raw body, PNG) and 7 odd but valid images (CMYK, EXIF-rotated,
    16-bit, palette, float TIFF...; JPEG out). Each comes back at its own (oriented) size, and the colorizer
    sampled more than one request at once."""
    wanted = ["cmyk.jpg", "exif_rot6.jpg", "gray16.png", "rgb16.png", "rgba16.png", "palette_trns.png", "float.tif"]
    items = [i for i in build_bad_image_corpus(tmp_path) if i.name in wanted]
    assert len(items) == 7
    photo = PHOTO.read_bytes()
    before = len(_idle(served)["colorizer"]["batch_sizes"])

    def send(item):
        if item is None:
            return _post(served, photo, params={"seed": 7}, headers={"Content-Type": "image/jpeg"})
        return _post(served, item.path.read_bytes(), params={"seed": 1, "format": "jpeg"})

    with ThreadPoolExecutor(8) as pool:
        first, *responses = list(pool.map(send, [None, *items]))
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert (first.headers["x-coltran-seed"], first.headers["x-coltran-untrained"]) == ("7", "true")
    image = _image(first.content)
    height, width = decode_image(photo).size
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (width, height))
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200, f"{item.name}: {response.text}"
        assert response.headers["content-type"] == "image/jpeg"
        assert _image(response.content).size == (item.size[1], item.size[0]), item.name
    stats = {"batch_sizes": served.stats()["colorizer"]["batch_sizes"][before:]}
    assert sum(stats["batch_sizes"]) == 8, stats
    assert max(stats["batch_sizes"]) > 1, f"no batch above 1 request under 8 concurrent requests: {stats}"


def test_every_bad_image_kind_gets_its_4xx(served, tmp_path):
    bad = [i for i in build_bad_image_corpus(tmp_path) if i.expect == "fail"]
    assert {i.reason for i in bad} == set(EXPECTED_STATUS), "the corpus lost a failure kind"
    for item in bad:
        for kwargs in ({"data": item.path.read_bytes()},
                       {"files": {"file": (item.name, item.path.read_bytes(), "application/octet-stream")}}):
            response = _post(served, **kwargs)
            _assert_error(response, EXPECTED_STATUS[item.reason], item.reason)


def test_body_size_limit_is_413_before_decoding(served):
    too_big = b"\xff\xd8\xff" + bytes(MAX_BYTES)  # a JPEG-looking body one limit long
    body = _assert_error(_post(served, too_big), 413, "request_too_large")
    assert f"{MAX_BYTES:,}" in body["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(21):
            yield bytes(1024 * 1024)

    _assert_error(_post(served, chunks()), 413, "request_too_large")


@pytest.mark.parametrize("params, words", [
    ({"num_samples": 9}, "num_samples"), ({"num_samples": 0}, "num_samples"), ({"temperature": 0}, "temperature"),
    ({"temperature": "nan"}, "temperature"), ({"seed": -1}, "seed"), ({"resolution": "512"}, "resolution"),
    ({"format": "gif"}, "format"), ({"mode": "greedy"}, "mode"), ({"crop": "left"}, "crop"),
    ({"num_sample": 2}, "valid options"), ({"response": "image", "num_samples": 2}, "response=image"),
])
def test_bad_options_are_422(served, params, words):
    body = _assert_error(_post(served, b"not read", params=params), 422, "invalid_options")
    assert words in body["detail"]


def test_other_request_errors_are_json(served):
    _assert_error(_post(served, files={"other": (None, "text")}), 400, "missing_file")
    _assert_error(_post(served, b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data"}), 400)
    _assert_error(requests.get(f"{served.url}/colorize", timeout=30), 405, "method_not_allowed")
    _assert_error(requests.get(f"{served.url}/nothing-here", timeout=30), 404, "not_found")


def test_healthz_openapi_and_page(served):
    health = requests.get(f"{served.url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["untrained"] is True
    assert sorted(health["models"]) == ["color_upsampler", "colorizer", "spatial_upsampler"]
    assert health["limits"]["max_bytes"] == MAX_BYTES and health["auth"] is True
    # A CPU deployment's upsamplers default to unbatched; the colorizer batches.
    assert {s: m["max_batch_size"] for s, m in health["models"].items() if s != "colorizer"} == {
        "color_upsampler": 1, "spatial_upsampler": 1}
    spec = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    post = spec["paths"]["/colorize"]["post"]
    names = {p["name"] for p in post["parameters"]}
    assert {"num_samples", "seed", "temperature", "resolution", "format", "mode", "crop", "response"} <= names
    assert {"image/*", "multipart/form-data"} <= set(post["requestBody"]["content"])
    assert {"200", "400", "401", "413", "415", "422", "429", "504"} <= set(post["responses"])
    assert any("HTTPBearer" in item for item in post["security"])
    assert "/healthz" in spec["paths"]
    assert "swagger" in requests.get(f"{served.url}/docs", timeout=30).text.lower()
    page = requests.get(f"{served.url}/", timeout=30)
    assert page.headers["content-type"].startswith("text/html") and 'id="file"' in page.text


def test_app_args_are_checked_strictly(models_dir):
    with pytest.raises(ValueError, match="valid keys"):
        build_app({"models": str(models_dir), "max_batch": 4})
    with pytest.raises(ValueError, match="need `models`"):
        build_app({})
    with pytest.raises(ValueError, match="exactly the keys"):
        build_app({"models": {"colorizer": str(models_dir / "colorizer")}})
    with pytest.raises(ValueError, match="max_batch_size"):
        build_app({"models": str(models_dir), "colorizer": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match="unknown limits"):
        build_app({"models": str(models_dir), "limits": {"max_pixel": 10}})
    with pytest.raises(ValueError, match="timeout_s"):
        build_app({"models": str(models_dir), "limits": {"timeout_s": 0}})
    with pytest.raises(ValueError, match="auth must be a mapping"):
        build_app({"models": str(models_dir), "auth": {"token": "in the config"}})
    with pytest.raises(ValueError, match="compile_sampler must be true or false"):
        build_app({"models": str(models_dir), "compile_sampler": "yes"})
    settings = AppSettings.from_args({"models": str(models_dir), "colorizer": {"max_batch_size": 16}})
    assert settings.stage("colorizer").max_batch_size == 16
    assert settings.stage("spatial_upsampler").max_batch_size is None  # by device: 1 on a CPU, 4 on a GPU


def test_models_from_the_mlflow_registry(mlflow_server, models_dir, tmp_path, monkeypatch):
    """`models:/@<alias>` and per-stage `models:/<name>@<alias>` resolve to each stage's own checkpoint."""
    from coltran.pipeline import ColTranPipeline
    from pipelines.serve.deployments import stage_checkpoint_dir
    from pipelines.tracking import names
    from pipelines.tracking.names import REGISTERED_NAMES
    from pipelines.tracking.registry import register_stage

    monkeypatch.setenv("COLTRAN_MODEL_CACHE", str(tmp_path / "cache"))
    client = mlflow_server.client()
    run_id = client.create_run(client.create_experiment("serve-test")).info.run_id
    for stage, name in REGISTERED_NAMES.items():
        register_stage(models_dir / stage, run_id=run_id, name=f"serve-{name}", alias="production",
                       tracking_uri=mlflow_server.uri)
    per_stage = {stage: f"models:/serve-{name}@production" for stage, name in REGISTERED_NAMES.items()}
    monkeypatch.setattr(names, "REGISTERED_NAMES", {s: f"serve-{n}" for s, n in REGISTERED_NAMES.items()})
    for stage in REGISTERED_NAMES:
        for models in (per_stage, "models:/@production"):
            path = stage_checkpoint_dir(models, stage, tracking_uri=mlflow_server.uri)
            steps = ColTranPipeline.for_stage(stage, path, device="cpu")
            assert steps.model_info[stage]["name"] == f"serve-{REGISTERED_NAMES[stage]}"
            assert steps.model_info[stage]["version"] == "1"


def test_no_or_wrong_token_is_401_before_anything_else(served):
    small = _png(40, 30)
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer " + "0" * 64},
                    {"Authorization": f"Basic {served.token}"}, {"Authorization": f"Bearer {served.token[:-1]}"}):
        response = _post(served, small, headers=headers, params={"num_samples": 99})  # bad options: 401 first
        _assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    _assert_error(requests.get(f"{served.url}/stats", timeout=30), 401, "unauthorized")
    assert requests.get(f"{served.url}/healthz", timeout=30).status_code == 200  # open, for probes
    response = _post(served, small, params={"resolution": "256"})
    assert response.status_code == 200 and response.content[:4] == b"\x89PNG", response.text


def test_token_check_and_sources(tmp_path, monkeypatch, caplog):
    token = "ab" * 32
    check_token(token.encode(), f"Bearer {token}")
    check_token(None, None)  # authentication explicitly off
    for header in (None, "", token, f"Bearer {token}x", f"Token {token}"):
        with pytest.raises(Exception, match="token") as err:
            check_token(token.encode(), header)
        assert err.value.status == 401
    (tmp_path / "token").write_text(token + "\n")
    assert Auth(token_file=str(tmp_path / "token")).token() == token.encode()
    monkeypatch.setenv("COLTRAN_K8S_TOKEN", token)
    assert Auth(token_env="COLTRAN_K8S_TOKEN").token() == token.encode()
    monkeypatch.delenv("COLTRAN_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no API token"):
        Auth().token()
    with pytest.raises(ValueError, match="does not exist"):
        Auth(token_file=str(tmp_path / "missing")).token()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert Auth(disabled=True).token() is None
    assert "DISABLED" in caplog.text


def test_burst_beyond_the_in_flight_limit_gets_fast_429s_then_service_resumes(served):
    """MAX_IN_FLIGHT uploads that the test holds open fill the ingress (whatever the machine's speed); a burst of
    6x that many requests is refused at once, all 429 JSON with Retry-After, none 5xx, all back while the holders
    still hold; released, the holders get their answers (a 4x4 image: 422 too_small, no model time spent), and
    the next request is served normally."""
    small, tiny = _png(40, 30), _png(4, 4)
    _idle(served)
    release = threading.Event()

    def held_upload():
        yield tiny[:16]
        release.wait(120)
        yield tiny[16:]

    def hold():
        return _post(served, held_upload(), headers={"Content-Type": "image/png"}, params={"resolution": "256"})

    with ThreadPoolExecutor(MAX_IN_FLIGHT) as holders, ThreadPoolExecutor(16) as burst:
        held = [holders.submit(hold) for _ in range(MAX_IN_FLIGHT)]
        try:
            deadline = time.monotonic() + 60
            while served.stats()["in_flight"] < MAX_IN_FLIGHT:
                assert time.monotonic() < deadline, served.stats()
                time.sleep(0.1)
            refused = list(burst.map(lambda _: _post(served, small, params={"resolution": "256"}),
                                     range(6 * MAX_IN_FLIGHT)))
            assert not any(f.done() for f in held), "a held upload finished before it was released"
        finally:
            release.set()
        for response in refused:
            body = _assert_error(response, 429, "overloaded")
            assert int(response.headers["retry-after"]) >= 1 and "max_in_flight" in body["detail"]
        for future in held:
            _assert_error(future.result(), 422, "too_small")
    after = _post(served, small, params={"resolution": "256"})
    assert after.status_code == 200, after.text
    assert served.stats()["overloaded"] >= 6 * MAX_IN_FLIGHT


def test_over_the_time_budget_is_504_and_its_work_is_cancelled(served):
    """A request whose budget (timeout_s=0.05) is below the colorizer's batch wait (0.3 s, a floor under every
    request) gets 504; its model work never runs: after one more request, each stage has seen exactly that one."""
    small = _png(40, 30)
    before = _idle(served)
    body = _assert_error(_post(served, small, params={"timeout_s": 0.05}), 504, "timeout")
    assert "0.05 s" in body["detail"] and "limits.timeout_s" in body["detail"]
    assert _post(served, small, params={"resolution": "256"}).status_code == 200
    after = _idle(served)
    for stage in ("colorizer", "color_upsampler", "spatial_upsampler"):
        ran = after[stage]["batch_sizes"][len(before[stage]["batch_sizes"]):]
        assert sum(ran) == 1, f"{stage} ran {ran}: the timed-out request's work was not cancelled"
    assert after["timed_out"] == before["timed_out"] + 1


def test_over_budget_output_is_refused_before_any_model_work(served):
    """8 samples of a 25-megapixel image at full resolution: 413 naming limits.max_output_pixels, from the header
    (a constant PNG of 5000 x 5000 is a few KB), and the colorizer never saw it."""
    big = _png(5000, 5000)
    before = _idle(served)
    start = time.monotonic()
    body = _assert_error(_post(served, big, params={"num_samples": 8}), 413, "output_too_large")
    assert "max_output_pixels" in body["detail"] and "200,000,000" in body["detail"], body
    assert served.stats()["colorizer"]["batch_sizes"] == before["colorizer"]["batch_sizes"]
    print(f"refused in {time.monotonic() - start:.2f} s")


def test_multipart_answer_streams_gray_then_samples(served):
    response = _post(served, _png(40, 30), params={"num_samples": 2, "seed": 3, "response": "multipart"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("multipart/mixed; boundary=")
    message = message_from_bytes(b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n"
                                 + response.content)
    parts = message.get_payload()
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["gray", "sample-0", "sample-1"]
    images = [_image(p.get_payload(decode=True)) for p in parts]
    assert [(i.mode, i.size) for i in images] == [("L", (40, 30)), ("RGB", (40, 30)), ("RGB", (40, 30))]
    assert response.headers["x-coltran-seed"] == "3"
