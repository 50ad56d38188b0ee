"""The three ColTran stages under their official names, and the stage-name -> class map."""

from coltran.configs import ModelConfig
from coltran.models.colorizer import ColTranCore, GrayScaleEncoder, InnerDecoder, OuterDecoder
from coltran.models.upsampler import ColorUpsampler, SpatialUpsampler

STAGES = {
    "colorizer": ColTranCore,
    "color_upsampler": ColorUpsampler,
    "spatial_upsampler": SpatialUpsampler,
}


def build_model(config: ModelConfig):
    """A freshly initialised model of the stage that `config` belongs to."""
    return STAGES[config.stage](config)


def count_parameters(model) -> int:
    """Trainable parameters (the official counts exclude the frozen cLN normaliser)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ColTranCore",
    "ColorUpsampler",
    "GrayScaleEncoder",
    "InnerDecoder",
    "OuterDecoder",
    "SpatialUpsampler",
    "STAGES",
    "build_model",
    "count_parameters",
]
