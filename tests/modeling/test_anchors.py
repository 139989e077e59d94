"""DefaultAnchorGenerator (docs/detectron2-facts.md 5.2): the 15 cell anchors, size-major order,
offset 0, grid index ``(y * W + x) * A + a``."""

from __future__ import annotations

import pytest
import torch

from gridfeats.config import get_cfg
from gridfeats.modeling.anchors import (
    DefaultAnchorGenerator,
    build_anchor_generator,
    generate_cell_anchors,
)

SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)

# Half extents (x, y) from the spec's table, size-major, ratio = h / w (wide first).
HALF_EXTENTS = [
    (22.627417, 11.313708),
    (16, 16),
    (11.313708, 22.627417),
    (45.254833, 22.627417),
    (32, 32),
    (22.627417, 45.254833),
    (90.509666, 45.254833),
    (64, 64),
    (45.254833, 90.509666),
    (181.019333, 90.509666),
    (128, 128),
    (90.509666, 181.019333),
    (362.038666, 181.019333),
    (256, 256),
    (181.019333, 362.038666),
]


def _expected_cell_anchors() -> torch.Tensor:
    return torch.tensor([[-hx, -hy, hx, hy] for hx, hy in HALF_EXTENTS], dtype=torch.float32)


def test_cell_anchor_values_and_size_major_order():
    cells = generate_cell_anchors(SIZES, RATIOS)
    assert cells.dtype == torch.float32 and cells.shape == (15, 4)
    torch.testing.assert_close(cells, _expected_cell_anchors(), rtol=0, atol=2e-6)
    # Area is size^2 for every ratio; aspect h/w is the ratio.
    w = cells[:, 2] - cells[:, 0]
    h = cells[:, 3] - cells[:, 1]
    for a in range(15):
        size, ratio = SIZES[a // 3], RATIOS[a % 3]
        assert abs((w[a] * h[a]).item() - size**2) / size**2 < 1e-6
        assert abs((h[a] / w[a]).item() - ratio) < 1e-6


def test_generator_buffer_is_saved_as_cell_anchors_0():
    gen = DefaultAnchorGenerator(SIZES, RATIOS, stride=16)
    state = gen.state_dict()
    assert list(state) == ["cell_anchors.0"]
    torch.testing.assert_close(state["cell_anchors.0"], _expected_cell_anchors(), rtol=0, atol=2e-6)
    assert gen.num_anchors == 15


def test_grid_entry_15_is_the_spec_example():
    gen = DefaultAnchorGenerator(SIZES, RATIOS, stride=16, offset=0.0)
    anchors = gen.grid_anchors((3, 4))
    assert anchors.shape == (3 * 4 * 15, 4)
    torch.testing.assert_close(
        anchors[15], torch.tensor([-6.627417, -11.313708, 38.627419, 11.313708]), rtol=0, atol=2e-6
    )


def test_grid_index_is_y_major_then_x_then_anchor_with_offset_zero():
    gen = DefaultAnchorGenerator(SIZES, RATIOS, stride=16, offset=0.0)
    h, w = 3, 5
    anchors = gen.grid_anchors((h, w))
    cells = _expected_cell_anchors()
    for y in range(h):
        for x in range(w):
            for a in range(15):
                # Centres sit on the cell's top-left corner (16x, 16y): offset 0.
                expected = cells[a] + torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y])
                torch.testing.assert_close(
                    anchors[(y * w + x) * 15 + a], expected, rtol=0, atol=1e-4
                )


def test_nonzero_offset_shifts_by_offset_times_stride_and_bad_offset_is_refused():
    gen = DefaultAnchorGenerator([32], [1.0], stride=16, offset=0.5)
    anchors = gen.grid_anchors((1, 2))
    assert anchors.tolist() == [[-8.0, -8.0, 24.0, 24.0], [8.0, -8.0, 40.0, 24.0]]
    with pytest.raises(ValueError, match="offset"):
        DefaultAnchorGenerator([32], [1.0], stride=16, offset=1.0)


def test_build_from_shipped_config():
    gen = build_anchor_generator(get_cfg("R-50-grid"), stride=16)
    assert gen.stride == 16 and gen.offset == 0.0
    torch.testing.assert_close(gen.cell_anchors[0], _expected_cell_anchors(), rtol=0, atol=2e-6)
    bad = get_cfg("R-50-grid", opts=["MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64]]"])
    with pytest.raises(ValueError, match="single-level"):
        build_anchor_generator(bad, stride=16)
