"""Detector training on small seeded models: the loss formulas by hand (detectron2-compat.md 5.7,
6.7, 7.3), anchor labelling rules, ROI sampling, both ROI head types, FREEZE_AT and proposal
injection. The full-size check against real Detectron2 is test_d2train.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gridfeats
from gridfeats.modeling.box_coder import Box2BoxTransform
from gridfeats.modeling.matcher import Matcher
from gridfeats.modeling.roi_heads.attribute_head import attribute_loss
from gridfeats.modeling.roi_heads.fast_rcnn import fast_rcnn_losses
from gridfeats.modeling.rpn import label_anchors, rpn_losses
from gridfeats.structures import Instances

TINY = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.ROI_HEADS.NUM_CLASSES", "5",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "16", "MODEL.ROI_ATTRIBUTE_HEAD.NUM_CLASSES", "7",
    "MODEL.ROI_ATTRIBUTE_HEAD.OBJ_EMBED_DIM", "4", "MODEL.ROI_ATTRIBUTE_HEAD.FC_DIM", "8",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
]  # fmt: skip
LOSS_NAMES = {"loss_cls", "loss_box_reg", "loss_attr", "loss_rpn_cls", "loss_rpn_loc"}


def _batch(with_proposals: bool = False):
    g = torch.Generator().manual_seed(0)
    items = []
    for h, w, boxes, classes in (
        (64, 96, [[8.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 40.0]], [1, 3]),
        (80, 64, [[4.0, 20.0, 60.0, 70.0]], [4]),
    ):
        attrs = torch.full((len(boxes), 16), -1, dtype=torch.int64)
        attrs[0, :2] = torch.tensor([2, 5])
        item = {
            "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
            "instances": {
                "gt_boxes": torch.tensor(boxes),
                "gt_classes": torch.tensor(classes),
                "gt_attributes": attrs,
            },
        }
        if with_proposals:
            item["proposals"] = {
                "proposal_boxes": torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 8.0, 40.0, 48.0]]),
                "objectness_logits": torch.tensor([1.0, 0.5]),
            }
        items.append(item)
    return items


def _model(config: str = "R-50-grid", *opts: str):
    torch.manual_seed(0)
    return gridfeats.build_model(gridfeats.get_cfg(config, opts=[*TINY, *opts]))


# -- formulas -------------------------------------------------------------------------------------


def test_rpn_losses_are_sums_over_sampled_anchors():
    labels = torch.tensor([1, 0, -1, 1, 0], dtype=torch.int8)
    logits = torch.tensor([2.0, -1.0, 5.0, 0.5, 0.3])
    pred = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [9.0] * 4, [9.0] * 4, [0.05, -0.2, 0.0, 1.0], [9.0] * 4]
    )
    target = torch.zeros(5, 4)
    obj, loc = rpn_losses(labels, target, logits, pred, smooth_l1_beta=0.1)
    bce = sum(math.log1p(math.exp(-x)) for x in (2.0, 0.5)) + sum(
        math.log1p(math.exp(x)) for x in (-1.0, 0.3)
    )
    # smooth-L1 (beta 0.1): 0.5 x^2 / beta below beta, |x| - beta / 2 above; ignored rows unused
    l1 = 0.5 * 0.05**2 / 0.1 + (0.2 - 0.05) + 0.0 + (1.0 - 0.05)
    assert obj.item() == pytest.approx(bce, rel=1e-6) and loc.item() == pytest.approx(l1, rel=1e-6)


def test_fast_rcnn_losses_divide_box_loss_by_all_sampled_proposals():
    box2box = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[1.0, 0.0, 11.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 9.0, 9.0]])
    classes = torch.tensor([1, 0, 2])  # 2 foreground classes, background = 2
    logits = torch.tensor([[0.5, 1.0, -1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    deltas = torch.zeros(3, 8)
    deltas[0, 4:8] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # class 1 columns of proposal 0
    deltas[0, 0:4] = 7.0  # another class's columns: never read
    losses = fast_rcnn_losses(logits, deltas, proposals, gt, classes, box2box, smooth_l1_beta=1.0)
    assert losses["loss_cls"].item() == pytest.approx(F.cross_entropy(logits, classes).item())
    # proposal 0: target dx = 10 * 1 / 10 = 1.0, predicted 0.5 -> smooth-L1 0.5 * 0.5^2 = 0.125;
    # proposal 1: exact; background proposal 2 adds nothing but counts in the divisor (3)
    assert losses["loss_box_reg"].item() == pytest.approx(0.125 / 3, rel=1e-6)


def test_attribute_loss_weights_rows_by_their_label_count():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([[2, 0, 1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])

    def ce(row, k):
        return math.log(sum(math.exp(v) for v in logits[row].tolist())) - logits[row, k].item()

    row0 = (ce(0, 2) + ce(0, 0) + ce(0, 1)) / 3
    row1 = ce(1, 0)
    expected = 0.5 * (row0 + row1) / 2  # 2 rows with labels; row 2 has none
    assert attribute_loss(logits, labels, loss_weight=0.5).item() == pytest.approx(
        expected, rel=1e-6
    )
    empty = attribute_loss(
        torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 4, dtype=torch.long)
    )
    assert empty.item() == 0.0 and empty.requires_grad


def test_anchor_labels_ignore_anchors_outside_the_unpadded_image():
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # matches the gt exactly, inside
            [-1.0, 0.0, 9.0, 10.0],  # IoU 0.82 but x0 < 0: ignored
            [30.0, 0.0, 40.0, 10.0],  # x1 = 40 = w: outside (strict <), ignored
            [20.0, 0.0, 30.0, 10.0],  # inside, IoU 0: negative
            [0.0, 30.0, 10.0, 41.0],  # beyond the image height (h = 40): ignored
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    labels, matched = label_anchors(anchors, gt, (40, 40), matcher, boundary_threshold=0)
    assert labels.tolist() == [1, -1, -1, 0, -1] and matched.tolist() == [0] * 5
    kept, _ = label_anchors(anchors, gt, (40, 40), matcher, boundary_threshold=-1)
    assert kept.tolist() == [1, 1, 0, 0, 0]  # without the boundary rule: IoU 0.82 >= 0.7 positive
    # no ground truth: every anchor inside is negative
    none, _ = label_anchors(anchors, torch.zeros(0, 4), (40, 40), matcher, 0)
    assert none.tolist() == [0, -1, -1, 0, -1]


# -- the model ------------------------------------------------------------------------------------


def test_build_model_trains_with_freeze_at_and_returns_detectron2_loss_names(one_thread, tmp_path):
    model = _model()
    assert model.training
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.stem.", "backbone.res2.")) for n in frozen)
    assert not any(n.startswith("backbone.res3.") for n in frozen)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # FrozenBN
    torch.manual_seed(1)
    losses = model(_batch())
    assert set(losses) == LOSS_NAMES and all(v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    # the class embedding learns only the rows of gt classes fed to it (1, 3, 4), never background
    embed = grads["roi_heads.attribute_predictor.obj_embed.weight"]
    assert set(embed.abs().sum(dim=1).nonzero().view(-1).tolist()) <= {1, 3, 4}
    assert embed[5].abs().sum() == 0
    # weights given to build_model are loaded, and loading does not unfreeze anything
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    again = gridfeats.build_model(model_cfg := gridfeats.get_cfg("R-50-grid", opts=TINY), path)
    assert again.training and model_cfg.MODEL.BACKBONE.FREEZE_AT == 2
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == frozen


def test_configured_loss_weights_multiply_the_losses(one_thread):
    base = _model()
    torch.manual_seed(1)
    ref = base(_batch())
    weighted = _model(
        "R-50-grid", "MODEL.RPN.LOSS_WEIGHT", "2.0", "MODEL.RPN.BBOX_LOSS_WEIGHT", "0.5",
        "MODEL.ROI_BOX_HEAD.BBOX_LOSS_WEIGHT", "0.0", "MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT", "1.0",
    )  # fmt: skip
    torch.manual_seed(1)
    got = weighted(_batch())
    torch.testing.assert_close(got["loss_rpn_cls"], 2.0 * ref["loss_rpn_cls"])
    torch.testing.assert_close(got["loss_rpn_loc"], 1.0 * ref["loss_rpn_loc"])
    assert got["loss_box_reg"].item() == 0.0
    torch.testing.assert_close(got["loss_attr"], ref["loss_attr"] / 0.2)
    torch.testing.assert_close(got["loss_cls"], ref["loss_cls"])


def test_rpn_normaliser_is_batch_size_per_image_times_images(one_thread):
    model = _model()
    torch.manual_seed(1)
    a = model(_batch())
    model.proposal_generator.batch_size_per_image = 512  # twice the sampled anchors allowed ...
    torch.manual_seed(1)
    b = model(_batch())
    # ... but the tiny images have fewer labelled anchors than 256, so the same anchors are used:
    # only the fixed normaliser 1 / (512 * 2) instead of 1 / (256 * 2) changes
    torch.testing.assert_close(b["loss_rpn_cls"], a["loss_rpn_cls"] / 2)
    torch.testing.assert_close(b["loss_rpn_loc"], a["loss_rpn_loc"] / 2)


def test_roi_sampling_appends_gt_and_carries_gt_fields(one_thread):
    heads = _model().roi_heads
    target = Instances(
        (64, 96),
        gt_boxes=torch.tensor([[8.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 40.0]]),
        gt_classes=torch.tensor([1, 3]),
        gt_attributes=torch.tensor([[2, -1], [4, 6]]),
    )
    proposals = Instances(
        (64, 96),
        proposal_boxes=torch.tensor([[9.0, 6.0, 40.0, 50.0], [0.0, 0.0, 5.0, 5.0]]),
        objectness_logits=torch.tensor([3.0, 2.0]),
    )
    empty = Instances((64, 96), gt_boxes=torch.zeros(0, 4), gt_classes=torch.zeros(0).long(),
                      gt_attributes=torch.zeros(0, 2).long())  # fmt: skip
    torch.manual_seed(0)
    sampled, no_gt = heads.label_and_sample_proposals([proposals, proposals], [target, empty])
    # 2 proposals + 2 appended gt boxes; IoU >= 0.5 -> foreground first: proposal 0 and both gts
    assert len(sampled) == 4
    fg = sampled.gt_classes < heads.num_classes
    assert fg.tolist() == [True, True, True, False]
    by_box = {tuple(b.tolist()): i for i, b in enumerate(sampled.proposal_boxes)}
    for box, cls, attrs in (
        ((9.0, 6.0, 40.0, 50.0), 1, [2, -1]),
        ((50.0, 10.0, 90.0, 40.0), 3, [4, 6]),
    ):
        i = by_box[box]
        assert sampled.gt_classes[i] == cls and sampled.gt_attributes[i].tolist() == attrs
    assert sampled.gt_classes[3] == heads.num_classes
    assert tuple(sampled.proposal_boxes[3].tolist()) == (0.0, 0.0, 5.0, 5.0)
    # an image without gt: every proposal is background with zero gt boxes
    assert no_gt.gt_classes.tolist() == [heads.num_classes] * 2
    assert no_gt.gt_boxes.abs().sum() == 0 and (no_gt.gt_attributes == -1).all()


def test_precomputed_proposals_feed_the_roi_heads_while_the_rpn_keeps_its_losses(one_thread):
    model = _model()
    torch.manual_seed(1)
    own = model(_batch())
    torch.manual_seed(1)
    injected = model(_batch(with_proposals=True))
    torch.testing.assert_close(injected["loss_rpn_cls"], own["loss_rpn_cls"])
    torch.testing.assert_close(injected["loss_rpn_loc"], own["loss_rpn_loc"])
    assert injected["loss_cls"].item() != own["loss_cls"].item()
    sampled = []
    handle = model.roi_heads.register_forward_hook(lambda m, i, o: sampled.extend(o[0]) and None)
    model(_batch(with_proposals=True))
    handle.remove()
    # 2 given proposals + the gt boxes per image, nothing from the RPN
    assert [len(s) for s in sampled] == [4, 3]


def test_res5_roi_heads_train_too(one_thread):
    model = _model("R-50-updn", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4")
    torch.manual_seed(1)
    losses = model(_batch())
    assert set(losses) == LOSS_NAMES
    sum(losses.values()).backward()
    assert model.roi_heads.res5[0].conv1.weight.grad.abs().sum() > 0
    assert model.roi_heads.attribute_predictor.attr_score.weight.grad.abs().sum() > 0


def test_unsupported_training_option_is_a_clear_error():
    with pytest.raises(ValueError, match="TRAIN_ON_PRED_BOXES"):
        _model("R-50-grid", "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", "True")
