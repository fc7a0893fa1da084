"""The probe check's known readout: one number that follows a violet object's column."""

from __future__ import annotations

import torch

from launcher.studies.probe_check import column_moment


def scene(column: int) -> torch.Tensor:
    """Black sky, white ground, and a violet 4 x 4 object whose left edge is at ``column``."""
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 50:] = 1.0  # the ground: white, blue equal to green, so it weighs nothing
    image[:, 0, 10:14, column : column + 4] = 0.5
    image[:, 2, 10:14, column : column + 4] = 0.9
    return image


def test_the_column_moment_is_proportional_to_the_objects_offset_from_the_centre() -> None:
    moments = torch.cat([column_moment(scene(c)) for c in (10, 30, 50)]).squeeze(1)
    offsets = torch.tensor([10.0, 30.0, 50.0]) + 1.5 - 31.5
    torch.testing.assert_close(moments, offsets * 16 * 0.9)  # 16 pixels of blue-minus-green 0.9
