"""Labelled image grids: the with/without comparison and the evaluation's per-style grids."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

PAD_TOP = 24  # room for a column header


def label_grid(rows: list[list[Image.Image]], labels: list[str], row_labels: list[str]) -> Image.Image:
    """Images in a grid with a header over each column and a label at each row's start, none cut off."""
    w, h = rows[0][0].size
    font = ImageFont.load_default()
    pad_left = max(90, 12 + int(max((font.getlength(t) for t in row_labels), default=0)))
    grid = Image.new("RGB", (pad_left + w * len(labels), PAD_TOP + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(labels):
        draw.text((pad_left + j * w + 4, 6), text, fill="black", font=font)
    for i, (row, text) in enumerate(zip(rows, row_labels)):
        draw.text((4, PAD_TOP + i * h + h // 2 - 6), text, fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image, (pad_left + j * w, PAD_TOP + i * h))
    return grid


def grid_cell(grid: Image.Image, cell: tuple[int, int], columns: int, i: int, j: int) -> Image.Image:
    """The image of size ``cell`` at row ``i``, column ``j`` of a ``columns``-wide grid made by ``label_grid``."""
    w, h = cell
    left = grid.width - columns * w  # the row labels' column
    return grid.crop((left + j * w, PAD_TOP + i * h, left + (j + 1) * w, PAD_TOP + (i + 1) * h))
