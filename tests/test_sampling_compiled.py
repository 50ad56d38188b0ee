"""The compiled sampler (`compile=True`: torch.compile of the row and pixel steps) is exact like the eager one: equal
to the naive oracle (argmax, and sampling on shared uniforms), re-scored by teacher forcing within 1e-5, a batch
equal to its items alone, and the official sampler's held-out parity. One small non-square config (2 heads, 2
layers per decoder) compiles once for the module; the parity test compiles the official test config."""

import time

import numpy as np
import pytest
import torch
from shared_data import TF_TEST, needs_shared_data
from test_sampling import assert_same_draws, random_colorizer, rescored_probs
from test_tf_parity import PROBA_TOL, STAGES, TEST_DATA, _config, _selected

from coltran.checkpoint import load_checkpoint
from coltran.convert.convert import convert_tf_checkpoint
from coltran.pipeline import ColTranPipeline
from coltran.sampling import make_uniforms, naive_sample_colorizer, sample_colorizer
from coltran.transforms import from_3bit

CONFIG = ["resolution=[6,9]", "num_heads=2", "num_outer_layers=2", "num_inner_layers=2"]


@pytest.fixture(scope="module")
def model():
    """The module's one compile: a first sample (batch 2, so the graphs serve every batch size above 1). Dynamo's
    caches are emptied first, so what earlier tests compiled in this process (other configs, autocast, hooks)
    neither counts here nor uses up the recompile limit, past which torch would silently run eager."""
    torch._dynamo.reset()
    model = random_colorizer(CONFIG, scale=0.2)  # at 0.3 fp32 itself nears 1e-5: docs/sampling.md
    start = time.perf_counter()
    sample_colorizer(model, torch.randint(0, 256, (2, 6, 9)), return_probs=True, compile=True)
    print(f"compiled the sampler's steps in {time.perf_counter() - start:.1f} s")
    return model


def compiles() -> int:
    """Graphs compiled so far in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_compiled_equals_eager_naive_and_teacher_forcing(model, mode):
    gray = torch.randint(0, 256, (2, 6, 9))
    uniforms = make_uniforms([3, 4], 2, 54)
    before = compiles()
    compiled = sample_colorizer(model, gray, num_samples=2, mode=mode, uniforms=uniforms, return_probs=True,
                                compile=True)
    assert compiles() == before  # new batch size, mode and uniforms: no recompile
    eager = sample_colorizer(model, gray, num_samples=2, mode=mode, uniforms=uniforms, return_probs=True)
    naive = naive_sample_colorizer(model, gray.repeat_interleave(2, 0), uniforms, mode=mode, return_probs=True)
    assert_same_draws(compiled, naive, uniforms)
    assert_same_draws(compiled, eager, uniforms)
    tf = rescored_probs(model, gray.repeat_interleave(2, 0), compiled.colors3)
    assert (tf - compiled.probs).abs().max() < 1e-5
    chosen = tf.gather(-1, compiled.symbols[..., None])[..., 0].log()
    assert (chosen - compiled.log_probs).abs().max() < 1e-4


def test_compiled_batch_equals_items_alone(model):
    gray = torch.randint(0, 256, (3, 6, 9))
    for mode in ("argmax", "sample"):
        together = sample_colorizer(model, gray, mode=mode, seeds=[5, 6, 7], num_samples=2, return_probs=True,
                                    compile=True).symbols
        for k, seed in enumerate([5, 6, 7]):
            alone = sample_colorizer(model, gray[k : k + 1], mode=mode, seeds=[seed], num_samples=2,
                                     return_probs=True, compile=True).symbols
            assert torch.equal(together[2 * k : 2 * k + 2], alone)


@needs_shared_data(TF_TEST)
def test_compiled_official_sampler_parity(tmp_path_factory):
    """The official sampler's argmax chain and probabilities on the converted official test checkpoint
    (test_tf_parity has the eager version), compiled."""
    out = convert_tf_checkpoint(TEST_DATA / "colorizer" / "ckpt", STAGES["colorizer"], _config("colorizer"),
                                tmp_path_factory.mktemp("colorizer") / "ckpt")
    raw = load_checkpoint(out, weights="model").model
    io = dict(np.load(TEST_DATA / "colorizer" / "io.npz"))
    gray = torch.from_numpy(io["gray"][..., 0])
    out = sample_colorizer(raw, gray, mode="argmax", official_row_cln=True, return_probs=True, compile=True)
    np.testing.assert_array_equal(out.symbols.numpy(), io["sample_symbols"])
    np.testing.assert_array_equal(from_3bit(out.colors3).numpy(), io["sample_auto_argmax"])
    probs = out.probs.numpy()
    np.testing.assert_allclose(_selected(probs, io), io["sample_proba_sel"], rtol=0, atol=PROBA_TOL)
    np.testing.assert_allclose(probs.max(-1), io["sample_proba_max"], rtol=0, atol=PROBA_TOL)


def test_pipeline_warm_up_compiles_before_the_first_request(model):
    """What a Serve replica with compile_sampler does: warm_up_sampler compiles batch 1 and batch > 1, after
    which colorize at any batch size compiles nothing and equals the eager pipeline."""
    compiled = ColTranPipeline(colorizer=model, device="cpu", compile_sampler=True)
    compiled.warm_up_sampler()
    before = compiles()
    eager = ColTranPipeline(colorizer=model, device="cpu")
    for batch in (1, 3):
        gray = np.random.default_rng(batch).integers(0, 256, (batch, 6, 9), dtype=np.uint8)
        seeds = range(10, 10 + batch)
        np.testing.assert_array_equal(compiled.colorize(gray, seeds), eager.colorize(gray, seeds))
    assert compiles() == before
