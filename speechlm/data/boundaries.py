"""Token boundaries across frame rates: the one conversion of inclusive end frames from one rate to another."""

from __future__ import annotations

import math
from collections.abc import Sequence


def convert_boundaries(boundaries: Sequence[int], from_hz: float, to_hz: float,
                       num_frames: int | None = None) -> list[int]:
    """Inclusive end frames at ``from_hz`` -> at ``to_hz`` (e.g. aligner 50 Hz -> stacked 12.5 Hz).

    A frame b at ``from_hz`` ends at ``(b + 1) / from_hz`` seconds; the new boundary is the frame at
    ``to_hz`` that contains that instant's last sample. Monotone, so order is kept; the result is
    clipped to ``[0, num_frames - 1]`` (only below at 0 when ``num_frames`` is None).
    """
    upper = num_frames - 1 if num_frames is not None else math.inf
    if abs(from_hz - to_hz) < 1e-9:
        return [int(min(max(int(b), 0), upper)) for b in boundaries]
    ratio = to_hz / from_hz
    return [int(min(max(math.ceil((int(b) + 1) * ratio - 1e-6) - 1, 0), upper)) for b in boundaries]
