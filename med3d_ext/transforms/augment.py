"""RandomAugment3D: batched, seeded spatial + intensity augmentation in one fused op call."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch

from .._args import ArgumentTypeError, int_arg, is_int, real_arg
from ..ops.resample import affine_resample_pair

__all__ = ["RandomAugment3D"]


# a wrong type is a TypeError (the README's rule) and a ValueError, as these arguments' errors
# were before
_ArgTypeError = ArgumentTypeError


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _triple(name, v, nonneg: bool = False) -> tuple[float, float, float]:
    """One number or 3 (x, y, z), finite: a NaN or inf angle/shift makes theta NaN, and every
    sample silently comes out as padding (zeros). A bool is no number (flip=True read as
    probability 1). ``nonneg``: a maximum magnitude (rotate=-0.5 acted as +0.5)."""
    vals = (v,) * 3 if _number(v) else (tuple(v) if isinstance(v, Sequence) and not
                                        isinstance(v, str) else None)
    if vals is None or len(vals) != 3 or not all(_number(x) for x in vals):
        raise _ArgTypeError(f"RandomAugment3D: '{name}' must be a finite number or 3 finite "
                            f"numbers (x, y, z), got {v!r}")
    if not all(math.isfinite(x) and (not nonneg or x >= 0) for x in vals):
        raise ValueError(f"RandomAugment3D: '{name}' must be a finite "
                         f"{'non-negative ' if nonneg else ''}number or 3 of them (x, y, z)"
                         f"{' (a maximum magnitude)' if nonneg else ''}, got {v!r}")
    return tuple(float(x) for x in vals)


def _range(name, v, lo_bound=None) -> tuple[float, float]:
    if isinstance(v, Sequence) and len(v) == 2 and all(
            isinstance(x, numbers.Real) and math.isfinite(x) for x in v):
        lo, hi = float(v[0]), float(v[1])
        if lo <= hi and (lo_bound is None or lo >= lo_bound):
            return lo, hi
    raise ValueError(f"RandomAugment3D: '{name}' must be a finite (low, high) range"
                     f"{'' if lo_bound is None else f' with low >= {lo_bound}'}, got {v!r}")


def _grid(name, v) -> list[int]:
    """An output grid as a list of ints: one int means a cube (as ``--patch 48`` does, so that
    ``aug(image, label, patch, label_size=patch // 4)`` works for an int patch too); a tensor or
    array of sizes (``patch // 4`` of one) is read as its values."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    elif hasattr(v, "tolist") and not isinstance(v, (list, tuple)):  # numpy array / scalar
        v = v.tolist()
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v] * 3
    elif isinstance(v, (Sequence, torch.Size)) and not isinstance(v, str):
        out = []
        for x in v:  # operator.index: 4.5 or True is refused, not truncated to 4 or 1
            if isinstance(x, bool):
                x = None
            try:
                out.append(operator.index(x))
            except TypeError:
                raise _ArgTypeError(f"RandomAugment3D: '{name}' must be an int or 3 ints, "
                                     f"got {v!r}") from None
        v = out
    else:
        raise _ArgTypeError(f"RandomAugment3D: '{name}' must be an int or 3 ints, got {v!r}")
    if any(x < 0 for x in v):
        raise ValueError(f"RandomAugment3D: '{name}' must not be negative, got {v!r}")
    return v


def _prob(name, v) -> float:
    # a number only: float("0.5") and float(None) made a string pass and None fail unnamed
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise _ArgTypeError(f"RandomAugment3D: '{name}' must be a probability in [0, 1], got "
                             f"{v!r}")
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"RandomAugment3D: '{name}' must be a probability in [0, 1], got {v}")
    return v


def _seed(v) -> int:
    """A generator seed: an integer torch.Generator.manual_seed takes (int(1.5) would silently
    give 1, True 1; 2**70 failed only at the first call, inside manual_seed)."""
    if not is_int(v):
        raise _ArgTypeError(f"RandomAugment3D: 'seed' must be an integer in [-2^63, 2^64), got "
                            f"{v!r}")
    i = operator.index(v)  # (a 0-d integer tensor works too, as it did)
    if not -2**63 <= i < 2**64:
        raise ValueError(f"RandomAugment3D: 'seed' must be an integer in [-2^63, 2^64), got {v!r}")
    return i


def _per_axis_scale(scale) -> bool:
    return (isinstance(scale, Sequence) and len(scale) == 3
            and all(isinstance(r, Sequence) for r in scale))


def _scale(scale):
    return tuple(_range("scale", r, lo_bound=1e-6)
                 for r in (scale if _per_axis_scale(scale) else (scale,) * 3))


def _flag(name):
    def check(v):
        if not isinstance(v, (bool, np.bool_)):  # bool("no") is True
            raise _ArgTypeError(f"RandomAugment3D: '{name}' must be True or False, got {v!r}")
        return bool(v)
    return check


def _padding(v):
    if v not in ("zeros", "border", "reflection"):  # else only the first call says
        raise ValueError("RandomAugment3D: 'padding_mode' must be 'zeros', 'border' or "
                         f"'reflection', got {v!r}")
    return v


# RandomAugment3D's parameters and their checks (each returns the normalised value)
_PARAMETERS = {
    "rotate": lambda v: _triple("rotate", v, nonneg=True),
    "scale": _scale,
    "isotropic": _flag("isotropic"),
    "translate": lambda v: _triple("translate", v, nonneg=True),
    "flip": lambda v: tuple(_prob("flip", p) for p in _triple("flip", v)),
    "elastic": lambda v: real_arg("RandomAugment3D: 'elastic' must be a finite number >= 0",
                                  v, 0.0),
    # a coarse grid: a larger one is a full-resolution field, which this op avoids (and
    # 10**6 failed only at the first call, allocating (N, 3, g, g, g))
    "elastic_grid": lambda v: int_arg("RandomAugment3D: 'elastic_grid' must be an int in "
                                      "[2, 256]", v, 2, 256),
    "gamma": lambda v: _range("gamma", v, lo_bound=1e-6),
    "contrast": lambda v: _range("contrast", v),
    "brightness": lambda v: _range("brightness", v),
    "noise": lambda v: _range("noise", v, lo_bound=0.0),
    "clip": lambda v: None if v is None else _range("clip", v),
    "padding_mode": _padding,
    "align_corners": _flag("align_corners"),
    "seed": _seed,
    **{p: (lambda v, p=p: _prob(p, v)) for p in ("p_affine", "p_elastic", "p_gamma",
                                                  "p_contrast", "p_brightness", "p_noise")},
}


# The columns of RandomAugment3D.sample's one uniform draw per sample (a fixed number of draws
# per call, whatever applies, so that a stream stays reproducible): the affine's coin, angles,
# zooms, shifts (x, y, z each), three flip coins, the elastic coin, then gamma, contrast,
# brightness and noise, each followed by its coin. A value column holds low + u * span where
# its coin says the transform applies, and a neutral value elsewhere (RandomAugment3D._columns).
_COLUMNS = 22
_P_AFFINE, _ANGLE, _ZOOM, _SHIFT, _FLIP, _P_ELASTIC = 0, 1, 4, 7, 10, 13
_GAMMA, _CONTRAST, _BRIGHTNESS, _NOISE = 14, 16, 18, 20


def _rotation_basis() -> torch.Tensor:
    """(3 terms, 3 axes, 3, 3): the rotation about axis a by angle t is
    B[0, a] + cos(t) B[1, a] + sin(t) B[2, a] (axes x, y, z as Rx, Ry, Rz)."""
    # float32 whatever torch's default dtype (the whole draw is)
    b = torch.zeros(3, 3, 3, 3, dtype=torch.float32)
    for a in range(3):
        i, j = [k for k in range(3) if k != a]  # the plane of the rotation
        b[0, a, a, a] = 1.0
        b[1, a, i, i] = b[1, a, j, j] = 1.0
        # Rx = [[1, 0, 0], [0, c, -s], [0, s, c]], Rz alike; Ry = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
        sign = -1.0 if a == 1 else 1.0
        b[2, a, i, j], b[2, a, j, i] = -sign, sign
    return b


_ROTATION_BASIS = _rotation_basis()


class RandomAugment3D:
    """Random affine + elastic + intensity augmentation for (image, label) batches.

    Parameters are drawn per sample, on the batch's device, from a ``torch.Generator`` seeded
    with ``seed`` (one generator per device, created on first use), then the whole batch is
    resampled by a single :func:`med3d_ext.ops.affine_resample_pair` call: trilinear image,
    nearest label, elastic and intensity fused in the same pass.

    Spatial (output voxel -> input voxel, about the volume centre; voxel aspect is respected, so
    a rotation is a rigid rotation in voxel space and an output smaller than the input is a crop
    at the input's resolution):
        rotate: max absolute angle in radians per axis (x, y, z), uniform in [-a, a].
        scale: zoom range (low, high) (> 1 zooms in), or one range per axis ((lo, hi) x 3 for
            x, y, z); ``isotropic=False`` (implied by per-axis ranges) draws one per axis.
        translate: max shift per axis as a fraction of the input half-extent (normalised units).
        flip: probability of a flip per axis (x, y, z).
        p_affine: probability that a sample gets rotation/scale/translation at all.
        elastic: displacement magnitude (std, normalised units) of a coarse random field of
            ``elastic_grid``^3 control points; ``p_elastic`` per sample.
    Intensity (image only, in this order; see ``affine_resample_pair``):
        gamma: range of the exponent of sign(v)|v|^gamma, drawn log-uniformly; ``p_gamma``.
        contrast: range of the multiplicative factor; brightness: range of the additive shift;
            ``p_contrast`` / ``p_brightness``.
        noise: range of the Gaussian noise std; ``p_noise``.
        clip: optional (min, max) applied last.

    ``aug(image, label, size, label_size=None) -> (image, label)``: image (N, C, D, H, W)
    floating; label (N, D, H, W) / (N, 1, D, H, W) any dtype, or None; size the output spatial
    size (an int for a cube, 3 ints) or the full (N, C, D, H, W); label_size the label's output
    grid (an int or 3 ints; default: size). Works on CPU tensors (DataLoader workers: call
    :meth:`reseed` with a per-worker seed in ``worker_init_fn``) and CUDA batches.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator states for an
    exact resume.
    """

    def __init__(self, *, rotate=0.0, scale=(1.0, 1.0), isotropic=True, translate=0.0,
                 flip=0.0, p_affine=1.0, elastic=0.0, elastic_grid=5, p_elastic=1.0,
                 gamma=(1.0, 1.0), p_gamma=1.0, contrast=(1.0, 1.0), p_contrast=1.0,
                 brightness=(0.0, 0.0), p_brightness=1.0, noise=(0.0, 0.0), p_noise=1.0,
                 clip=None, padding_mode="zeros", align_corners=False, seed=0):
        # every parameter goes through __setattr__'s checks (_PARAMETERS), here and when a user
        # changes one later
        self.isotropic = isotropic
        self.scale = scale  # per-axis ranges switch isotropic off
        for name, value in (("rotate", rotate), ("translate", translate), ("flip", flip),
                            ("p_affine", p_affine), ("elastic", elastic),
                            ("elastic_grid", elastic_grid), ("p_elastic", p_elastic),
                            ("gamma", gamma), ("p_gamma", p_gamma), ("contrast", contrast),
                            ("p_contrast", p_contrast), ("brightness", brightness),
                            ("p_brightness", p_brightness), ("noise", noise),
                            ("p_noise", p_noise), ("clip", clip),
                            ("padding_mode", padding_mode), ("align_corners", align_corners),
                            ("seed", seed)):
            setattr(self, name, value)
        self._generators: dict[str, torch.Generator] = {}
        self._consts: dict[tuple, torch.Tensor] = {}

    def __setattr__(self, name, value):
        """A parameter set later (``aug.scale = (0.8, 1.2)``, ``aug.rotate = 0.5``) is checked
        and normalised as the constructor does: the draw reads the normalised forms (a single
        number for rotate failed at the next call, and an out-of-range probability or a NaN
        angle passed silently)."""
        check = _PARAMETERS.get(name)
        if check is not None:
            raw, value = value, check(value)
            if name == "scale":
                # per-axis ranges switch isotropic off; one range gives back what was asked
                # (it stuck at False after per-axis ranges were replaced by one)
                asked = self.__dict__.get("_isotropic_asked", True)
                object.__setattr__(self, "isotropic", False if _per_axis_scale(raw) else asked)
            if name == "isotropic":
                scale = self.__dict__.get("scale")
                if value and scale is not None and len(set(scale)) > 1:
                    # one zoom for every axis from which range? (x's was used silently)
                    raise ValueError(f"RandomAugment3D: 'isotropic' True needs one scale range "
                                     f"for every axis, but scale has per-axis ranges {scale}; "
                                     "set scale to one range first")
                object.__setattr__(self, "_isotropic_asked", value)
            # the column tables derive from the parameters: made again at the next draw
            self.__dict__.pop("_columns_memo", None)
        object.__setattr__(self, name, value)
        if name == "seed" and self.__dict__.get("_generators"):
            # a seed set later restarts the streams, as reseed() does (they went on from the
            # old seed while state_dict() reported the new one)
            self.__dict__["_generators"].clear()

    # ---------------------------------------------------------------------- generator state
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def reseed(self, seed: int) -> None:
        """Restart every generator from ``seed`` (e.g. base seed + worker id)."""
        self.seed = _seed(seed)
        self._generators.clear()

    def state_dict(self) -> dict:
        return {"seed": self.seed,
                "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"seed", "generators"} <= set(state) \
                or not isinstance(state["generators"], dict):
            # else a bare KeyError: 'seed'
            raise ValueError("RandomAugment3D.load_state_dict: expected the dict of "
                             "state_dict() ({'seed': int, 'generators': {device: state}}), got "
                             f"{state!r}"[:300])
        seed = _seed(state["seed"])
        # built aside, then swapped in: a failure half-way left the seed and the generators
        # changed (the audit's case: a GPU run's state on a machine without CUDA)
        generators, missing = {}, []
        for key, st in state["generators"].items():
            try:
                g = torch.Generator(device=torch.device(key))
            except RuntimeError:  # no such device in this process
                missing.append(key)
                continue
            g.set_state(st)
            generators[str(torch.device(key))] = g
        if missing:
            import warnings

            # a GPU run resumed on a machine without that GPU: its stream cannot continue there,
            # and a new device's generator starts from the seed
            warnings.warn(f"RandomAugment3D.load_state_dict: the saved random streams of "
                          f"{', '.join(missing)} are not restored (no such device here); "
                          "augmentation on this process's devices starts from the seed",
                          stacklevel=2)
        self.seed, self._generators = seed, generators

    # --------------------------------------------------------------------------- parameters
    def _const(self, values, device) -> torch.Tensor:
        """A small float32 constant on ``device``, made once per device: torch.tensor(...,
        device=cuda) is a blocking copy that waits for all queued GPU work, i.e. a host sync
        per training step if done in every call."""
        values = tuple(float(v) for v in values)
        return self._cached((values, str(device)),
                            lambda: torch.tensor(values, dtype=torch.float32).to(device))

    def _cached(self, key, make):
        """``make()``, kept under ``key`` in the constants cache (at most 64 entries: many
        input shapes, each with its k_in, must not grow it without bound)."""
        t = self._consts.get(key)
        if t is None:
            if len(self._consts) >= 64:
                self._consts.clear()
            t = self._consts[key] = make()
        return t

    def _columns(self) -> tuple[tuple, tuple]:
        """The draw's column tables (see _COLUMNS): per column (low, span, neutral value,
        probability) as floats, and the column of the uniform that decides whether it applies.
        Made from the parameters once; setting one (__setattr__) drops them."""
        memo = self.__dict__.get("_columns_memo")
        if memo is None:
            memo = self.__dict__["_columns_memo"] = self._make_columns()
        return memo

    def _make_columns(self) -> tuple[tuple, tuple]:
        rows, gate = [], []

        def put(lo, span, neutral, prob, decides):
            rows.append((lo, span, neutral, prob))
            gate.append(decides)

        put(0.0, 1.0, 0.0, 1.0, _P_AFFINE)  # the affine's coin (its value is not used)
        for a in self.rotate:  # uniform in [-a, a]
            put(-a, 2 * a, 0.0, self.p_affine, _P_AFFINE)
        for lo, hi in self.scale:
            put(lo, hi - lo, 1.0, self.p_affine, _P_AFFINE)
        for t in self.translate:
            put(-t, 2 * t, 0.0, self.p_affine, _P_AFFINE)
        for k, p in enumerate(self.flip):  # its own coin: -1 with probability p
            put(-1.0, 0.0, 1.0, p, _FLIP + k)
        put(self.elastic, 0.0, 0.0, self.p_elastic, _P_ELASTIC)  # its own coin: the magnitude
        for (lo, hi), p, neutral, log in ((self.gamma, self.p_gamma, 0.0, True),
                                          (self.contrast, self.p_contrast, 1.0, False),
                                          (self.brightness, self.p_brightness, 0.0, False),
                                          (self.noise, self.p_noise, 0.0, False)):
            if log:  # gamma is log-uniform; the neutral log-gamma 0 gives exactly 1
                lo, hi = math.log(lo), math.log(hi)
            put(lo, hi - lo, neutral, p, len(rows) + 1)  # decided by the column after it
            put(0.0, 1.0, 0.0, 1.0, len(rows))  # that coin
        assert len(rows) == _COLUMNS
        return tuple(rows), tuple(gate)

    def _tables(self, device):
        """(low, span, neutral, probability) rows (4, _COLUMNS), the gate index (_COLUMNS,) and
        the rotation basis (3, 3, 3, 3) on ``device``, made once per configuration and device
        (a constant's copy to a GPU waits for its queued work)."""
        rows, gate = self._columns()
        return self._cached((rows, gate, str(device)), lambda: (
            torch.tensor(rows, dtype=torch.float32).t().contiguous().to(device),
            torch.tensor(gate).to(device), _ROTATION_BASIS.to(device)))

    def sample(self, n: int, in_spatial, out_spatial, device) -> dict:
        """Draw one batch of parameters: ``theta`` (N, 3, 4), ``elastic`` or None,
        ``intensity`` dict or None. A fixed number of draws per call, whatever applies.

        Every per-sample number comes from one uniform draw of (N, _COLUMNS) and a fixed
        handful of batched ops (about 20 in all, each a kernel launch on a GPU, where this runs
        once per training step: drawn one parameter at a time they were 90)."""
        device = torch.device(device)
        g = self._generator(device)
        table, gate, basis = self._tables(device)
        lo, span, neutral, prob = table
        u = torch.rand((n, _COLUMNS), generator=g, device=device, dtype=torch.float32)
        on = u.index_select(1, gate) < prob  # does column k's transform apply to the sample
        v = torch.where(on, torch.addcmul(lo, u, span), neutral)

        ang = v[:, _ANGLE:_ANGLE + 3]
        zoom = v[:, _ZOOM:_ZOOM + 1].expand(n, 3) if self.isotropic else v[:, _ZOOM:_ZOOM + 3]
        # per axis R = B0 + cos(angle) B1 + sin(angle) B2, the three at once; rot = Rz Ry Rx
        per_axis = torch.addcmul(torch.addcmul(basis[0], ang.cos()[:, :, None, None], basis[1]),
                                 ang.sin()[:, :, None, None], basis[2])
        rot = per_axis[:, 2] @ per_axis[:, 1] @ per_axis[:, 0]
        # Voxel half-extents (x, y, z) of the normalised [-1, 1] span of each grid: column j of
        # the linear part scales by k_out[j] / k_in[i] in row i (voxel aspect respected).
        off = 1 if self.align_corners else 0
        k_in = [max(s - off, 1) for s in reversed(in_spatial)]
        k_out = [max(s - off, 1) for s in reversed(out_spatial)]
        k = self._const([ko / ki for ki in k_in for ko in k_out], device).view(3, 3)
        a = rot * (v[:, _FLIP:_FLIP + 3] / zoom)[:, None, :] * k
        theta = torch.cat([a, v[:, _SHIFT:_SHIFT + 3, None]], dim=2)

        gsz = self.elastic_grid
        field = torch.randn((n, 3, gsz, gsz, gsz), generator=g, device=device,
                            dtype=torch.float32)
        elastic = (field.mul_(v[:, _P_ELASTIC].view(n, 1, 1, 1, 1)) if self.elastic > 0
                   else None)
        inten = {
            "gamma": v[:, _GAMMA].exp(),
            "scale": v[:, _CONTRAST],
            "shift": v[:, _BRIGHTNESS],
            "noise_std": v[:, _NOISE],
            "seed": torch.randint(0, 2**62, (n,), generator=g, device=device),
        }
        if self.clip is not None:
            inten["clip"] = self.clip
        has_intensity = (self.gamma != (1.0, 1.0) or self.contrast != (1.0, 1.0)
                         or self.brightness != (0.0, 0.0) or self.noise != (0.0, 0.0)
                         or self.clip is not None)
        return {"theta": theta, "elastic": elastic, "intensity": inten if has_intensity else None}

    # ------------------------------------------------------------------------------ apply
    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, size, label_size=None):
        if not isinstance(image, torch.Tensor) or image.dim() != 5:
            raise ValueError("RandomAugment3D: 'image' must be (N, C, D, H, W), got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        n, c = image.shape[:2]
        size = _grid("size", size)
        if len(size) not in (3, 5) or (len(size) == 5 and tuple(size[:2]) != (n, c)):
            # a full size whose (N, C) is not the image's was silently cut to its last 3 values
            raise ValueError("RandomAugment3D: 'size' must be an int, 3 ints or (N, C, D, H, W) "
                             f"with (N, C) = {(n, c)}, got {size!r}")
        size = size[-3:]
        if label_size is not None:
            label_size = _grid("label_size", label_size)
        for name, grid, ch in (("size", size, c), ("label_size", label_size, 1)):
            if grid is not None and n * ch * math.prod(grid) * 8 >= 2**63:
                raise ValueError(f"RandomAugment3D: '{name}' {list(grid)} for a batch of {n} x "
                                 f"{ch} channel(s) overflows the tensor size")
        params = self.sample(n, image.shape[2:], size, image.device)
        no_label = label is None
        if no_label:  # a 1-voxel dummy keeps one code path and costs nothing
            label = torch.zeros((n, 1, 1, 1), dtype=torch.uint8, device=image.device)
            label_size = (1, 1, 1)
        img, lab = affine_resample_pair(image, label, params["theta"], [n, c, *size], label_size,
                                        elastic=params["elastic"], intensity=params["intensity"],
                                        padding_mode=self.padding_mode,
                                        align_corners=self.align_corners)
        return img, (None if no_label else lab)
