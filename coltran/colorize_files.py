"""`coltran colorize` on single image files, in this process (no Ray): read, run the pipeline, write.

Outputs are named after the input and the sample index: DEST/<stem>_s<k>.<fmt>. Archives, folders, S3 and
Parquet go through the Ray Data batch job (`pipelines.batch`) under the same verb.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coltran.imageio import ImageDecodeError, encode_image
from coltran.pipeline import ColTranPipeline


def output_name(source: str, sample: int, fmt: str) -> str:
    return f"{Path(source).stem}_s{sample}.{'jpg' if fmt == 'jpeg' else fmt}"


def colorize_files(args) -> int:
    pipe = ColTranPipeline.from_models(args.models, device=args.device)
    if pipe.untrained:
        print("warning: these models are UNTRAINED (coltran init-models): colours will be meaningless",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for k, source in enumerate(args.sources):
        start = time.perf_counter()
        try:
            result = pipe([Path(source).read_bytes()], num_samples=args.num_samples, seeds=[args.seed + k],
                          temperature=args.temperature, mode=args.mode, resolution=args.resolution,
                          crop=args.crop)[0]
        except (ImageDecodeError, OSError) as err:
            print(f"{source}: failed: {err}", file=sys.stderr)
            failures += 1
            continue
        for s, sample in enumerate(result.samples):
            image = sample.full if sample.full is not None else sample.rgb_256
            target = out / output_name(source, s, args.format)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(encode_image(image, args.format))
            tmp.replace(target)
            print(target)
        print(f"{source}: {len(result.samples)} colouring(s) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    return 1 if failures else 0
