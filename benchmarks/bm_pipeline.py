"""pipeline: loader + augmentation throughput (volumes/s).

Placeholder until ``med3d_ext.data`` and ``med3d_ext.transforms`` land: it records why the area
cannot run. It times nothing yet.
"""

from __future__ import annotations

from .common import UNAVAILABLE, Unavailable, m3d_attr

AREA = "pipeline"


def run(ctx):
    missing = []
    for sub in ("data", "transforms"):
        try:
            m3d_attr(sub)
        except Unavailable as exc:
            missing.append(str(exc))
    reason = "; ".join(missing) if missing else "loader throughput benchmark not written yet (placeholder)"
    ctx.record(AREA, "loader + augmentation", "med3d_ext", UNAVAILABLE, reason)
