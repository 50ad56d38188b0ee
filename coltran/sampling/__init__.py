"""Colorizer sampling: the cached sampler users run, the naive oracle, and the shared seeded draws."""

from coltran.sampling.cached import ColorizerSamples, sample_colorizer
from coltran.sampling.draw import draw_symbols, make_uniforms
from coltran.sampling.naive import naive_sample_colorizer

__all__ = ["ColorizerSamples", "draw_symbols", "make_uniforms", "naive_sample_colorizer", "sample_colorizer"]
