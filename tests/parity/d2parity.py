"""Run the detector on the Detectron2 parity fixtures and collect results in the fixtures' layout.

The fixtures (``../shared/fixtures/d2parity``: photos, seeded weight generator, Detectron2's
outputs) live outside the repository; ``GRIDFEATS_D2PARITY`` may point elsewhere. Used by the tests
and by ``python -m tests.parity.d2parity CONFIG OUT.npz`` for a manual ``compare.py`` run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(
    os.environ.get("GRIDFEATS_D2PARITY", REPO.parent / "shared" / "fixtures" / "d2parity")
)
IMAGES = {
    "motorcycle": "motorcycle.jpg",
    "ihc_square": "ihc_square.png",
    "hubble_portrait": "hubble_portrait.jpg",
}
CONFIGS = ("R-50-grid", "R-50-updn", "X-101-grid")


def available() -> bool:
    return (FIXTURES / "make_weights.py").is_file()


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights_path(config: str, cache_dir: Path) -> Path:
    """Write (once) the seeded random checkpoint of ``config`` with the fixtures' generator."""
    out = cache_dir / f"d2parity_{config}.pth"
    if not out.exists():
        gen = _load_module("d2parity_make_weights", FIXTURES / "make_weights.py")
        manifest = json.loads((FIXTURES / f"keys_{config}.json").read_text())
        calib = dict(np.load(FIXTURES / "calib.npz"))
        state = gen.make_state_dict(manifest, config, calib)
        tmp = out.with_suffix(".tmp")
        torch.save({"model": state}, tmp)
        os.replace(tmp, out)
    return out


def run(
    detector, images: Optional[Dict[str, str]] = None, with_grid: bool = True
) -> Dict[str, np.ndarray]:
    """Outputs for each fixture image, keyed ``<stem>/<name>`` like ``expected_<config>.npz``.

    Detections, region features and attribute probabilities come from
    :meth:`Detector.detect_batch` itself (features pooled at each returned detection's box in
    network-input pixels, one row per returned detection); the grid from the model's grid rule; the
    stage means and RPN proposals from the same modules the detector runs.
    """
    model = detector.model
    out: Dict[str, np.ndarray] = {}
    for stem, name in (images or IMAGES).items():
        p = detector.prepare(FIXTURES / "images" / name)
        out[f"{stem}/orig_hw"] = np.array(p.orig_hw, dtype=np.int64)
        out[f"{stem}/input_hw"] = np.array(p.input_hw, dtype=np.int64)
        out[f"{stem}/input_bgr"] = p.image.numpy()
        with torch.inference_mode():
            batch = model.normalize([p.image])
            if with_grid:
                grid = model.grid_features(batch)[0]
                out[f"{stem}/grid"] = grid.numpy()
                out[f"{stem}/grid_shape"] = np.array(grid.shape, dtype=np.int64)
                out[f"{stem}/grid_chanmean"] = grid.mean(dim=(1, 2)).numpy()
                stages = model.backbone(
                    batch.tensor, res5_dilation=model.backbone.grid_res5_dilation, return_all=True
                )
                for stage in ("stem", "res2", "res3", "res4", "res5"):
                    if stage in stages:
                        out[f"{stem}/stage_{stage}_chanmean"] = (
                            stages[stage][0].mean(dim=(1, 2)).numpy()
                        )
            features = model.backbone(batch.tensor)
            (proposals,), _ = model.proposal_generator(batch, features)
            out[f"{stem}/rpn_boxes"] = proposals.proposal_boxes.numpy()
            out[f"{stem}/rpn_logits"] = proposals.objectness_logits.numpy()
        (det,) = detector.detect_batch([p])
        out[f"{stem}/boxes"] = det.pred_boxes.numpy()
        out[f"{stem}/scores"] = det.scores.numpy()
        out[f"{stem}/classes"] = det.pred_classes.numpy()
        out[f"{stem}/boxes_input"] = det.pred_boxes_input.numpy()
        out[f"{stem}/box_feats"] = det.box_features.numpy()
        out[f"{stem}/attr_probs"] = det.attr_probs.numpy()
    return out


if __name__ == "__main__":
    from gridfeats.api import Detector

    config, dest = sys.argv[1], Path(sys.argv[2])
    det = Detector(config, weights=weights_path(config, dest.parent))
    np.savez(dest, **run(det))
    expected = FIXTURES / f"expected_{config}.npz"
    print(f"wrote {dest}; compare with: python {FIXTURES / 'compare.py'} {expected} {dest}")
