"""gridfeats.layers: FrozenBatchNorm2d, Conv2d (norm child, per-call stride, folding), NMS dispatch.

Expectations come from docs/detectron2-facts.md sections 3.5, 4.5 and 5.6, written out here by hand:
FrozenBN's formula and load-time version rules, NMS's strict ``IoU > thr`` rule and NaN handling,
and Detectron2@ffff8ac's batched-NMS dispatch (per-class loop from 40000 boxes on).
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gridfeats.layers import Conv2d, FrozenBatchNorm2d, batched_nms, nms

frozen_bn_module = importlib.import_module("gridfeats.layers.frozen_bn")
nms_module = importlib.import_module("gridfeats.layers.box_nms")

EPS = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared: with 2 threads on a loaded machine small ops slow down ~30x (spin waits).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _random_frozen_bn(channels: int, seed: int = 0) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=g))
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.1)
    return bn


def _state_with_version(state: dict, version) -> "OrderedDict[str, torch.Tensor]":
    """A state dict for a root FrozenBN carrying (or not) the per-module version metadata."""
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    if version is not None:
        out._metadata = OrderedDict({"": {"version": version}})
    return out


# --------------------------------------------------------------------------------------------------
# FrozenBatchNorm2d
# --------------------------------------------------------------------------------------------------
def test_frozen_bn_init_is_identity_with_running_var_one_minus_eps():
    bn = FrozenBatchNorm2d(4)
    assert bn.eps == EPS
    torch.testing.assert_close(bn.weight, torch.ones(4), rtol=0, atol=0)
    torch.testing.assert_close(bn.bias, torch.zeros(4), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, torch.zeros(4), rtol=0, atol=0)
    assert torch.equal(bn.running_var, torch.full((4,), 1.0 - EPS, dtype=torch.float32))
    # Buffers, not parameters: nothing in FrozenBN is ever trained.
    assert list(bn.parameters()) == []
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(bn(x), x, rtol=1e-6, atol=1e-6)


def test_frozen_bn_equals_hand_formula():
    bn = _random_frozen_bn(3)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float32)
    xd = x.double()
    expected = torch.empty_like(xd)
    for c in range(3):
        mean, var = bn.running_mean[c].item(), bn.running_var[c].item()
        expected[:, c] = (xd[:, c] - mean) / math.sqrt(var + EPS) * bn.weight[c].item() + bn.bias[
            c
        ].item()
    torch.testing.assert_close(bn(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_frozen_bn_inference_path_is_one_batch_norm_call(monkeypatch):
    calls = []
    real = F.batch_norm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen_bn_module.F, "batch_norm", spy)
    bn = _random_frozen_bn(3)
    x = torch.randn(1, 3, 2, 2)
    out = bn(x)
    assert len(calls) == 1
    assert calls[0]["training"] is False and calls[0]["eps"] == EPS
    # The call gives exactly what F.batch_norm gives (bit-parity with Detectron2's call).
    expected = real(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=EPS)
    assert torch.equal(out, expected)


def test_frozen_bn_training_path_is_affine_and_passes_gradients(monkeypatch):
    bn = _random_frozen_bn(3)
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    called = []
    monkeypatch.setattr(frozen_bn_module.F, "batch_norm", lambda *a, **k: called.append(1))
    y = bn(x)
    assert not called
    scale = bn.weight / torch.sqrt(bn.running_var + EPS)
    torch.testing.assert_close(
        y.detach(),
        (x.detach() - bn.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        + bn.bias.view(1, -1, 1, 1),
        rtol=1e-5,
        atol=1e-5,
    )
    y.sum().backward()
    torch.testing.assert_close(x.grad, scale.view(1, -1, 1, 1).expand_as(x), rtol=1e-6, atol=1e-6)


def test_frozen_bn_load_version_2_subtracts_eps():
    src = _random_frozen_bn(3, seed=1).state_dict()
    bn = FrozenBatchNorm2d(3)
    bn.load_state_dict(_state_with_version(src, 2))
    torch.testing.assert_close(bn.running_var, src["running_var"] - EPS, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, src["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(bn.weight, src["weight"], rtol=0, atol=0)


def test_frozen_bn_load_version_3_is_unchanged():
    src = _random_frozen_bn(3, seed=2).state_dict()
    bn = FrozenBatchNorm2d(3)
    bn.load_state_dict(_state_with_version(src, 3))
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, key), src[key]), key


def test_frozen_bn_load_without_version_fills_missing_stats_and_keeps_present_ones():
    src = _random_frozen_bn(3, seed=3).state_dict()
    bn = FrozenBatchNorm2d(3)
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(7.0)
    # Only the affine: strict loading must still succeed, with identity statistics 0 / 1.
    bn.load_state_dict(
        _state_with_version({"weight": src["weight"], "bias": src["bias"]}, None), strict=True
    )
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert torch.equal(bn.weight, src["weight"])
    # Present statistics are taken as stored (no eps subtraction without a version).
    bn2 = FrozenBatchNorm2d(3)
    bn2.load_state_dict(_state_with_version(src, None))
    assert torch.equal(bn2.running_var, src["running_var"])


def test_frozen_bn_load_version_1_fills_and_subtracts_eps():
    """Detectron2@ffff8ac: version < 2 fills missing stats; then *any* version < 3 subtracts eps."""
    src = _random_frozen_bn(3, seed=4).state_dict()
    bn = FrozenBatchNorm2d(3)
    bn.load_state_dict(_state_with_version(src, 1))
    torch.testing.assert_close(bn.running_var, src["running_var"] - EPS, rtol=0, atol=0)
    bn2 = FrozenBatchNorm2d(3)
    bn2.load_state_dict(_state_with_version({"weight": src["weight"], "bias": src["bias"]}, 1))
    assert torch.equal(bn2.running_mean, torch.zeros(3))
    torch.testing.assert_close(bn2.running_var, torch.ones(3) - EPS, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------------
def test_conv_with_norm_child_names_and_per_call_stride_and_dilation():
    torch.manual_seed(0)
    conv = Conv2d(3, 4, 3, stride=1, padding=1, bias=False, norm=_random_frozen_bn(4))
    assert sorted(conv.state_dict()) == [
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.weight",
        "weight",
    ]
    x = torch.randn(1, 3, 9, 11)
    plain = conv.norm(F.conv2d(x, conv.weight, None, 1, 1, 1))
    torch.testing.assert_close(conv(x), plain, rtol=0, atol=0)
    override = conv(x, stride=2, padding=2, dilation=2)
    expected = conv.norm(F.conv2d(x, conv.weight, None, 2, 2, 2))
    assert override.shape == (1, 4, 5, 6)
    torch.testing.assert_close(override, expected, rtol=0, atol=0)
    # The override is per call: the module's own settings are untouched.
    assert conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (1, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_fold_norm_matches_two_step_within_1e5(bias):
    torch.manual_seed(1)
    conv = Conv2d(6, 8, 3, padding=1, bias=bias, groups=2, norm=_random_frozen_bn(8, seed=5))
    x = torch.randn(2, 6, 7, 7)
    exact = conv(x)
    state_before = {k: v.clone() for k, v in conv.state_dict().items()}
    conv.fold_norm()
    folded = conv(x)
    torch.testing.assert_close(folded, exact, rtol=1e-5, atol=1e-5)
    # Per-call stride also applies to the folded conv (stride 2 samples every other stride-1
    # output).
    torch.testing.assert_close(conv(x, stride=2), folded[..., ::2, ::2], rtol=1e-5, atol=1e-5)
    for k, v in conv.state_dict().items():  # folding never changes the saved tensors
        assert torch.equal(v, state_before[k]), k
    conv.unfold_norm()
    assert torch.equal(conv(x), exact)


# --------------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------------
def test_nms_equal_iou_is_kept_strictly_greater_is_suppressed():
    # Boxes 0 and 1: intersection 2, union 4 -> IoU exactly 0.5.
    boxes = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]
    idxs = torch.zeros(2, dtype=torch.int64)
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, idxs, 0.49).tolist() == [0]


def test_nms_is_greedy_in_score_order():
    # Intervals [0,10], [2,12], [4,14] of height 1: IoU(a,b) = IoU(b,c) = 8/12, IoU(a,c) = 6/14.
    # a suppresses b; b would suppress c but is already gone, and a does not, so c survives.
    boxes = torch.tensor(
        [
            [2.0, 0.0, 12.0, 1.0],
            [0.0, 0.0, 10.0, 1.0],
            [4.0, 0.0, 14.0, 1.0],
            [50.0, 0.0, 60.0, 1.0],
        ]
    )
    scores = torch.tensor([0.8, 0.9, 0.7, 0.1])
    assert nms(boxes, scores, 0.6).tolist() == [1, 2, 3]
    assert nms(boxes, scores, 0.4).tolist() == [1, 3]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2, 3]


def test_nms_exact_ties_follow_torch_descending_sort():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.5, 0.5, 0.5])
    keep = nms(boxes, scores, 0.5)
    assert len(keep) == 1
    assert keep.item() == torch.sort(scores, descending=True)[1][0].item()


def test_nms_empty_boxes_give_nan_iou_and_are_not_suppressed():
    # Two identical zero-area boxes: 0 / 0 IoU is NaN, and NaN > thr is false.
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1, 2]
    assert batched_nms(boxes, scores, torch.zeros(3, dtype=torch.int64), 0.5).tolist() == [0, 1, 2]


def test_batched_nms_is_per_class_and_sorted_by_score():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 9.0],
            [20.0, 20.0, 30.0, 30.0],
        ]
    )
    scores = torch.tensor([0.3, 0.9, 0.6, 0.8])
    classes = torch.tensor([0, 1, 0, 1])
    # Class 0: box 2 (0.6) suppresses box 0 (IoU 0.9). Class 1: boxes 1 and 3 do not overlap.
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [1, 3, 2]
    # One class for all: box 1 suppresses 0 and 2.
    assert batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.5).tolist() == [1, 3]


def _reference_per_class_nms(boxes, scores, classes, thr):
    """Independent per-class greedy NMS in float64 numpy (IoU > thr suppresses), sorted by score."""
    b, sc, cl = boxes.double().numpy(), scores.numpy(), classes.numpy()
    keep = []
    for c in np.unique(cl):
        order = np.nonzero(cl == c)[0]
        order = order[np.argsort(-sc[order], kind="stable")]
        bb = b[order]
        area = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
        lt = np.maximum(bb[:, None, :2], bb[None, :, :2])
        rb = np.minimum(bb[:, None, 2:], bb[None, :, 2:])
        wh = np.clip(rb - lt, 0, None)
        inter = wh[..., 0] * wh[..., 1]
        iou = inter / (area[:, None] + area[None, :] - inter)
        alive = np.ones(len(order), dtype=bool)
        for i in range(len(order)):
            if alive[i]:
                keep.append(order[i])
                alive[i + 1 :] &= ~(iou[i, i + 1 :] > thr)
    keep = np.array(keep, dtype=np.int64)
    return torch.from_numpy(keep[np.argsort(-sc[keep], kind="stable")])


def _many_boxes(n: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randperm(n, generator=g).float() / n  # distinct: no tie ambiguity
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return boxes, scores, classes


def test_reference_nms_agrees_with_torchvision_on_a_small_set():
    """The test's own NMS (used below for 40000 boxes) is itself checked against the kernel."""
    boxes, scores, classes = _many_boxes(300, 1, seed=4)
    assert torch.equal(
        _reference_per_class_nms(boxes, scores, classes, 0.5), nms(boxes, scores, 0.5)
    )


