"""ColTranPipeline on real photos, the chroma transfer, init-models and the single-file CLI."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import needs_shared_data

from coltran.checkpoint import CheckpointError
from coltran.chroma import luma, transfer_chroma
from coltran.init_models import init_models
from coltran.pipeline import ColTranPipeline
from pipelines.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"
needs_data = needs_shared_data(DATA)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return init_models(tmp_path_factory.mktemp("models") / "m", preset="test", seed=3)


@pytest.fixture(scope="module")
def pipe(models_dir):
    return ColTranPipeline.from_models(models_dir, device="cpu")


def photo(name_part: str) -> Path:
    return next(p for p in sorted(DATA.glob("*.JPEG")) if name_part in p.name)


@needs_data
def test_real_photo_full_resolution_keeps_size_and_luma(pipe):
    path = photo("tench")
    original = np.asarray(Image.open(path).convert("RGB"))
    result = pipe([path.read_bytes()], num_samples=2, seeds=[9])[0]
    assert result.size == original.shape[:2]
    assert len(result.samples) == 2
    for sample in result.samples:
        assert sample.full.shape == original.shape and sample.full.dtype == np.uint8
        assert np.abs(luma(sample.full) - luma(original)).max() <= 0.5 + 1e-6
        assert sample.rgb_256.shape == (256, 256, 3)
        assert sample.upsampled_64.shape == (64, 64, 3)
        assert (sample.coarse_64 % 32 == 0).all()  # the colorizer's output lies on the 32k grid
    assert not np.array_equal(result.samples[0].coarse_64, result.samples[1].coarse_64)


@needs_data
def test_input_kinds_crop_and_resolution(pipe):
    path = photo("tench")
    pil = Image.open(path)
    rgb = np.asarray(pil.convert("RGB"))
    gray = np.asarray(pil.convert("L"))
    by_bytes = pipe([path.read_bytes()], mode="argmax", resolution="256")[0]
    by_pil = pipe([pil], mode="argmax", resolution="256")[0]
    by_array = pipe([rgb], mode="argmax", resolution="256")[0]
    assert by_bytes.samples[0].full is None
    assert np.array_equal(by_bytes.samples[0].rgb_256, by_pil.samples[0].rgb_256)
    assert np.array_equal(by_bytes.samples[0].rgb_256, by_array.samples[0].rgb_256)
    gray_out = pipe([gray], mode="argmax")[0]
    assert gray_out.size == gray.shape
    assert np.abs(luma(gray_out.samples[0].full) - gray).max() <= 0.5 + 1e-6
    centre = pipe([rgb], crop="center", mode="argmax")[0]
    side = min(rgb.shape[:2])
    assert centre.size == (side, side) and centre.samples[0].full.shape == (side, side, 3)


def test_seeds_are_per_image_and_reproducible(pipe):
    gray = np.random.default_rng(0).integers(0, 256, (2, 80, 120), dtype=np.uint8)
    a = pipe(list(gray), seeds=[1, 2], resolution="256")
    b = pipe([gray[1]], seeds=[2], resolution="256")
    assert np.array_equal(a[1].samples[0].coarse_64, b[0].samples[0].coarse_64)
    c = pipe(list(gray), seeds=10, resolution="256")  # base seed: image k gets 10 + k
    d = pipe(list(gray), seeds=[10, 11], resolution="256")
    assert all(np.array_equal(x.samples[0].rgb_256, y.samples[0].rgb_256) for x, y in zip(c, d, strict=True))
    with pytest.raises(ValueError, match="seeds"):
        pipe(list(gray), seeds=[1])
    with pytest.raises(ValueError, match="resolution"):
        pipe(list(gray), resolution="512")


def test_transfer_chroma_keeps_luma_and_fits_the_gamut():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    colour = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = transfer_chroma(source, colour)
    assert out.shape == source.shape
    assert np.abs(luma(out) - luma(source)).max() <= 0.5 + 1e-6
    grey = np.full((10, 10, 3), 128, np.uint8)
    assert np.array_equal(transfer_chroma(grey, grey), grey)
    saturated = np.zeros((4, 4, 3), np.uint8)
    saturated[..., 0] = 255
    red_on_white = transfer_chroma(np.full((4, 4), 250, np.uint8), saturated)
    assert np.abs(luma(red_on_white) - 250).max() <= 0.5 + 1e-6  # chroma scaled down to fit, luma kept


def test_models_directory_errors(tmp_path, models_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        ColTranPipeline.from_models(tmp_path / "nope")
    broken = tmp_path / "broken"
    init_models(broken, "test")
    (broken / "spatial_upsampler" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors is missing"):
        ColTranPipeline.from_models(broken)
    pipe = ColTranPipeline.from_models(models_dir)
    assert pipe.untrained and all(info["untrained"] for info in pipe.model_info.values())



def test_init_models_of_some_stages_writes_the_same_weights_as_all(tmp_path, models_dir):
    """Writing only some stages (a mixed-preset directory) gives each the weights the full call gives it."""
    from coltran.checkpoint import load_checkpoint

    part = init_models(tmp_path / "part", "test", seed=3, stages=["spatial_upsampler"])
    assert sorted(p.name for p in part.iterdir()) == ["spatial_upsampler"]
    alone = load_checkpoint(part / "spatial_upsampler").model.state_dict()
    full = load_checkpoint(models_dir / "spatial_upsampler").model.state_dict()
    assert alone.keys() == full.keys() and all(np.array_equal(alone[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="unknown stage"):
        init_models(tmp_path / "bad", "test", stages=["decoder"])

def test_single_stage_pipelines_run_their_step_like_the_full_one(tmp_path, models_dir, pipe):
    """What a batch actor or a Serve replica holds: one stage, whose step equals the full pipeline's."""
    gray = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    colors3 = pipe.colorize(gray, seeds=[1, 2], mode="argmax")
    colorizer = ColTranPipeline.for_stage("colorizer", models_dir / "colorizer", device="cpu")
    assert colorizer.color_upsampler is None and colorizer.spatial_upsampler is None
    assert np.array_equal(colorizer.colorize(gray, seeds=[1, 2], mode="argmax"), colors3)
    assert colorizer.model_info["colorizer"]["source"] == "init-models" and colorizer.model_info["colorizer"]["step"] == 0
    with pytest.raises(RuntimeError, match="without the color_upsampler stage"):
        colorizer.upsample_colors(gray, colors3)
    upsamplers = ColTranPipeline.from_models(models_dir, stages=["color_upsampler"], device="cpu")
    assert upsamplers.colorizer is None and set(upsamplers.model_info) == {"color_upsampler"}
    assert np.array_equal(upsamplers.upsample_colors(gray, colors3), pipe.upsample_colors(gray, colors3))
    with pytest.raises(CheckpointError, match="holds a colorizer checkpoint, expected spatial_upsampler"):  # a colorizer checkpoint is not a spatial upsampler
        ColTranPipeline.for_stage("spatial_upsampler", models_dir / "colorizer")
    with pytest.raises(ValueError, match="subset"):
        ColTranPipeline.from_models(models_dir, stages=["decoder"])


@needs_data
def test_cli_init_models_and_colorize_files(tmp_path, capsys):
    assert main(["init-models", str(tmp_path / "m"), "--preset", "test"]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    src = photo("tench")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    code = main(["colorize", str(src), str(bad), "--models", str(tmp_path / "m"), "--out", str(tmp_path / "out"),
                 "--num-samples", "2", "--format", "jpeg", "--mode", "argmax"])
    assert code == 1  # one input failed, and said so
    err = capsys.readouterr().err
    assert "bad.jpg: failed" in err
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == [f"{src.stem}_s0.jpg", f"{src.stem}_s1.jpg"]
    assert Image.open(tmp_path / "out" / outputs[0]).size == Image.open(src).size
