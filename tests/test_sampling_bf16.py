"""bf16 autocast sampling against fp32 on a colorizer trained here for a few steps (CPU autocast; CUDA runs the
same code): logits stay float32 and within LOGIT_TOL of fp32, the key/value caches live in bf16, and the
argmax samples agree on at least 99 % of pixels."""

import numpy as np
import pytest
import torch

from coltran.configs import apply_overrides, preset
from coltran.models import build_model
from coltran.pipeline import ColTranPipeline
from coltran.sampling import sample_colorizer
from coltran.transforms import rgb_to_gray

BLOCK, SIDE = 3, 9  # a compiled call steps gcd(width, 8) pixels (coltran.sampling.cached): 1 here
LOGIT_TOL = 0.1  # max |bf16 - fp32| over every logit of the teacher-forced forward (measured 0.017)
PROB_TOL = 0.01  # max |bf16 sampler - fp32 teacher forcing| over every probability (measured 0.0016)


PALETTE = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                        [255, 0, 255], [255, 255, 255]], dtype=torch.uint8)  # eight colours, eight distinct grays


def blocky_images(seed: int, n: int) -> dict[str, torch.Tensor]:
    """3x3 grids of palette colours shown as BLOCK x BLOCK blocks: the gray says the colour, which a few steps learn."""
    g = torch.Generator().manual_seed(seed)
    rgb = PALETTE[torch.randint(0, len(PALETTE), (n, SIDE // BLOCK, SIDE // BLOCK), generator=g)]
    rgb = rgb.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    return {"rgb_64": rgb, "gray_64": torch.as_tensor(rgb_to_gray(rgb))}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg = apply_overrides(preset("colorizer", "test"), [f"resolution=[{SIDE},{SIDE}]", "num_heads=2"])
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, metrics = model.loss(blocky_images(step, 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), float(metrics["loss"])


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_training_made_the_model_confident(trained):
    _, bits = trained
    assert bits < 1.5  # from 9 bits per pixel at uniform logits


def test_bf16_teacher_forced_logits_are_float32_and_close(trained):
    model, _ = trained
    batch = blocky_images(1000, 4)
    colors3 = batch["rgb_64"].long() // 32
    with torch.no_grad():
        fp32, _ = model(batch["gray_64"], colors3)
        with autocast():
            bf16, _ = model(batch["gray_64"], colors3)
    assert bf16.dtype == torch.float32  # the head runs in float32 under autocast
    err = (bf16 - fp32).abs().max().item()
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    print(f"bf16 teacher-forced logits: max |error| {err:.4f}, argmax agreement {agree:.4f}")
    assert 0 < err < LOGIT_TOL, err  # 0 would mean autocast never reached the decoder
    assert agree >= 0.99, agree


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_sampler_agrees_with_fp32(trained, compile):
    """Compiled under autocast is what CUDA runs (there with CUDA graphs on top)."""
    model, _ = trained
    gray = blocky_images(2000, 6)["gray_64"]
    cache_dtypes = set()
    hook = model.inner_decoder.attns[0].register_forward_hook(
        lambda mod, args, out: cache_dtypes.add(args[2].keys.dtype) if len(args) > 2 and args[2] else None)
    fp32 = sample_colorizer(model, gray, mode="argmax", return_probs=True)
    with autocast():
        bf16 = sample_colorizer(model, gray, mode="argmax", return_probs=True, compile=compile)
    hook.remove()
    if not compile:  # (a compiled graph runs hooks only while it is traced)
        assert cache_dtypes == {torch.float32, torch.bfloat16}  # the fp32 run's caches, then the bf16 run's
    assert bf16.probs.dtype == bf16.log_probs.dtype == torch.float32
    agree = (bf16.symbols == fp32.symbols).float().mean().item()
    with torch.no_grad():  # the bf16 sampler's probabilities against fp32 teacher forcing of its own sample
        logits, _ = model(gray, bf16.colors3.long())
    err = (torch.softmax(logits[..., 0, :], -1) - bf16.probs).abs().max().item()
    print(f"bf16 sampler ({'compiled' if compile else 'eager'}): argmax agreement {agree:.4f}, "
          f"max |probability error| {err:.4f}")
    assert agree >= 0.99, agree
    assert err < PROB_TOL, err


def test_pipeline_bf16_option_on_cpu(trained):
    """ColTranPipeline(bf16=True) on a CPU runs the colorizer under bf16 autocast (what CUDA gets by default):
    argmax colourings agree with the fp32 pipeline on >= 99 % of pixels; the default on a CPU stays fp32."""
    model, _ = trained
    gray = blocky_images(2000, 4)["gray_64"].numpy().astype(np.uint8)
    fp32 = ColTranPipeline(colorizer=model, device="cpu")
    bf16 = ColTranPipeline(colorizer=model, device="cpu", bf16=True)
    assert not fp32.bf16 and bf16.bf16
    same = (bf16.colorize(gray, range(4), mode="argmax") == fp32.colorize(gray, range(4), mode="argmax")).all(-1)
    print(f"bf16 pipeline: argmax agreement {same.mean():.4f}")
    assert same.mean() >= 0.99