def test_batched_nms_follows_torchvision_below_40000_boxes_and_the_per_class_loop_above():
    from torchvision.ops import batched_nms as tv_batched_nms

    for n, classes in ((900, 40), (39999, 400)):  # the offset trick, then torchvision's loop
        small = _many_boxes(n, classes, seed=1)
        assert torch.equal(batched_nms(*small, 0.5), tv_batched_nms(*small, 0.5))
    # 50 classes of ~800 boxes: thousands of suppressions, so order and membership are both checked.
    big = _many_boxes(40000, 50, seed=2)
    keep = batched_nms(*big, 0.5)
    assert 0 < len(keep) < 40000 - 3000
    assert torch.equal(keep, _reference_per_class_nms(*big, 0.5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_per_class_nms_equals_the_kernel_per_class_with_ties(seed):
    """All classes at once gives the per-class kernel's result bit for bit, also with tied
    scores, identical boxes and IoUs exactly at the threshold (integer coordinates)."""
    g = torch.Generator().manual_seed(seed)
    n = 3000
    xy = (torch.rand(n, 2, generator=g) * 60).round()
    wh = (torch.rand(n, 2, generator=g) * 20 + 1).round()
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = (torch.rand(n, generator=g) * 10).round() / 10
    classes = torch.randint(0, 300, (n,), generator=g)
    keep_mask = torch.zeros(n, dtype=torch.bool)
    for c in classes.unique():
        members = (classes == c).nonzero().view(-1)
        keep_mask[members[nms(boxes[members], scores[members], 0.3)]] = True
    kept = keep_mask.nonzero().view(-1)
    expected = kept[scores[kept].sort(descending=True)[1]]
    assert torch.equal(nms_module.per_class_nms(boxes, scores, classes, 0.3), expected)
    single = classes == classes[0]  # one class: the kernel itself
    assert torch.equal(
        nms_module.per_class_nms(boxes[single], scores[single], classes[single], 0.3),
        nms(boxes[single], scores[single], 0.3),
    )


def no_full_nms_at_all(*args):
    raise AssertionError("the full NMS ran")


def _integer_boxes(n: int, seed: int, ties: str):
    """Integer coordinates (IoUs exactly at thresholds) and scores: distinct (``"none"``),
    distinct plus exact copies of some boxes and their scores (``"suppressed"``: each copy loses
    to its original) or rounded to twentieths (``"kept"``: kept boxes tie too)."""
    g = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=g) * 80).round()
    wh = (torch.rand(n, 2, generator=g) * 30 + 1).round()
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g)
    if ties == "kept":
        scores = (scores * 20).round() / 20
    if ties == "suppressed":
        copies = torch.randperm(n, generator=g)[:50]
        boxes, scores = torch.cat([boxes, boxes[copies]]), torch.cat([scores, scores[copies]])
    return boxes, scores


