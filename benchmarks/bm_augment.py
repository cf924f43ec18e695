"""augment: batched affine augmentation, image trilinear + label nearest in one pass.

GPU, 8 x 1 x 128^3 fp32 image + uint8 label, one theta per sample:
  med3d_ext ``affine_resample_pair`` vs eager ``affine_grid`` + ``grid_sample`` x 2 (the label as
  float, cast back) vs torch.compile of that (--with-compile) vs MONAI ``RandAffine(device=cuda)``
  per sample vs TorchIO ``RandomAffine`` per sample (CPU), when installed: timed as a baseline,
  but no GPU row's speed-up is taken against it (CPU vs GPU). Then the same with intensity
  augmentation (noise included) on, and with an elastic displacement field too, checked
  against ``med3d_ext.reference.affine_resample_pair``.
CPU, 1 x 1 x 128^3 fp32: ``affine_resample`` vs ``affine_grid`` + ``grid_sample``; target >= 3x.
Peer libraries draw their own random transforms: timed, not compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import graphed, m3d_attr, op_backend, optional_import, with_env

AREA = "augment"


def random_theta(b, device, seed=0):
    """Near-identity affines: rotation up to ~0.3 rad per axis, scale 0.9-1.1, small shift."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(b, 3, generator=g) - 0.5) * 0.6
    th = torch.zeros(b, 3, 4)
    for i in range(b):
        cx, cy, cz = torch.cos(a[i]).tolist()
        sx, sy, sz = torch.sin(a[i]).tolist()
        rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        th[i, :, :3] = rz @ ry @ rx * (0.9 + 0.2 * torch.rand(1, generator=g))
    th[:, :, 3] = (torch.rand(b, 3, generator=g) - 0.5) * 0.1
    return th.to(device)


