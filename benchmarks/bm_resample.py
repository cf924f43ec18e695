"""resample: trilinear resize (8 x 128^3 -> 96^3 on a GPU) vs ``F.interpolate``, and resampling
a volume to a new voxel spacing vs ``F.interpolate`` to the equivalent size.

``resize`` and ``resample_to_spacing`` are looked up at run time (ops, then transforms/data);
their keyword names are read from their signatures, so a differently spelt option becomes an
'unavailable' or 'error' row with the reason, not a crash.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .common import Unavailable, m3d_attr, op_backend

AREA = "resample"


def _find(name):
    reasons = []
    for where in ("ops", "transforms", "data"):
        try:
            return m3d_attr(f"{where}.{name}"), f"med3d_ext.{where}.{name}"
        except Unavailable as exc:
            reasons.append(str(exc))
    raise Unavailable("; ".join(reasons))


def _linear_mode_kw(fn):
    """Keyword that selects linear interpolation, if the signature has a mode option."""
    try:
        p = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "mode" not in p:
        return {}
    d = p["mode"].default
    if isinstance(d, str) and d in ("trilinear", "bilinear", "linear"):
        return {}
    return {"mode": "trilinear"}


def run(ctx):
    dev = ctx.device
    if ctx.gpu:
        b, s, t = 8, 128, 96
    else:
        b, s, t = (1, 32, 24) if ctx.quick else (1, 96, 72)
    x = torch.randn(b, 1, s, s, s, device=dev)
    out = (t, t, t)
    params = {"x": list(x.shape), "size": list(out), "dtype": "float32", "mode": "trilinear",
              "align_corners": False}
    nbytes = x.numel() * 4 + b * t**3 * 4
    case = ctx.case(AREA, f"resize {b}x{s}^3->{t}^3", params=params, rtol=1e-4, atol=1e-4, bytes_floor=nbytes)
    case.add("eager F.interpolate", lambda: (lambda: F.interpolate(x, size=out, mode="trilinear",
                                                                   align_corners=False)),
             baseline=True, reference=True)

    def ours():
        fn, where = _find("resize")
        kw = _linear_mode_kw(fn)
        return lambda: fn(x, out, **kw)
    case.add("med3d_ext resize", ours, note=op_backend("resize", ctx.device))
    if ctx.with_compile:
        case.add("torch.compile F.interpolate", lambda: (lambda f=torch.compile(F.interpolate): f(
            x, size=out, mode="trilinear", align_corners=False)), baseline=True)
    case.run()

    # to a new spacing: 1 mm -> 1.5 mm isotropic on one volume
    src, dst = (1.0, 1.0, 1.0), (1.5, 1.5, 1.5)
    v = x[:1]
    new = tuple(int(round(n * a / c)) for n, a, c in zip(v.shape[2:], src, dst))
    params2 = {"x": list(v.shape), "spacing": list(src), "new_spacing": list(dst), "out": list(new),
               "dtype": "float32"}
    case = ctx.case(AREA, f"resample_to_spacing 1x{s}^3 1->1.5mm", params=params2, rtol=1e-4, atol=1e-4,
                    bytes_floor=v.numel() * 4 + 4 * new[0] * new[1] * new[2])

    def call(fn):
        try:
            names = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            names = []
        sp = [n for n in names if "spacing" in n]
        if len(sp) < 2:
            raise Unavailable(f"resample_to_spacing signature {names} has no (spacing, new spacing) pair")
        return lambda: fn(v, **{sp[0]: src, sp[1]: dst})

    def reference():
        try:
            return call(m3d_attr("reference.resample_to_spacing"))
        except Unavailable:
            return lambda: F.interpolate(v, size=new, mode="trilinear", align_corners=False)
    case.add("reference (med3d_ext.reference or F.interpolate)", reference, baseline=True, reference=True)
    case.add("med3d_ext resample_to_spacing", lambda: call(_find("resample_to_spacing")[0]),
             note=op_backend("resize", ctx.device))  # it runs the resize op
    case.run()