@pytest.mark.parametrize("chunk", [16, nms_module.MIN_TOP_K_CHUNK])
@pytest.mark.parametrize(
    "n, ties", [(900, "kept"), (2000, "none"), (2000, "suppressed"), (2000, "kept")]
)
def test_nms_top_k_is_the_single_group_batched_nms_cut_at_k(monkeypatch, n, ties, chunk):
    """The RPN's ``batched_nms(one group)[:k]``, exactly: k inside a chunk, at a chunk's end, past
    everything kept, and 0. Up to 1000 boxes that is the kernel's order, which stopping early
    gives also with tied scores; above, batched_nms re-sorts the kept set unstably, so early
    stopping is used only while the kept scores do not tie (the full NMS must not run then,
    also where suppressed boxes tie), and kept ties fall back to the full NMS."""
    monkeypatch.setattr(nms_module, "MIN_TOP_K_CHUNK", chunk)
    boxes, scores = _integer_boxes(n, seed=n + chunk, ties=ties)
    group = torch.zeros(len(boxes), dtype=torch.int64)
    full = batched_nms(boxes, scores, group, 0.7)
    assert 300 < len(full) < n  # suppression happens, and k below exhausts the kept set
    if n <= 1000 or ties != "kept":
        assert torch.equal(full, nms(boxes, scores, 0.7))
        monkeypatch.setattr(nms_module, "batched_nms", no_full_nms_at_all)
    else:  # why the fallback exists: the same kept set, another order among ties
        assert not torch.equal(full, nms(boxes, scores, 0.7))
        assert torch.equal(full.sort().values, nms(boxes, scores, 0.7).sort().values)
    for k in (0, 1, 7, chunk // 2, chunk, 3 * chunk + 1, 300, len(full), len(boxes)):
        assert torch.equal(nms_module.nms_top_k(boxes, scores, 0.7, k), full[:k]), k
    # The fast modes' tie order never runs the full NMS: the kernel's own order, which is the
    # reference's up to the order among tied scores (the same set wherever k-th scores differ).
    monkeypatch.setattr(nms_module, "batched_nms", no_full_nms_at_all)
    kernel = nms(boxes, scores, 0.7)
    for k in (1, chunk, 300, len(full)):
        early = nms_module.nms_top_k(boxes, scores, 0.7, k, exact_tie_order=False)
        assert torch.equal(early, kernel[:k]), k
        assert torch.equal(scores[early], scores[full[:k]]), k
    empty = nms_module.nms_top_k(boxes[:0], scores[:0], 0.7, 10)
    assert empty.dtype == torch.int64 and len(empty) == 0
