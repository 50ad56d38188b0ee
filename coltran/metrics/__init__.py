"""Image-quality metrics of the paper's evaluation (sec. 5): FID with the TF Inception network the field uses,
and Hasler-Suesstrunk colourfulness. Pure torch/numpy: no Ray, no MLflow."""

from coltran.metrics.colourfulness import colourfulness
from coltran.metrics.fid import FeatureStats, StatsCache, feature_statistics, frechet_distance, stats_key
from coltran.metrics.inception import InceptionFeatures, InceptionMissingError, inception_path, load_inception

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "InceptionMissingError",
    "StatsCache",
    "colourfulness",
    "feature_statistics",
    "frechet_distance",
    "inception_path",
    "load_inception",
    "stats_key",
]
