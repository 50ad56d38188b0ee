"""The MLflow pyfunc model of one ColTran stage (logged "from code"): its artifact is a coltran checkpoint
directory and its loader is `coltran.checkpoint.load_checkpoint`; predict runs the stage on uint8 arrays."""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch

from coltran.checkpoint import load_checkpoint
from coltran.sampling import sample_colorizer
from coltran.transforms import upsample_4x

CHECKPOINT_ARTIFACT = "checkpoint"


class ColTranStageModel(mlflow.pyfunc.PythonModel):
    """colorizer: {gray_64} -> 3-bit colours (seeded draw, seed = row index); colour upsampler: {gray_64, colors3}
    -> rgb_64; spatial upsampler: {gray_256, rgb_64} -> rgb_256 (argmax). All uint8 numpy arrays."""

    def load_context(self, context):
        self.ckpt = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], weights="ema")
        self.model = self.ckpt.model.eval()

    @torch.no_grad()
    def predict(self, context, model_input, params=None):
        stage = self.ckpt.config.stage
        x = {k: torch.as_tensor(np.asarray(v)) for k, v in dict(model_input).items()}
        if stage == "colorizer":
            gray = x["gray_64"]
            out = sample_colorizer(self.model, gray, mode="sample", seeds=list(range(len(gray))))
            return out.colors3.numpy()
        if stage == "color_upsampler":
            return self.model.predict(x["gray_64"], x["colors3"], mode="argmax").numpy()
        blocky = upsample_4x(x["rgb_64"])  # (N, 256, 256, 3) nearest, the spatial stage's input
        return self.model.predict(x["gray_256"], blocky, mode="argmax").numpy()


mlflow.models.set_model(ColTranStageModel())
