"""The contact sheet (coltran.contact_sheet): layout and content of the composed picture, the batch job's sheet from
a finished DEST, and `coltran colorize --contact-sheet` on single files; plus the one output naming rule that the
single-file CLI and the batch job share (pipelines.batch.outputs)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coltran.colorize_files import output_folders, output_name
from coltran.contact_sheet import GAP, LABEL_HEIGHT, compose, is_colour, row_from_images, save_contact_sheet
from pipelines.batch.outputs import output_relpath, source_labels, write_contact_sheet
from pipelines.cli import main
from pipelines.demo.photos import generate_scene

RED, BLUE = (220, 30, 30), (30, 30, 220)


def solid(colour, height=60, width=80) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def cell_pixel(sheet: np.ndarray, row: int, col: int, cell: int, height: int) -> np.ndarray:
    """The centre pixel of cell (row, col)."""
    top = LABEL_HEIGHT + GAP + row * (height + LABEL_HEIGHT + GAP) + LABEL_HEIGHT
    left = GAP + col * (cell + GAP)
    return sheet[top + height // 2, left + cell // 2]


def test_sheet_shows_gray_input_samples_and_original():
    cell = 48
    rows = [row_from_images("red.jpg", solid(RED), [solid(BLUE), solid(RED)]),
            row_from_images("gray.png", solid((90, 90, 90))[..., 0], [solid(BLUE)])]
    assert rows[0].original is not None and rows[1].original is None  # a gray input has no original
    assert rows[0].gray.shape == (60, 80) and abs(int(rows[0].gray[0, 0]) - round(0.299 * 220 + 0.587 * 30
                                                                                   + 0.114 * 30)) <= 1
    sheet = compose(rows, cell=cell)
    # columns: gray input, sample 1, sample 2, original; two rows; cells 48 x 36 for the 80 x 60 inputs
    height = 36
    assert sheet.shape == (LABEL_HEIGHT + GAP + 2 * (height + LABEL_HEIGHT + GAP), GAP + 4 * (cell + GAP), 3)
    gray = cell_pixel(sheet, 0, 0, cell, height)
    assert gray[0] == gray[1] == gray[2]
    assert tuple(cell_pixel(sheet, 0, 1, cell, height)) == BLUE and tuple(cell_pixel(sheet, 0, 2, cell, height)) == RED
    assert tuple(cell_pixel(sheet, 0, 3, cell, height)) == RED  # the original
    assert tuple(cell_pixel(sheet, 1, 2, cell, height)) == (255, 255, 255)  # one sample only: blank
    assert tuple(cell_pixel(sheet, 1, 3, cell, height)) == (255, 255, 255)  # no original
    with pytest.raises(ValueError, match="at least one row"):
        compose([])


def test_is_colour():
    assert is_colour(solid(RED)) and not is_colour(solid((7, 7, 7))) and not is_colour(np.zeros((4, 4), np.uint8))


def test_one_naming_rule_for_batch_and_single_files():
    assert output_relpath("beach/beach_006.jpg", 0, "png") == "beach/beach_006_s0.png"
    assert output_relpath("a/b.JPEG", 1, "jpeg") == "a/b_s1.jpg"
    assert output_relpath("scan.v2", 0, "png") == "scan.v2_s0.png"  # not an image extension: kept
    assert output_relpath("_tmp/x.jpg", 0, "png").startswith("_tmp~")  # the job's own names stay its own
    files = ["/in/x/photo.png", "/in/y/photo.jpg", "/in/x/other.jpg"]
    labels = source_labels(files)
    assert labels == {"/in/x/photo.png": "", "/in/y/photo.jpg": "y", "/in/x/other.jpg": ""}
    batch = [output_relpath("/".join(filter(None, [labels[f], f.rsplit("/", 1)[1]])), 0, "png") for f in files]
    single = [output_name(f, 0, "png", folder) for f, folder in zip(files, output_folders(files), strict=True)]
    assert batch == single == ["photo_s0.png", "y/photo_s0.png", "other_s0.png"]
    # members of different archives never collide: each archive is a folder of its own
    assert source_labels(["/a/shots.tar", "/b/shots.zip", "/c/more.tar.gz"]) == {
        "/a/shots.tar": "shots", "/b/shots.zip": "shots-2", "/c/more.tar.gz": "more"}


def test_batch_sheet_from_a_finished_dest(tmp_path):
    """write_contact_sheet reads DEST/manifest.parquet and the outputs; a loose local colour input is the original."""
    src = tmp_path / "in"
    (src / "beach").mkdir(parents=True)
    Image.fromarray(solid(RED)).save(src / "beach" / "b1.png")
    dest = tmp_path / "out"
    (dest / "beach").mkdir(parents=True)
    for k, colour in enumerate((BLUE, RED)):
        Image.fromarray(solid(colour)).save(dest / "beach" / f"b1_s{k}.png")
    pq.write_table(pa.table({"key": ["beach/b1.png", "beach/bad.jpg"], "source": [str(src), str(src)],
                             "status": ["done", "failed"],
                             "outputs": [["beach/b1_s0.png", "beach/b1_s1.png"], []]}), dest / "manifest.parquet")
    path = write_contact_sheet(str(dest), [str(src)], cell=32)
    assert path == f"{dest}/contact_sheet.png"
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape == (LABEL_HEIGHT + GAP + 24 + LABEL_HEIGHT + GAP, GAP + 4 * (32 + GAP), 3)  # one row
    assert tuple(cell_pixel(sheet, 0, 1, 32, 24)) == BLUE and tuple(cell_pixel(sheet, 0, 3, 32, 24)) == RED


def test_colorize_cli_writes_a_contact_sheet(tmp_path, capsys):
    models, photos = tmp_path / "m", tmp_path / "photos"
    assert main(["init-models", str(models), "--preset", "test"]) == 0
    photos.mkdir()
    Image.fromarray(generate_scene("beach", 1)).save(photos / "beach_001.jpg")
    Image.fromarray(generate_scene("dusk", 2)).convert("L").save(photos / "dusk_002.png")
    capsys.readouterr()
    code = main(["colorize", str(photos / "beach_001.jpg"), str(photos / "dusk_002.png"), "--models", str(models),
                 "--out", str(tmp_path / "out"), "--mode", "argmax", "--resolution", "256",
                 "--contact-sheet"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"contact sheet: {tmp_path / 'out' / 'contact_sheet.png'}" in err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["beach_001_s0.png", "contact_sheet.png", "dusk_002_s0.png"]
    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    cell, height = 160, 160  # --resolution 256: square outputs, and the inputs shown at their size
    assert sheet.size == (GAP + 3 * (cell + GAP), LABEL_HEIGHT + GAP + 2 * (height + LABEL_HEIGHT + GAP))
    save_contact_sheet([row_from_images("x", solid(RED), [])], tmp_path / "deep" / "s.png", cell=16)
    assert (tmp_path / "deep" / "s.png").is_file()
