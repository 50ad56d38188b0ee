"""The Serve app end to end: a real local Ray (127.0.0.2), the app from `build_app`, real HTTP on loopback.
Photos in, images of the right size out; every bad input gets its 4xx JSON; concurrent requests are batched."""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from corpus import build_bad_image_corpus
from PIL import Image
from services import free_port
from shared_data import needs_shared_data

from coltran.imageio import decode_image
from coltran.init_models import init_models
from pipelines.serve.app import AppSettings, build_app

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
PHOTO = PHOTOS / "n01530575_brambling.JPEG"
# The HTTP contract (issue 8): decode failure reason -> status.
EXPECTED_STATUS = {"empty": 400, "corrupt": 400, "truncated": 400, "not_an_image": 415, "unsupported": 415,
                   "too_large": 413, "too_small": 422}
MAX_BYTES = 20 * 1024 * 1024  # the documented default request limit

pytestmark = pytest.mark.ray


@dataclass
class Served:
    url: str
    colorizer: object  # DeploymentHandle of the Colorizer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return init_models(tmp_path_factory.mktemp("serve") / "models", "test")


@pytest.fixture(scope="module")
def served(models_dir):
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(_node_ip_address="127.0.0.2", num_cpus=2, object_store_memory=300_000_000, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # A generous batch wait makes the concurrent test's batches certain even on a busy machine.
        serve.run(build_app({"models": str(models_dir), "colorizer": {"batch_wait_timeout_s": 0.3}}),
                  name="coltran", route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", serve.get_deployment_handle("Colorizer", app_name="coltran"))
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(served: Served, data=None, timeout: float = 120.0, **kwargs) -> requests.Response:
    return requests.post(f"{served.url}/colorize", data=data, timeout=timeout, **kwargs)


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
    served.colorizer.reset_stats.remote().result()

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
    stats = served.colorizer.stats.remote().result()
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
    assert health["limits"]["max_bytes"] == MAX_BYTES
    spec = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    post = spec["paths"]["/colorize"]["post"]
    names = {p["name"] for p in post["parameters"]}
    assert {"num_samples", "seed", "temperature", "resolution", "format", "mode", "crop", "response"} <= names
    assert {"image/*", "multipart/form-data"} <= set(post["requestBody"]["content"])
    assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
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
    settings = AppSettings.from_args({"models": str(models_dir), "colorizer": {"max_batch_size": 16}})
    assert settings.stage("colorizer").max_batch_size == 16
    assert settings.stage("spatial_upsampler").max_batch_size == 4


def test_models_from_the_mlflow_registry(mlflow_server, models_dir, tmp_path, monkeypatch):
    """`models:/@<alias>` and per-stage `models:/<name>@<alias>` resolve to each stage's own checkpoint."""
    from coltran.pipeline import ColTranPipeline
    from pipelines.serve.deployments import stage_checkpoint_dir
    from pipelines.tracking.names import REGISTERED_NAMES
    from pipelines.tracking.registry import register_stage
    from pipelines.train import config as train_config

    monkeypatch.setenv("COLTRAN_MODEL_CACHE", str(tmp_path / "cache"))
    client = mlflow_server.client()
    run_id = client.create_run(client.create_experiment("serve-test")).info.run_id
    for stage, name in REGISTERED_NAMES.items():
        register_stage(models_dir / stage, run_id=run_id, name=f"serve-{name}", alias="production",
                       tracking_uri=mlflow_server.uri)
    per_stage = {stage: f"models:/serve-{name}@production" for stage, name in REGISTERED_NAMES.items()}
    monkeypatch.setattr(train_config, "REGISTERED_NAMES", {s: f"serve-{n}" for s, n in REGISTERED_NAMES.items()})
    for stage in REGISTERED_NAMES:
        for models in (per_stage, "models:/@production"):
            path = stage_checkpoint_dir(models, stage, tracking_uri=mlflow_server.uri)
            steps = ColTranPipeline.for_stage(stage, path, device="cpu")
            assert steps.model_info[stage]["name"] == f"serve-{REGISTERED_NAMES[stage]}"
            assert steps.model_info[stage]["version"] == "1"