def eager_pair(img, lab, theta, size):
    grid = F.affine_grid(theta, size, align_corners=False)
    a = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b = F.grid_sample(lab.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return a, b.to(lab.dtype)


def eager_elastic_intensity(img, lab, theta, size, field, inten, label_size=None, gamma=True):
    """The hand-written eager chain a user would write; same work, own conventions (not checked).
    ``field`` None: no elastic displacement; ``label_size``: the label's own output grid (no
    elastic field then); ``gamma`` False: no power (a chain for intensity draws without gamma,
    as the training CLI's, would not compute one)."""
    grid = F.affine_grid(theta, size, align_corners=False)
    if field is not None:
        disp = F.interpolate(field, size=size[2:], mode="trilinear", align_corners=True)
        grid = grid + disp.permute(0, 2, 3, 4, 1)
    a = F.grid_sample(img, grid, mode="bilinear", align_corners=False)
    lgrid = grid if label_size is None else F.affine_grid(
        theta, (size[0], 1, *label_size), align_corners=False)
    b = F.grid_sample(lab.float(), lgrid, mode="nearest", align_corners=False).to(lab.dtype)
    v = (-1,) + (1,) * (a.dim() - 1)
    a = a * inten["scale"].view(v) + inten["shift"].view(v)
    if gamma:
        a = a.sign() * a.abs().pow(inten["gamma"].view(v))
    a = a + torch.randn_like(a) * inten["noise_std"].view(v)
    return a, b


def _monai(img, lab):
    tr = optional_import("monai.transforms")
    dev = img.device
    ri = tr.RandAffine(prob=1.0, rotate_range=(0.3,) * 3, scale_range=(0.1,) * 3, mode="bilinear",
                       padding_mode="zeros", device=dev)
    rl = tr.RandAffine(prob=1.0, rotate_range=(0.3,) * 3, scale_range=(0.1,) * 3, mode="nearest",
                       padding_mode="zeros", device=dev)

    def f():
        for i in range(img.shape[0]):
            ri.set_random_state(i)
            rl.set_random_state(i)
            ri(img[i])
            rl(lab[i])
    return f


def _torchio(img, lab):
    tio = optional_import("torchio")
    ci, cl = img.cpu(), lab.cpu()
    t = tio.RandomAffine(scales=0.1, degrees=17)

    def f():
        for i in range(ci.shape[0]):
            t(tio.Subject(image=tio.ScalarImage(tensor=ci[i]), label=tio.LabelMap(tensor=cl[i])))
    return f


def run(ctx):
    if ctx.gpu:
        _gpu(ctx)
    else:
        _cpu(ctx)


def _gpu(ctx, b=8, s=128):
    size = (b, 1, s, s, s)
    dev = ctx.device
    img = torch.randn(size, device=dev)
    lab = torch.randint(0, 8, size, device=dev, dtype=torch.uint8)
    theta = random_theta(b, dev)
    # the workload (a uint8 label map); ../shared/baselines/baseline.py timed fp32
    # labels (no conversion, 16 B/voxel): the eager side here converts the label to float and
    # back, as grid_sample needs, and the floor counts 10 B/voxel
    params = {"image": list(size), "image_dtype": "float32", "label": list(size), "label_dtype": "uint8",
              "align_corners": False, "padding_mode": "zeros",
              "deviation": "uint8 labels (perf-baselines: fp32 labels); eager converts them"}
    nbytes = img.numel() * (4 + 4 + 1 + 1)  # read + write image (fp32) and label (uint8)
    case = ctx.case(AREA, f"affine pair {b}x{s}^3", params=params, rtol=1e-4, atol=1e-3, bytes_floor=nbytes)
    eager, monai = "eager affine_grid+grid_sample x2", "MONAI RandAffine per sample"
    # the baselines on this device: the GPU row's speed-ups are taken against these only
    same_device = [eager, monai] + (["torch.compile eager"] if ctx.with_compile else [])
    case.add(eager, lambda: (lambda: eager_pair(img, lab, theta, size)),
             baseline=True, reference=True)

    def ours():
        op = m3d_attr("ops.affine_resample_pair")
        return lambda: op(img, lab, theta, size)
    case.add("med3d_ext affine_resample_pair", ours, note=op_backend("affine_resample_pair", ctx.device),
             compare_to=same_device)
    if ctx.gpu:  # the kPlain kernel's former layout beside its default, in the same process
        for row, layout in ((RUNS_ROW, "runs"), (PAIRS_ROW, "pairs")):
            case.add(row, lambda layout=layout: plain_layout_call(ours(), layout), compare_to=same_device,
                     note=op_backend("affine_resample_pair", ctx.device))
        # Each row above is timed between two events around one call, so the host's work
        # before the launch (~30 us on the H200: the Python wrapper, the dispatcher, checks and
        # allocations) counts, as it does for the eager baseline's seven ops. Replayed from a
        # CUDA graph (a training step under reduce-overhead, or a whole-step graph), both sides
        # cost their kernels alone: the same work without the launch overhead.
        case.add(GRAPH_EAGER_ROW, lambda: graphed(lambda: (lambda: eager_pair(img, lab, theta, size))),
                 baseline=True)
        case.add(GRAPH_ROW, lambda: graphed(ours), compare_to=[GRAPH_EAGER_ROW],
                 note=op_backend("affine_resample_pair", ctx.device))
    if ctx.with_compile:
        case.add("torch.compile eager", lambda: (lambda f=torch.compile(eager_pair): f(img, lab, theta, size)),
                 baseline=True)
    case.add(monai, lambda: _monai(img, lab), baseline=True, check=False)
    # on the CPU (TorchIO has no GPU path): a measured baseline, not a ratio for a GPU row
    case.add("TorchIO RandomAffine per sample (CPU)", lambda: _torchio(img, lab), baseline=True, check=False,
             repeats=3, warmup=1)
    case.run()

    # The training CLI's augmentation (med3d_ext/train/backends.py: contrast, brightness and
    # noise for every sample, gamma 1, no elastic field), with the label on the image's grid
    # (--label-grid patch) and on the 4x smaller grid of its default --label-grid logits; then
    # elastic + intensity (gamma drawn too). Checked against med3d_ext.reference, noise
    # included (its per-voxel noise is a function of the seed and the voxel index, the same in
    # both).
    g = 8
    field = (torch.rand(b, 3, g, g, g, generator=torch.Generator().manual_seed(2)) - 0.5).mul_(0.04).to(dev)
    _intensity_case(ctx, img, lab, theta, size, params, nbytes, None)
    quarter = tuple(max(1, n // 4) for n in size[2:])
    # image read + written, the label's share at its grid (read where sampled, written)
    nbytes_q = img.numel() * (4 + 4) + 2 * b * quarter[0] * quarter[1] * quarter[2]
    _intensity_case(ctx, img, lab, theta, size, params, nbytes_q, None, label_size=quarter)
    _intensity_case(ctx, img, lab, theta, size, params, nbytes, field)


def _intensity_case(ctx, img, lab, theta, size, params, nbytes, field, label_size=None):
    dev, b, s = ctx.device, size[0], size[-1]
    cli = field is None  # the CLI's draws: no gamma (1 exactly: its power is then skipped)

    def inten(noise):
        t = lambda lo, hi, seed: (lo + (hi - lo) * torch.rand(b, generator=torch.Generator().manual_seed(seed))).to(dev)
        return {"scale": t(0.9, 1.1, 3), "shift": t(-0.1, 0.1, 4),
                "gamma": torch.ones(b, device=dev) if cli else t(0.8, 1.2, 5),
                "noise_std": t(0.0, 0.05, 6) * noise, "seed": torch.arange(b, device=dev, dtype=torch.int64)}
    params2 = dict(params, **({} if field is None else {"elastic": list(field.shape)}),
                   intensity="scale, shift, noise_std, seed (gamma 1, as the training CLI)" if cli
                   else "scale, shift, gamma, noise_std, seed")
    if label_size is not None:
        params2["label_out"] = [b, 1, *label_size]  # (the input label is the image's size)
    what = "affine+intensity" if field is None else "affine+elastic+intensity"
    grid_note = "" if label_size is None else f", label {label_size[-1]}^3 (--label-grid logits)"
    case = ctx.case(AREA, f"{what} pair {b}x{s}^3{grid_note}", params=params2, rtol=1e-3,
                    atol=1e-3, bytes_floor=nbytes)

    # built once, outside the timed calls: building them per call would time host-side random
    # draws and five small host-to-device copies along with the op. What is timed is what is
    # checked: noise on (noise_std > 0), so the noise epilogue is verified too
    noisy = inten(1.0)

    def ref():
        f = m3d_attr("reference.affine_resample_pair")
        return lambda: f(img, lab, theta, size, label_size, elastic=field, intensity=noisy)

    def ours():
        op = m3d_attr("ops.affine_resample_pair")
        return lambda: op(img, lab, theta, size, label_size, elastic=field, intensity=noisy)
    case.add("med3d_ext.reference", ref, baseline=True, reference=True)
    eager_name = ("eager affine_grid+grid_sample x2+intensity" if field is None
                  else "eager affine_grid+elastic+grid_sample x2+intensity")
    case.add(eager_name, lambda: (lambda: eager_elastic_intensity(img, lab, theta, size, field, noisy,
                                                                  label_size, gamma=not cli)),
             baseline=True, check=False, note="own conventions, same work; not compared")
    case.add("med3d_ext affine_resample_pair", ours, note=op_backend("affine_resample_pair", ctx.device))
    if ctx.gpu and field is None:
        for row, layout in ((RUNS_ROW, "runs"), (PAIRS_ROW, "pairs")):
            case.add(row, lambda layout=layout: plain_layout_call(ours(), layout),
                     note=op_backend("affine_resample_pair", ctx.device))
    case.run()


# The CUDA kPlain kernel's image items are warp tiles (csrc/resample/resample_cuda.cu,
# plain_tile_item); MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=runs selects its former runs of 8 voxels per
# thread, =pairs the tiles' rows two at a time (its loads issued together), read at every launch.
# The variable is set around each call (a few microseconds of host time inside the timed call,
# against ~160 us of kernel).
RUNS_ROW = "med3d_ext affine_resample_pair, runs layout (MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=runs)"
PAIRS_ROW = "med3d_ext affine_resample_pair, row pairs (MED3D_EXT_PLAIN_RESAMPLE_LAYOUT=pairs)"
# the pair and the eager baseline replayed from CUDA graphs (the launch-free cost; see _gpu)
GRAPH_ROW = "med3d_ext affine_resample_pair, replayed from a CUDA graph"
GRAPH_EAGER_ROW = "eager affine_grid+grid_sample x2, replayed from a CUDA graph"


def plain_layout_call(fn, layout="runs"):
    """``fn`` with MED3D_EXT_PLAIN_RESAMPLE_LAYOUT set to ``layout`` around each call."""
    return with_env(fn, "MED3D_EXT_PLAIN_RESAMPLE_LAYOUT", layout)


def _cpu(ctx):
    s = 128
    size = (1, 1, s, s, s)
    img = torch.randn(size)
    theta = random_theta(1, "cpu")
    params = {"image": list(size), "dtype": "float32", "mode": "trilinear", "threads": torch.get_num_threads()}
    case = ctx.case(AREA, f"affine image 1x{s}^3 (CPU)", params=params, rtol=1e-4, atol=1e-3,
                    targets={"eager affine_grid+grid_sample": 3.0})

    def eager():
        return lambda: F.grid_sample(img, F.affine_grid(theta, size, align_corners=False), mode="bilinear",
                                     align_corners=False)

    def ours():
        op = m3d_attr("ops.affine_resample")
        return lambda: op(img, theta, size, mode="bilinear")
    case.add("eager affine_grid+grid_sample", eager, baseline=True, reference=True)
    case.add("med3d_ext affine_resample", ours, note=op_backend("affine_resample", ctx.device))
    if not ctx.quick:
        def monai_img():
            tr = optional_import("monai.transforms")
            r = tr.RandAffine(prob=1.0, rotate_range=(0.3,) * 3, scale_range=(0.1,) * 3, mode="bilinear")
            return lambda: r(img[0])
        case.add("MONAI RandAffine", monai_img, baseline=True, check=False)
        case.add("TorchIO RandomAffine", lambda: _torchio(img, torch.zeros_like(img, dtype=torch.uint8)),
                 baseline=True, check=False)
    case.run()

