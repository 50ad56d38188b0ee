"""`coltran colorize` on single image files, in this process (no Ray): read, run the pipeline, write.

Outputs follow the batch job's naming rule (pipelines.batch.outputs): DEST/<name without its image
extension>_s<k>.<fmt>; a file name given twice (x/a.jpg, y/a.jpg) puts the repeat under its parent folder's name
(DEST/y/a_s0.png). With `contact_sheet`, DEST/contact_sheet.png shows each gray input, its colourings and the
original colour photo. Archives, folders, S3 and Parquet go through the Ray Data batch job under the same verb.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from coltran.contact_sheet import SheetRow, row_from_images, save_contact_sheet
from coltran.imageio import ImageDecodeError, decode_image, encode_image
from coltran.pipeline import ColTranPipeline

CONTACT_SHEET = "contact_sheet.png"
SHEET_ROWS = 12  # a sheet stays a glance: the first inputs only


def output_name(source: str, sample: int, fmt: str, folder: str = "") -> str:
    """DEST-relative name of colouring `sample` of the image file `source` (under `folder` if given)."""
    name = f"{Path(source).stem}_s{sample}.{'jpg' if fmt == 'jpeg' else fmt}"
    return f"{folder}/{name}" if folder else name


def output_folders(sources: list[str]) -> list[str]:
    """The folder under DEST per source: '' unless the file's stem repeats an earlier one, then the parent folder's
    name, '-2', '-3'... when that is taken too (pipelines.batch.outputs.source_labels, for image files)."""
    stems, taken, folders = set(), set(), []
    for source in sources:
        path = Path(source)
        if path.stem not in stems:
            stems.add(path.stem)
            folders.append("")
            continue
        base = path.resolve().parent.name or "_"
        folder, n = base, 1
        while folder in taken or folder in stems:
            n += 1
            folder = f"{base}-{n}"
        taken.add(folder)
        folders.append(folder)
    return folders


def colorize_files(args) -> int:
    pipe = ColTranPipeline.from_models(args.models, device=args.device)
    if pipe.untrained:
        print("warning: these models are UNTRAINED (coltran init-models): colours will be meaningless",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures, rows = 0, []
    for k, (source, folder) in enumerate(zip(args.sources, output_folders(args.sources), strict=True)):
        start = time.perf_counter()
        try:
            data = Path(source).read_bytes()
            result = pipe([data], num_samples=args.num_samples, seeds=[args.seed + k],
                          temperature=args.temperature, mode=args.mode, resolution=args.resolution,
                          crop=args.crop)[0]
        except (ImageDecodeError, OSError) as err:
            print(f"{source}: failed: {err}", file=sys.stderr)
            failures += 1
            continue
        images = [s.full if s.full is not None else s.rgb_256 for s in result.samples]
        for s, image in enumerate(images):
            target = out / output_name(source, s, args.format, folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(encode_image(image, args.format))
            tmp.replace(target)
            print(target)
        if getattr(args, "contact_sheet", False) and len(rows) < SHEET_ROWS:
            rows.append(_sheet_row(source, data, images))
        print(f"{source}: {len(result.samples)} colouring(s) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    if rows:
        print(f"contact sheet: {save_contact_sheet(rows, out / CONTACT_SHEET)}", file=sys.stderr)
    return 1 if failures else 0


def _sheet_row(source: str, data: bytes, images: list) -> SheetRow:
    """The input as decoded (the original when it has colour) beside its colourings, at the outputs' size."""
    decoded = decode_image(data).rgb
    if decoded.shape[:2] != images[0].shape[:2]:  # 256x256 outputs: show the input at the same size
        size = (images[0].shape[1], images[0].shape[0])
        decoded = np.asarray(Image.fromarray(decoded).resize(size, Image.Resampling.BICUBIC))
    return row_from_images(Path(source).name, decoded, images)
