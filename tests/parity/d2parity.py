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

    Detectron2's ``detector_postprocess`` scales and clips the detections' box tensor in place, so
    the reference's ``boxes_input``, ``box_feats`` and ``attr_probs`` describe all detections before
    the empty-box filter, on original-pixel boxes; this rebuilds exactly that (``kept`` marks the
    rows that survive, i.e. what :meth:`Detector.detect` returns).
    """
    from gridfeats.api import GRID_RES5_DILATION
    from gridfeats.modeling import postprocess
    from gridfeats.structures import clip_boxes_, scale_boxes_

    model = detector.model
    out: Dict[str, np.ndarray] = {}
    for stem, name in (images or IMAGES).items():
        p = detector.prepare(FIXTURES / "images" / name)
        out[f"{stem}/orig_hw"] = np.array(p.orig_hw, dtype=np.int64)
        out[f"{stem}/input_hw"] = np.array(p.input_hw, dtype=np.int64)
        out[f"{stem}/input_bgr"] = p.image.numpy()
        with torch.inference_mode():
            batch = model.preprocess([p.image])
            if with_grid:
                stages = model.backbone(
                    batch.tensor, res5_dilation=GRID_RES5_DILATION, return_all=True
                )
                grid = model.roi_heads.conv5_features(stages)[0]
                out[f"{stem}/grid"] = grid.numpy()
                out[f"{stem}/grid_shape"] = np.array(grid.shape, dtype=np.int64)
                out[f"{stem}/grid_chanmean"] = grid.mean(dim=(1, 2)).numpy()
                for stage in ("stem", "res2", "res3", "res4", "res5"):
                    if stage in stages:
                        out[f"{stem}/stage_{stage}_chanmean"] = (
                            stages[stage][0].mean(dim=(1, 2)).numpy()
                        )
            features = model.backbone(batch.tensor)
            proposals = model.proposal_generator(batch, features)
            out[f"{stem}/rpn_boxes"] = proposals[0].boxes.numpy()
            out[f"{stem}/rpn_logits"] = proposals[0].logits.numpy()
            raw = model.roi_heads(features, proposals, batch.image_sizes)[0]
            final, keep = postprocess(raw, p.input_hw, p.orig_hw)
            scaled = clip_boxes_(
                scale_boxes_(
                    raw.boxes.clone(), p.orig_hw[1] / p.input_hw[1], p.orig_hw[0] / p.input_hw[0]
                ),
                p.orig_hw,
            )
            feats = model.roi_heads.box_features(features, [scaled])
            out[f"{stem}/boxes"] = final.boxes.numpy()
            out[f"{stem}/scores"] = final.scores.numpy()
            out[f"{stem}/classes"] = final.classes.numpy()
            out[f"{stem}/boxes_input"] = scaled.numpy()
            out[f"{stem}/box_feats"] = feats.numpy()
            out[f"{stem}/attr_probs"] = model.roi_heads.attribute_probs(feats, raw.classes).numpy()
            out[f"{stem}/kept"] = keep.numpy()
    return out


if __name__ == "__main__":
    from gridfeats.api import Detector

    config, dest = sys.argv[1], Path(sys.argv[2])
    det = Detector(config, weights=weights_path(config, dest.parent))
    np.savez(dest, **run(det))
    print(
        f"wrote {dest}; compare with: python {FIXTURES / 'compare.py'} "
        f"{FIXTURES / f'expected_{config}.npz'} {dest}"
    )
