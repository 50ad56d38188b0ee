"""`coltran <verb>`: one command line for every user flow, the outermost layer (it imports both `coltran` and
`pipelines`; `coltran/` never imports it). Entry points stay thin: parse, then call.

Each verb imports what it needs inside its handler, so `coltran colorize photo.jpg` on one machine loads neither
Ray nor MLflow and starts no cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coltran import __version__

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _add_colorize(sub) -> None:
    p = sub.add_parser("colorize", help="colorize images, folders, archives, S3 prefixes or preprocessed Parquet",
                       epilog="exit status: image files only: 1 when any of them failed. Folders, archives, S3, "
                       "Parquet (the Ray Data job): 0 when the job finished, unusable inputs included (each is a "
                       "manifest row with its reason); 1 when more than --set max_failed_fraction=F of the inputs "
                       "failed (default 1.0: never); 2 when the job is refused before any work (a resource plan "
                       "that cannot be placed, an OUT some node cannot see).")
    p.add_argument("sources", nargs="+", help="image files, folders, .tar/.tar.gz/.zip archives, s3://prefixes, "
                   "or a preprocessed dataset directory (Parquet)")
    p.add_argument("--models", required=True, help="models directory or models:/<name>@<alias> (MLflow)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's seed derives from it and its key")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--mode", choices=("sample", "argmax"), default="sample")
    p.add_argument("--resolution", choices=("full", "256"), default="full")
    p.add_argument("--crop", choices=("full", "center"), default="full")
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--contact-sheet", action="store_true",
                   help="also write OUT/contact_sheet.png: each gray input, its colourings and the original")
    p.add_argument("--batch", action="store_true", help="force the Ray Data batch job even for single files")
    p.add_argument("--ray-address", default=None, help="Ray cluster address for the batch job (default: local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="batch-job settings, e.g. --set colorizer.batch_size=16 (see jobs/colorize.yaml)")
    p.set_defaults(handler=_run_colorize)


def _is_single_image(source: str) -> bool:
    path = Path(source)
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _run_colorize(args) -> int:
    if args.batch or not all(_is_single_image(s) for s in args.sources) or args.models.startswith("models:/"):
        from pipelines.batch.job import run_cli

        return run_cli(args)
    from coltran.colorize_files import colorize_files

    return colorize_files(args)


def _add_init_models(sub) -> None:
    p = sub.add_parser("init-models", help="write untrained models (DIR/colorizer, ...) to test the plumbing")
    p.add_argument("directory")
    p.add_argument("--preset", default="test", help="full | mid | test, or a YAML model config")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_init_models)


def _run_init_models(args) -> int:
    from coltran.init_models import init_models

    path = init_models(args.directory, args.preset, args.seed)
    print(f"wrote UNTRAINED {args.preset} models to {path} (random weights: colours will be meaningless)")
    return 0


def _add_delegated(sub, name: str, help_text: str, module: str) -> None:
    """A verb whose arguments and handler live with the module that implements it."""
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(handler=None, module=module)
    return p


DELEGATED = (
    ("convert-tf", "convert official TensorFlow ColTran checkpoints into this project's format",
     "coltran.convert.convert"),
    ("preprocess", "ImageNet-style folders, archives or S3 prefixes -> sharded Parquet (Ray Data)",
     "pipelines.preprocess.job"),
    ("train", "train the three stages at once on Ray Train, tracked in MLflow", "pipelines.train.driver"),
    ("submit", "submit a job YAML to a Ray cluster with `ray job submit` semantics", "pipelines.submit"),
    ("serve", "serve the three models over HTTP with Ray Serve, with a web page", "pipelines.serve.app"),
    ("evaluate", "FID, bits/dim and colourfulness on held-out images, with a report", "pipelines.evaluate.job"),
    ("demo", "the whole flow on this machine: data, preprocessing, training, registry, colorization",
     "pipelines.demo.job"),
)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen delegated verb's module is imported (so `colorize` does not load MLflow)."""
    parser = argparse.ArgumentParser(prog="coltran", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"coltran {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_colorize(sub)
    _add_init_models(sub)
    for name, help_text, module in DELEGATED:
        p = _add_delegated(sub, name, help_text, module)
        if name == verb:
            _import(module).add_arguments(p)
    return parser


def _import(module: str):
    import importlib

    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if args.handler is None:
        return int(_import(args.module).run(args) or 0)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
