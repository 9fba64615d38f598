"""The plausible range of a whole-slide scan's level-0 MPP, applied to every place an MPP comes from.

A TIFF writer's screen default (72 dpi = 352.8 µm/px) or a missing unit is not a scan resolution;
tiling with it cuts 448 µm tiles from one or two level-0 pixels and upsamples them to noise.
"""

from __future__ import annotations

from collections.abc import Sequence

from eagleflow.errors import EagleflowError

# Scanners record 0.1-0.5 µm/px at 40x-20x; 10 µm/px is a 1x overview, 0.05 a 200x oil scan.
DEFAULT_MPP_RANGE = (0.05, 10.0)


class MppConfigError(EagleflowError, ValueError):
    """tiling.mpp_range or tiling.default_mpp is wrong; the message names the key."""


def outside_range(mpp: float, mpp_range: Sequence[float]) -> str:
    """'' when `mpp` is plausible, else 'outside the plausible range ...' (to follow the value)."""
    low, high = mpp_range
    if low <= mpp <= high:
        return ""
    return (
        f"outside the plausible range {low:g}-{high:g} µm/px for whole-slide scans "
        "(tiling.mpp_range)"
    )


def check_mpp_settings(mpp_range: Sequence[float], default_mpp: float | None) -> None:
    """Refuse an empty or non-positive tiling.mpp_range and a tiling.default_mpp outside it."""
    if len(mpp_range) != 2 or not 0 < mpp_range[0] < mpp_range[1]:
        raise MppConfigError(
            f"tiling.mpp_range must be [low, high] µm/px with 0 < low < high, not {list(mpp_range)}"
        )
    if default_mpp is not None and (problem := outside_range(default_mpp, mpp_range)):
        raise MppConfigError(
            f"tiling.default_mpp: {default_mpp:g} µm/px is {problem}. Set the MPP your scanner records (0.25 at 40x, "
            "0.5 at 20x), or null to require one from each slide or the sheet."
        )
