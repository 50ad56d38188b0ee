"""ColTran: the Colorization Transformer (Kumar, Weissenborn and Kalchbrenner, ICLR 2021) in PyTorch.

The model library: models, transforms, sampling, checkpoints and the three-stage pipeline. It imports no
Ray and no MLflow; everything distributed lives in `pipelines/`.
"""

__version__ = "0.1.0"
