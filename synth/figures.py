"""Small labelled PNG figures for a person to look at: image grids (contact sheets, evaluation and tier examples)
and a confusion-matrix heatmap. PIL only; every figure of the project is drawn here."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw

LABEL_W = 150
HEADER_H = 16


def thumb(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` scaled (area) to fit a ``size`` square, on black, top-left."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: small.shape[0], : small.shape[1]] = small
    return canvas


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size`` square (the whole image where it is smaller), on black, top-left."""
    h, w = img.shape[:2]
    c = min(size, h, w)
    y, x = (h - c) // 2, (w - c) // 2
    tile = np.zeros((size, size, 3), np.uint8)
    tile[:c, :c] = img[y : y + c, x : x + c]
    return tile


def _text(size: tuple[int, int], text: str) -> np.ndarray:
    label = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(label).multiline_text((4, 2), text, fill=(0, 0, 0))
    return np.asarray(label)


def labelled_grid(rows: list[tuple[str, list[np.ndarray]]], columns: list[str] | None = None) -> np.ndarray:
    """Rows of equal-size tiles, each row headed by its label (a column of text) and, with ``columns``, one title
    above each column of tiles."""
    size = rows[0][1][0].shape[0]
    body = [np.concatenate([_text((LABEL_W, size), label), *tiles], axis=1) for label, tiles in rows]
    grid = np.concatenate(body, axis=0)
    if columns:
        header = [_text((LABEL_W, HEADER_H), "")] + [_text((size, HEADER_H), c) for c in columns]
        grid = np.concatenate([np.concatenate(header, axis=1), grid], axis=0)
    return grid


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cell: int = 64) -> np.ndarray:
    """A counts matrix as shaded cells with their numbers; rows and columns labelled (row-normalised shading)."""
    n, m = matrix.shape
    img = Image.new("RGB", (LABEL_W + cell * m, 2 * HEADER_H + cell * n), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title, fill=(0, 0, 0))
    for j, c in enumerate(cols):
        draw.text((LABEL_W + j * cell + 4, HEADER_H + 2), c, fill=(0, 0, 0))
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for i, r in enumerate(rows):
        y = 2 * HEADER_H + i * cell
        draw.text((4, y + cell // 2 - 6), r, fill=(0, 0, 0))
        for j in range(m):
            shade = int(255 - 200 * matrix[i, j] / totals[i, 0])
            x = LABEL_W + j * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(shade, shade, 255))
            draw.text((x + cell // 2 - 8, y + cell // 2 - 6), str(int(matrix[i, j])), fill=(0, 0, 0))
    return np.asarray(img)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
