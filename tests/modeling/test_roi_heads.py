"""ROI heads: ROIAlignV2 pooling (docs/detectron2-facts.md 6.1), test-time box selection (6.5), the
box head / predictor layout (6.2-6.4) and the attribute loss (7.3), against hand-written
expectations.

The pooling reference below is a direct, slow transcription of the spec's formula in plain Python;
the library uses torchvision's kernel, so agreement checks that kernel's semantics *and* the
pooler's box/scale/aligned plumbing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gridfeats.config import get_cfg
from gridfeats.layers import ShapeSpec
from gridfeats.modeling.roi_heads import build_roi_heads
from gridfeats.modeling.roi_heads.attribute_head import attribute_loss
from gridfeats.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from gridfeats.modeling.roi_heads.pooler import ROIPooler
from gridfeats.structures import Instances


# --------------------------------------------------------------------------------------------------
# ROIAlign reference (docs/detectron2-facts.md 6.1), one box, one channel map given as a list of
# rows
# --------------------------------------------------------------------------------------------------
def _bilinear(fmap, y, x):
    h, w = len(fmap), len(fmap[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[y_low][x_low]
        + hy * lx * fmap[y_low][x_high]
        + ly * hx * fmap[y_high][x_low]
        + ly * lx * fmap[y_high][x_high]
    )


def _roi_align_reference(fmap, box, scale, out, sampling_ratio, aligned=True):
    offset = 0.5 if aligned else 0.0
    x_start, y_start = box[0] * scale - offset, box[1] * scale - offset
    x_end, y_end = box[2] * scale - offset, box[3] * scale - offset
    roi_w, roi_h = x_end - x_start, y_end - y_start
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / out, roi_h / out
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out)
    count = max(grid_h * grid_w, 1)
    result = [[0.0] * out for _ in range(out)]
    for ph in range(out):
        for pw in range(out):
            total = 0.0
            for iy in range(grid_h):
                y = y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x_start + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    total += _bilinear(fmap, y, x)
            result[ph][pw] = total / count
    return result


def _pool(feature, boxes_per_image, out, sampling_ratio, pooler_type="ROIAlignV2"):
    pooler = ROIPooler(out, 1.0 / 16, sampling_ratio, pooler_type)
    return pooler(
        feature, [torch.tensor(b, dtype=torch.float32).view(-1, 4) for b in boxes_per_image]
    )


def test_roialignv2_1x1_hand_value_on_a_linear_map():
    # f(y, x) = 2y + 3x + 1: bilinear interpolation is exact, so the mean of the 4 samples at the
    # quarter points is f at the centre of the -0.5-shifted box.
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feature = (2 * ys + 3 * xs + 1)[None, None]
    # Image box (16, 32, 48, 96) / 16 - 0.5 -> x in [0.5, 2.5], y in [1.5, 5.5]; centre (3.5, 1.5).
    out = _pool(feature, [[(16.0, 32.0, 48.0, 96.0)]], out=1, sampling_ratio=2)
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(2 * 3.5 + 3 * 1.5 + 1, abs=1e-5)
    # Unshifted (legacy ROIAlign) would be centred half a pixel further: f(4, 2) = 15 (not 12.5).
    legacy = _pool(
        feature, [[(16.0, 32.0, 48.0, 96.0)]], out=1, sampling_ratio=2, pooler_type="ROIAlign"
    )
    assert legacy.item() == pytest.approx(2 * 4 + 3 * 2 + 1, abs=1e-5)


def test_roialignv2_out_of_range_samples_are_zero_but_counted():
    feature = torch.ones(1, 1, 4, 4)
    y0, y1 = 16.0, 32.0  # y in [0.5, 1.5]: inside
    # Samples at x = -1 (not < -1: counted with the edge value) and x = 1.
    assert _pool(feature, [[(-24.0, y0, 40.0, y1)]], 1, 2).item() == pytest.approx(1.0)
    # x_start = -2.0625: samples at -1.046875 (outside -> 0) and 0.984375 -> mean 0.5.
    assert _pool(feature, [[(-25.0, y0, 40.0, y1)]], 1, 2).item() == pytest.approx(0.5)
    # Right side, W = 4: samples at 3 and 4 (x = W is not > W: clamped to the last column).
    assert _pool(feature, [[(48.0, y0, 80.0, y1)]], 1, 2).item() == pytest.approx(1.0)
    # x_end = 4.75: samples at 3.0625 and 4.1875 (> W -> 0) -> 0.5.
    assert _pool(feature, [[(48.0, y0, 84.0, y1)]], 1, 2).item() == pytest.approx(0.5)
    # Same rule for y against H; a box entirely outside pools to 0.
    assert _pool(feature, [[(16.0, 48.0, 32.0, 84.0)]], 1, 2).item() == pytest.approx(0.5)
    assert _pool(feature, [[(200.0, 200.0, 260.0, 260.0)]], 1, 2).item() == 0.0


def _random_case(seed, channels=2, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    feature = torch.randn(2, channels, h, w, generator=g)
    boxes = [
        [
            (3.0, 5.0, 60.0, 41.0),
            (-30.0, -10.0, 20.0, 30.0),
            (100.0, 70.0, 130.0, 120.0),
        ],  # image 0
        [(17.3, 9.1, 18.9, 10.2), (0.0, 0.0, 112.0, 96.0)],  # image 1: tiny box, whole map
    ]
    return feature, boxes


def _check_against_reference(feature, boxes, out, sampling_ratio, pooler_type="ROIAlignV2"):
    pooled = _pool(feature, boxes, out, sampling_ratio, pooler_type)
    assert pooled.shape == (sum(len(b) for b in boxes), feature.shape[1], out, out)
    row = 0
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes:
            for c in range(feature.shape[1]):
                fmap = feature[image, c].double().tolist()
                expected = _roi_align_reference(
                    fmap, box, 1.0 / 16, out, sampling_ratio, pooler_type == "ROIAlignV2"
                )
                np.testing.assert_allclose(
                    pooled[row, c].numpy(), np.array(expected), rtol=1e-5, atol=1e-5
                )
            row += 1


def test_roialignv2_1x1_sampling_2_matches_reference_and_reads_each_images_map():
    feature, boxes = _random_case(0)
    _check_against_reference(feature, boxes, out=1, sampling_ratio=2)
    # Rows of image 1 read image 1's map: swapping the maps changes them.
    swapped = _pool(feature.flip(0), boxes, 1, 2)
    assert not torch.allclose(swapped[3:], _pool(feature, boxes, 1, 2)[3:])


def test_roialignv2_14x14_sampling_2_matches_reference():
    feature, boxes = _random_case(1, channels=1)
    _check_against_reference(feature, boxes, out=14, sampling_ratio=2)


def test_roialignv2_adaptive_sampling_ratio_0_matches_reference():
    feature, boxes = _random_case(2)
    # Box 0 of image 0 spans 3.56 x 2.25 feature pixels: a 3 x 4 sample grid (not 2 x 2).
    _check_against_reference(feature, boxes, out=1, sampling_ratio=0)
    assert not torch.allclose(_pool(feature, boxes, 1, 0), _pool(feature, boxes, 1, 2))


def test_legacy_roialign_matches_reference():
    feature, boxes = _random_case(3)
    _check_against_reference(feature, boxes, out=2, sampling_ratio=2, pooler_type="ROIAlign")


def test_pooler_with_no_boxes_and_unknown_type():
    out = _pool(torch.randn(1, 3, 4, 4), [[]], out=2, sampling_ratio=2)
    assert out.shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="ROIPool"):
        ROIPooler(1, 1 / 16, 2, "ROIPool")


# --------------------------------------------------------------------------------------------------
# fast_rcnn_inference_single_image (docs/detectron2-facts.md 6.5)
# --------------------------------------------------------------------------------------------------
def _class_boxes(r: int, k: int):
    """A distinct, non-overlapping box for proposal r and class k."""
    x, y = 100.0 * k + 20.0 * r, 10.0 * r
    return [x, y, x + 10.0, y + 8.0]


def _selection_inputs(probs):
    probs = torch.tensor(probs, dtype=torch.float32)
    r, k1 = probs.shape
    boxes = torch.tensor([sum((_class_boxes(i, k) for k in range(k1 - 1)), []) for i in range(r)])
    return boxes, probs


def _as_pairs(classes, index):
    return list(zip(index.tolist(), classes.tolist()))


def test_selection_threshold_is_strict_and_background_is_last():
    boxes, probs = _selection_inputs(
        [
            [0.30, 0.05, 0.25, 0.40],  # (0,0) > 0.25 kept; (0,2) == 0.25 dropped (strict)
            [0.10, 0.60, 0.20, 0.10],  # (1,1)
            [0.26, 0.02, 0.02, 0.70],  # (2,0); background 0.70 is never a detection
        ]
    )
    out_boxes, scores, classes, index = fast_rcnn_inference_single_image(
        boxes, probs, (1000, 1000), 0.25, 0.5, 100
    )
    assert _as_pairs(classes, index) == [(1, 1), (0, 0), (2, 0)]
    torch.testing.assert_close(scores, torch.tensor([0.60, 0.30, 0.26]))
    assert classes.dtype == torch.int64
    # Class-specific boxes: each detection carries the box of its own class.
    assert out_boxes.tolist() == [_class_boxes(1, 1), _class_boxes(0, 0), _class_boxes(2, 0)]


def test_selection_per_class_nms_and_topk():
    boxes, probs = _selection_inputs(
        [[0.30, 0.05, 0.25, 0.40], [0.10, 0.60, 0.20, 0.10], [0.26, 0.02, 0.02, 0.70]]
    )
    boxes[2, 0:4] = torch.tensor(_class_boxes(0, 0)) + torch.tensor(
        [1.0, 0.0, 1.0, 0.0]
    )  # overlaps (0,0)
    boxes[1, 0:4] = torch.tensor(_class_boxes(0, 0))  # same box as (0,0) but class 1's slot is used
    _, _, classes, index = fast_rcnn_inference_single_image(
        boxes.clone(), probs, (1000, 1000), 0.25, 0.5, 100
    )
    assert _as_pairs(classes, index) == [(1, 1), (0, 0)]  # (2,0) suppressed by (0,0) in class 0
    _, scores, classes, index = fast_rcnn_inference_single_image(
        boxes.clone(), probs, (1000, 1000), 0.25, 0.5, 1
    )
    assert _as_pairs(classes, index) == [(1, 1)] and scores.tolist() == pytest.approx([0.6])
    # Overlap across classes does not suppress: class 1's box equal to class 0's box is still kept.
    boxes[1, 4:8] = torch.tensor(_class_boxes(0, 0))
    _, _, classes, index = fast_rcnn_inference_single_image(
        boxes.clone(), probs, (1000, 1000), 0.25, 0.5, -1
    )
    assert _as_pairs(classes, index) == [(1, 1), (0, 0)]


def test_selection_candidates_are_row_major_for_ties():
    # (0,2) and (1,0) tie at 0.5: proposal-major enumeration puts (0,2) first, and the stable
    # descending sort keeps that order.
    boxes, probs = _selection_inputs([[0.10, 0.10, 0.50, 0.30], [0.50, 0.10, 0.10, 0.30]])
    _, scores, classes, index = fast_rcnn_inference_single_image(
        boxes, probs, (1000, 1000), 0.2, 0.5, 100
    )
    assert _as_pairs(classes, index) == [(0, 2), (1, 0)]
    assert scores.tolist() == [0.5, 0.5]


def test_selection_clips_boxes_and_drops_non_finite_rows():
    boxes, probs = _selection_inputs(
        [[0.9, 0.05, 0.03, 0.02], [0.8, 0.1, 0.05, 0.05], [0.1, 0.7, 0.1, 0.1]]
    )
    boxes[0, 0] = float("nan")
    boxes[1, 0:4] = torch.tensor([-5.0, 10.0, 40.0, 80.0])
    out_boxes, _, classes, index = fast_rcnn_inference_single_image(
        boxes, probs, (50, 30), 0.5, 0.5, 100
    )
    assert _as_pairs(classes, index) == [(1, 0), (2, 1)]  # proposal indices refer to the input rows
    assert out_boxes[0].tolist() == [0.0, 10.0, 30.0, 50.0]


# --------------------------------------------------------------------------------------------------
# Box head, predictor and attribute head on a tiny config
# --------------------------------------------------------------------------------------------------
TINY_HEAD_OPTS = [
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "5",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "6",
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES",
    "7",
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM",
    "3",
    "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM",
    "4",
]


def test_grid_box_head_is_pool_fc1_relu_fc2_relu_and_predictor_layout():
    torch.manual_seed(0)
    heads = build_roi_heads(get_cfg("R-50-grid", opts=TINY_HEAD_OPTS), {"res5": ShapeSpec(8, 16)})
    state = heads.state_dict()
    assert state["box_predictor.cls_score.weight"].shape == (6, 6)  # 5 classes + background
    assert state["box_predictor.bbox_pred.weight"].shape == (
        20,
        6,
    )  # 4 deltas x 5 classes, no background
    assert state["attribute_predictor.fc.0.weight"].shape == (4, 6 + 3)
    assert state["attribute_predictor.obj_embed.weight"].shape == (6, 3)
    feature = torch.randn(1, 8, 5, 5)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [16.0, 8.0, 70.0, 60.0]])
    pooled = ROIPooler(1, 1 / 16, 2)(feature, [boxes]).flatten(1)
    fc1, fc2 = heads.box_head.fc1, heads.box_head.fc2
    expected = F.relu(fc2(F.relu(fc1(pooled))))
    got = heads.box_features({"res5": feature}, [boxes])
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        preds = heads.predict(
            {"res5": feature},
            [Instances((64, 64), proposal_boxes=boxes, objectness_logits=torch.zeros(2))],
        )
    (pred,) = preds
    assert pred.class_probs.shape == (2, 6) and pred.pred_boxes_per_class.shape == (2, 20)
    torch.testing.assert_close(
        pred.class_probs, torch.softmax(heads.box_predictor.cls_score(expected), dim=-1)
    )
    attrs = heads.attribute_probs(expected, torch.tensor([0, 4]))
    embed = heads.attribute_predictor.obj_embed.weight[[0, 4]]
    logits = heads.attribute_predictor.attr_score(
        F.relu(heads.attribute_predictor.fc[0](torch.cat([expected, embed], 1)))
    )
    torch.testing.assert_close(attrs, torch.softmax(logits, dim=-1))


def test_class_probabilities_alone_skip_the_box_delta_layer(monkeypatch):
    torch.manual_seed(0)
    heads = build_roi_heads(get_cfg("R-50-grid", opts=TINY_HEAD_OPTS), {"res5": ShapeSpec(8, 16)})
    features = {"res5": torch.randn(1, 8, 5, 5)}
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [16.0, 8.0, 70.0, 60.0]])
    proposals = [Instances((64, 64), proposal_boxes=boxes, objectness_logits=torch.zeros(2))]
    with torch.no_grad():
        (full,) = heads.predict(features, proposals)
        delta_calls = []
        heads.box_predictor.bbox_pred.register_forward_hook(lambda *a: delta_calls.append(1))
        (probs_only,) = heads.predict(features, proposals, class_boxes=False)
    assert delta_calls == [] and not probs_only.has("pred_boxes_per_class")
    assert torch.equal(probs_only.class_probs, full.class_probs)
    assert torch.equal(probs_only.box_features, full.box_features)


def test_updn_head_is_res5_then_mean():
    torch.manual_seed(0)
    opts = TINY_HEAD_OPTS + [
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "8",
        "MODEL.RESNETS.WIDTH_PER_GROUP",
        "2",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
        "4",
    ]
    heads = build_roi_heads(get_cfg("R-50-updn", opts=opts), {"res4": ShapeSpec(32, 16)})
    feature = torch.randn(1, 32, 6, 6)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 60.0]])
    pooled = ROIPooler(4, 1 / 16, 2)(feature, [boxes])
    x = pooled
    for block in heads.res5:
        x = block(x)
    assert x.shape == (1, 64, 2, 2)  # stride 2, 8 * RES2_OUT_CHANNELS channels
    torch.testing.assert_close(heads.box_features({"res4": feature}, [boxes]), x.mean(dim=[2, 3]))


def test_updn_inference_runs_res5_in_chunks_with_the_same_values(monkeypatch):
    """Chunking the per-region res5 at inference changes nothing, bit for bit, in either mode's
    layout; training (autograd) keeps one call."""
    from gridfeats.modeling.roi_heads import roi_heads as module

    torch.manual_seed(1)
    opts = TINY_HEAD_OPTS + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "16"]
    opts += ["MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "6"]
    heads = build_roi_heads(get_cfg("R-50-updn", opts=opts), {"res4": ShapeSpec(64, 16)}).eval()
    calls = []
    heads.res5[0].register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    g = torch.Generator().manual_seed(2)
    corner = torch.rand(2, 70, 2, generator=g) * 150
    boxes = [torch.cat([c, c + 20 + torch.rand(70, 2, generator=g) * 120], 1) for c in corner]
    for layout in (torch.contiguous_format, torch.channels_last):
        feature = torch.randn(2, 64, 12, 14).contiguous(memory_format=layout)
        with torch.inference_mode():
            monkeypatch.setattr(module, "REGIONS_PER_RES5_CALL", 1000)
            whole = heads.box_features({"res4": feature}, boxes)
            monkeypatch.setattr(module, "REGIONS_PER_RES5_CALL", 32)
            calls.clear()
            chunked = heads.box_features({"res4": feature}, boxes)
        assert calls == [32, 32, 6, 32, 32, 6]
        assert torch.equal(chunked, whole)
    calls.clear()
    with torch.no_grad():  # evaluation during training chunks too
        heads.box_features({"res4": feature}, boxes)
    assert calls == [32, 32, 6, 32, 32, 6]
    calls.clear()
    heads.box_features({"res4": feature}, boxes)  # grad enabled: one call, as in training
    assert calls == [140]


def test_attribute_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    labels = torch.tensor([[0, 2, -1], [-1, -1, -1], [1, -1, -1]])
    lse0 = math.log(math.exp(2) + 1 + math.exp(-1))
    lse2 = math.log(math.e + math.exp(3) + 1)
    # Instance 0: mean of CE(label 0), CE(label 2); instance 1 has no label (not counted);
    # instance 2: CE(label 1). Mean over the 2 attributed instances, times 0.2.
    inst0 = ((lse0 - 2.0) + (lse0 + 1.0)) / 2
    inst2 = lse2 - 3.0
    assert attribute_loss(logits, labels).item() == pytest.approx(
        0.2 * (inst0 + inst2) / 2, rel=1e-6
    )
    none = attribute_loss(logits.requires_grad_(), torch.full((3, 3), -1))
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize("score_thresh", [0.143, 0.0])  # some pairs pass; all pass (dense path)
def test_sparse_box_deltas_select_what_the_dense_path_selects(score_thresh):
    """The fast mode's detect_sparse: deltas only for pairs above the threshold, same result."""
    from gridfeats.api import Detector
    from gridfeats.config import get_cfg

    torch.manual_seed(0)
    cfg = get_cfg(
        "demo-synthetic",
        opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", score_thresh, "INPUT.MIN_SIZE_TEST", 128],
    )
    detector = Detector(cfg)
    pictures = [(torch.rand(150, 200, 3) * 255).to(torch.uint8).numpy() for _ in range(2)]
    heads = detector.model.roi_heads
    with torch.inference_mode():  # a batch of two: each image's own map, also on the fallback
        images = detector._batch([detector.prepare(p) for p in pictures], [0, 1])
        features = detector.model.backbone(images.tensor)
        proposals, _ = detector.model.proposal_generator(images, features)
        dense_results = heads.select(heads.predict(features, proposals))
        sparse_results = heads.detect_sparse(features, proposals)
    for dense, sparse in zip(dense_results, sparse_results):
        assert len(dense) > 0
        assert torch.equal(sparse.pred_classes, dense.pred_classes)
        assert torch.equal(sparse.proposal_index, dense.proposal_index)
        assert torch.equal(sparse.scores, dense.scores)
        torch.testing.assert_close(sparse.pred_boxes, dense.pred_boxes, rtol=0, atol=1e-3)
