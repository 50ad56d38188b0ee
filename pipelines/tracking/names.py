"""The registered model names a training submission uses unless its job file names others, and that
`models:/@<alias>` resolves to (batch, evaluation, Serve)."""

REGISTERED_NAMES = {"colorizer": "coltran-colorizer", "color_upsampler": "coltran-color-upsampler",
                    "spatial_upsampler": "coltran-spatial-upsampler"}
