"""Shared steps of the backbone tests: images, conversion through the CLI, grids from Detector."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from gridfeats import Detector
from gridfeats.cli import main as gridfeats_main
from gridfeats.config import get_cfg

#: The sizes of the acceptance check (the resize leaves them unchanged) and cheap stand-ins.
REAL_SIZES: Tuple[Tuple[int, int], ...] = ((224, 224), (224, 320), (192, 256))
SMALL_SIZES: Tuple[Tuple[int, int], ...] = ((64, 64), (64, 96), (48, 64))


def write_pngs(folder: Path, sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[Path]:
    """Seeded RGB noise images (smooth enough that features vary across the grid)."""
    rng = np.random.default_rng(seed)
    paths = []
    for h, w in sizes:
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noisy = np.clip(np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255)
        path = folder / f"img_{h}x{w}.png"
        Image.fromarray(noisy.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def convert(src: Path, out: Path, *flags: str, capsys=None) -> str:
    """Run ``gridfeats convert-backbone`` through the CLI entry point; returns its stdout."""
    code = gridfeats_main(["convert-backbone", str(src), "--out", str(out), *flags])
    text = capsys.readouterr().out if capsys is not None else ""
    assert code == 0, f"convert-backbone refused {src}"
    return text


def refusal(src: Path, out: Path, *flags: str, capsys) -> str:
    """The refusal message of a conversion that must fail (exit code 2, nothing written)."""
    code = gridfeats_main(["convert-backbone", str(src), "--out", str(out), *flags])
    assert code == 2
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    return capsys.readouterr().err


def grid(dst: Path, png: Path) -> torch.Tensor:
    """The acceptance check's call: Detector(get_cfg(DST.yaml, sizes), DST.pth).extract_grid."""
    h, w = read_rgb(png).shape[:2]
    cfg = get_cfg(
        dst.with_suffix(".yaml"),
        opts=["INPUT.MIN_SIZE_TEST", min(h, w), "INPUT.MAX_SIZE_TEST", max(h, w)],
    )
    return Detector(cfg, weights=dst, allow_partial=True).extract_grid(png)


def grids_unresized(dst: Path, pngs: Sequence[Path]) -> List[torch.Tensor]:
    """Grids of several images from one Detector that does not resize (``MIN_SIZE_TEST 0``): the
    same numbers as :func:`grid` for sizes its resize leaves unchanged, one model build."""
    cfg = get_cfg(dst.with_suffix(".yaml"), opts=["INPUT.MIN_SIZE_TEST", 0])
    return Detector(cfg, weights=dst, allow_partial=True).extract_grid(list(pngs))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).norm() / want.norm())
