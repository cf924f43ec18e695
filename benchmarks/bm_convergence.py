"""convergence: transfer vs from-scratch convergence study (paper: 2-10x faster).

The study itself lives in ``benchmarks/convergence_study.py`` (also a CLI:
``python -m benchmarks.convergence_study``) and defines ``run(ctx)``; without that file this
area records 'unavailable'.
"""

from __future__ import annotations

import importlib

from .common import UNAVAILABLE

AREA = "convergence"


def run(ctx):
    try:
        study = importlib.import_module(".convergence_study", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.convergence_study":
            raise  # the study exists but needs something missing: the area error says what
        ctx.record(AREA, "transfer vs scratch", "med3d_ext", UNAVAILABLE,
                   f"study script benchmarks/convergence_study.py not added yet ({exc.name})")
        return
    study.run(ctx)
