"""Patch sampling from preprocessed datasets, single- or multi-domain, exactly resumable.

Randomness is counter-based: batch ``b`` is drawn from ``np.random.default_rng([seed, b])``,
so a batch depends only on (seed, b). That makes the sampler deterministic, independent of
how many DataLoader workers split the batches, and resumable from a single integer.

Foreground oversampling (nnU-Net style): of all samples drawn, exactly ``fg_fraction`` (by
default one third) are centred on a random foreground voxel, chosen by a running count rather
than a coin flip so that small batches keep the ratio too. A foreground patch first picks a
class present in the case uniformly, then a voxel of that class, so small structures
(tumours) are seen as often as large ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._args import ArgumentTypeError, int_arg, is_int, real_arg

from .preprocess import PreprocessedDataset


def _as_size(patch) -> tuple:
    scalar = is_int(patch) or not hasattr(patch, "__iter__") or getattr(patch, "ndim", 1) == 0
    vals = [patch] * 3 if scalar else list(patch)
    # is_int: a patch of 8.5 is refused, not truncated to 8, and True is not 1
    if not all(is_int(v) for v in vals):
        raise ArgumentTypeError(f"patch must be an int or 3 positive ints, got {patch!r}")
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"patch must be an int or 3 positive ints, got {patch!r}")
    return tuple(int(v) for v in vals)


def outside_slabs(start, size, shape) -> list:
    """Index tuples (over the last three axes) of the voxels of a window of ``size`` at
    ``start`` that lie outside an array of spatial ``shape``: along each axis, the slab before
    the array and the slab after it (they overlap at edges and corners, which is harmless)."""
    slabs = []
    for ax, (s, n, dim) in enumerate(zip(start, size, shape)):
        lo, hi = min(max(-s, 0), n), min(max(dim - s, 0), n)  # inside: [lo, hi) of the window
        for a, b in ((0, lo), (max(hi, lo), n)):
            if b > a:
                slabs.append((Ellipsis,) + (slice(None),) * ax + (slice(a, b),)
                             + (slice(None),) * (2 - ax))
    return slabs


def crop_patch(arr: np.ndarray, start, size, fill=0, out=None) -> np.ndarray:
    """arr[..., s0:s0+size0, ...] over the last three axes, where the window may stick out of
    the array (or the array be smaller than the window): outside voxels get ``fill``.
    ``out``: an array of the result's shape to write into (e.g. a row of a batch), else new.
    Each voxel is written once (the inside copied, the outside filled)."""
    shape = tuple(arr.shape[:-3]) + tuple(size)
    if out is None:
        out = np.empty(shape, dtype=arr.dtype)
    elif tuple(out.shape) != shape:
        raise ValueError(f"crop_patch: out has shape {tuple(out.shape)}, expected {shape}")
    src, dst = [], []
    for s, n, dim in zip(start, size, arr.shape[-3:]):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:  # no overlap at all
            out.fill(fill)
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    for sl in outside_slabs(start, size, arr.shape[-3:]):
        out[sl] = fill
    return out


class PatchSampler:
    """Random fixed-size patches from one :class:`PreprocessedDataset`.

    channel: channel (sequence) name or index used as the single input channel; None = all
             channels (image patches are then (C, D, H, W))
    """

    def __init__(self, dataset: PreprocessedDataset, patch, *, channel=None):
        self.ds = dataset
        self.patch = _as_size(patch)
        self.channel = None if channel is None else dataset.channel_index(channel)
        if len(dataset) == 0:
            raise ValueError(f"{dataset.name}: empty dataset, nothing to sample")

    def sample(self, rng: np.random.Generator, foreground: bool, case: int | None = None,
               out: np.ndarray | None = None):
        """One patch: (image float32 (C, D, H, W), label (D, H, W), case name, start (3,)
        voxel index of the patch corner in the case's preprocessed grid; may be negative or
        run past the end, where the patch is padded). ``out``: a float32 (C, D, H, W) array to
        write the image into (a batch row: no copy into the batch afterwards)."""
        ds = self.ds
        i = int(rng.integers(len(ds))) if case is None else case
        img = ds.image(i)
        shape = img.shape[1:]
        p = self.patch
        locs = ds.locations(i) if foreground else {}
        if locs:
            cls = sorted(locs)[int(rng.integers(len(locs)))]
            c = locs[cls][int(rng.integers(len(locs[cls])))]
            # centre on the voxel, with a little jitter so it is not always the exact centre
            start = [int(ci) - pi // 2 + int(rng.integers(-(pi // 4), pi // 4 + 1))
                     for ci, pi in zip(c, p)]
        else:
            # anywhere fully inside when it fits; centred with padding when it does not
            start = [int(rng.integers(0, n - pi + 1)) if n >= pi else -((pi - n) // 2)
                     for n, pi in zip(shape, p)]
        chans = list(range(img.shape[0])) if self.channel is None else [self.channel]
        if out is not None and (out.dtype != np.float32 or tuple(out.shape) != (len(chans), *p)):
            raise ValueError(f"PatchSampler.sample: out must be float32 of shape "
                             f"{(len(chans), *p)}, got {out.dtype} {tuple(out.shape)}")
        # img is memory-mapped: only the patch's voxels are read from disk, straight into out
        # (all channels in one crop when all are wanted, else the one channel's view)
        if self.channel is None:
            raw = crop_patch(img, start, p, out=out)
        else:
            raw = crop_patch(img[self.channel], start, p, out=None if out is None else out[0])[None]
        # normalised in place when it is float32 (the cache's dtype, and always with out)
        x = ds.normalize(raw, i, chans, out=raw if raw.dtype == np.float32 else None)
        # out-of-volume voxels: the normalised background (what a raw 0 maps to), slab by slab
        slabs = outside_slabs(start, p, shape)
        for r, ch in enumerate(chans):
            if slabs:
                bg = ds.background_value(i, ch)
                for sl in slabs:
                    x[r][sl] = bg
        lab = ds.label(i)
        y = crop_patch(lab, start, p) if lab is not None else np.zeros(p, np.uint8)
        return x, y, ds.names[i], start


def _label_dtype(label_dtype, datasets):
    """The batches' label dtype: uint8 (a quarter of the bytes to copy and to index) unless a
    dataset declares labels of 256 or more, then int64; an explicit choice is checked."""
    if label_dtype not in (None, torch.uint8, torch.int64):
        raise ValueError(f"label_dtype must be None (automatic), torch.uint8 or torch.int64, got "
                         f"{label_dtype!r}")
    wide = [d.name for d in datasets if (getattr(d, "num_classes", None) or 0) > 256]
    if label_dtype == torch.uint8 and wide:
        raise ValueError(f"label_dtype=torch.uint8 cannot hold the labels of {', '.join(wide)} "
                         "(values of 256 or more): pass label_dtype=torch.int64 or None")
    if label_dtype is None:
        return torch.int64 if wide else torch.uint8
    return label_dtype


def _labels_as(lab: np.ndarray, dtype: torch.dtype, cases) -> torch.Tensor:
    """Stacked label patches as a ``dtype`` tensor, converted once (the patches are stored as
    uint8 when they fit, so the usual batch is not converted at all). A value that ``dtype``
    cannot hold is an error, not a silent wrap-around."""
    want = np.uint8 if dtype == torch.uint8 else np.int64
    if lab.dtype != want:
        if want == np.uint8 and lab.size and (lab.min() < 0 or lab.max() > 255):
            raise ValueError(f"label values in [{lab.min()}, {lab.max()}] (cases {sorted(set(cases))}) "
                             "do not fit label_dtype torch.uint8: pass label_dtype=torch.int64")
        lab = lab.astype(want)
    return torch.from_numpy(lab)


def _seed(v) -> int:
    """A non-negative integer seed (numpy's generators refuse negative ones, which failed only
    at the first batch; int(1.7) would silently have been 1)."""
    return int_arg("seed must be a non-negative int", v, 0)


class MultiDomainSampler(torch.utils.data.IterableDataset):
    """Batches that mix several preprocessed datasets (Med3D co-training).

    datasets:    list of PreprocessedDataset; ``dataset_id`` indexes this list
    patch:       int or (D, H, W)
    batch_size:  samples per batch
    weights:     probability of each dataset per sample (default: equal), normalised
    fg_fraction: share of samples centred on foreground (default 1/3)
    channels:    per dataset, the channel name/index to use (None -> channel 0); pretraining
                 domains are single-channel
    steps:       batches in all (None = endless); a stream with a position, not an epoch:
                 iterating again continues where the last loop stopped, so once ``steps``
                 batches were drawn a new ``for`` loop yields none (a per-epoch loop gives
                 ``steps = epochs * steps_per_epoch`` and breaks after each epoch's share, as
                 the training CLI does; ``state_dict()`` resumes mid-way)
    seed:        everything random derives from (seed, batch index)

    label_dtype: None (default: uint8, or int64 when a dataset declares labels >= 256),
                 torch.uint8 or torch.int64

    Yields dicts: image float32 (N, 1, D, H, W), label (N, D, H, W) of ``label_dtype``,
    dataset_id int64 (N,), case list[str]. Use it with
    ``torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=k, pin_memory=True)``
    or :func:`make_loader`, which also tracks the position for ``state_dict``.
    """

    def __init__(self, datasets, patch, batch_size: int, *, weights=None,
                 fg_fraction: float = 1 / 3, channels=None, steps: int | None = None,
                 seed: int = 0, label_dtype=None):
        if isinstance(datasets, PreprocessedDataset):
            datasets = [datasets]
        if not datasets:
            raise ValueError("MultiDomainSampler needs at least one dataset")
        for i, d in enumerate(datasets):  # duck-typed: what PatchSampler reads
            if not all(hasattr(d, a) for a in ("channel_index", "name", "image", "locations")):
                raise TypeError(f"datasets[{i}] must be a PreprocessedDataset (data.open_dataset "
                                f"/ data.preprocess), got {type(d).__name__}")
        int_arg("batch_size must be an int >= 1", batch_size, 1)
        if steps is not None:
            int_arg("steps must be None (endless) or an int >= 0", steps, 0)
        real_arg("fg_fraction must be a number in [0, 1]", fg_fraction, 0.0, 1.0)
        seed = _seed(seed)
        channels = list(channels) if channels is not None else [None] * len(datasets)
        if len(channels) != len(datasets):
            raise ValueError(f"channels has {len(channels)} entries for {len(datasets)} "
                             "datasets")
        for i, c in enumerate(channels):  # a float crashed in the name lookup (c.lower())
            if c is not None and not (is_int(c) or isinstance(c, str)):
                raise ArgumentTypeError(f"channels[{i}] must be None, a channel index or a "
                                        f"channel name, got {c!r}")
        self.samplers = [PatchSampler(d, patch, channel=c if c is not None else 0)
                         for d, c in zip(datasets, channels)]
        try:
            w = np.ones(len(datasets)) if weights is None else np.asarray(weights, float)
        except (TypeError, ValueError):
            w = np.full(len(datasets), np.nan)
        # NaN or inf weights only failed at the first batch, inside numpy's choice()
        if w.shape != (len(datasets),) or not np.isfinite(w).all() or (w < 0).any() \
                or w.sum() <= 0:
            raise ValueError(f"weights must be {len(datasets)} finite non-negative numbers with a "
                             f"positive sum, got {weights!r}")
        self.weights = w / w.sum()
        self.patch = _as_size(patch)
        self.batch_size = int(batch_size)
        self.fg_fraction = fg_fraction
        self.steps = steps
        self.seed = int(seed)
        self.label_dtype = _label_dtype(label_dtype, datasets)
        self.position = 0  # index of the next batch

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"seed", "position"} <= set(state):
            raise ValueError("load_state_dict: expected the dict state_dict() returns, with "
                             f"'seed' and 'position', got {state!r}"[:300])
        seed = _seed(state["seed"])
        # a negative position lengthened the loader and failed inside numpy at the first batch;
        # 2.9 became 2 silently
        hi = self.steps if self.steps is not None else None
        position = int_arg(f"load_state_dict: 'position' must be an int in [0, "
                           f"{'steps' if hi is None else hi}]", state["position"], 0, hi)
        self.seed, self.position = seed, position

    # -- drawing ----------------------------------------------------------------------------
    def _is_fg(self, g: int) -> bool:
        # sample g is foreground iff the running count floor((g+1)f) steps up at g
        f = self.fg_fraction
        return math.floor((g + 1) * f + 1e-9) > math.floor(g * f + 1e-9)

    def batch(self, b: int) -> dict:
        """Batch number ``b`` (a pure function of seed and b)."""
        rng = np.random.default_rng([self.seed, b])
        n = self.batch_size
        dom = rng.choice(len(self.samplers), size=n, p=self.weights)
        # each patch is cropped and normalised straight into its row of the batch
        imgs = np.empty((n, 1, *self.patch), np.float32)
        labs, cases = [], []
        for k in range(n):
            _, y, name, _ = self.samplers[dom[k]].sample(rng, self._is_fg(b * n + k), out=imgs[k])
            labs.append(y)
            cases.append(name)
        return {"image": torch.from_numpy(imgs),
                "label": _labels_as(np.stack(labs), self.label_dtype, cases),
                "dataset_id": torch.from_numpy(dom.astype(np.int64)),
                "case": cases}

    def __len__(self):
        if self.steps is None:
            raise TypeError("endless sampler (steps=None) has no length")
        return max(self.steps - self.position, 0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.position + wid
        while self.steps is None or b < self.steps:
            batch = self.batch(b)
            b += nw
            if info is None:
                self.position = b  # in-process iteration tracks its own position
            yield batch


class BatchLoader:
    """A DataLoader over a :class:`MultiDomainSampler` that knows how many batches the
    consumer has taken, so ``state_dict()`` resumes exactly after the last batch returned
    (workers prefetch ahead; their copies' positions are not used).

    ``device``: a CUDA device to deliver ``image`` and ``label`` on. Each batch's copy is issued
    on a side stream while the consumer works on the previous one (from pinned memory, so the
    transfer overlaps the training step instead of sitting at its start); the consumer's stream
    waits for the copy before using the batch. Other keys (``dataset_id``, ``case``) stay on the
    host. ``state_dict()`` still counts only the batches handed out. Ignored for other devices.
    """

    def __init__(self, sampler: MultiDomainSampler, *, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None, device=None):
        # num_workers="2" built a loader that failed at its first batch, in torch's terms
        self.sampler = sampler
        self.num_workers = int_arg("num_workers must be an int >= 0", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = None if prefetch_factor is None else int_arg(
            "prefetch_factor must be None or an int >= 1", prefetch_factor, 1)
        dev = None if device is None else torch.device(device)
        self.device = dev if dev is not None and dev.type == "cuda" else None

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        kw = {}
        if self.num_workers > 0:
            kw["persistent_workers"] = False
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
        dl = torch.utils.data.DataLoader(self.sampler, batch_size=None,
                                         num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, **kw)
        start = self.sampler.position
        batches = dl if self.device is None else _device_prefetch(iter(dl), self.device)
        for k, batch in enumerate(batches):
            # DataLoader returns worker outputs round-robin, i.e. in batch order; the position
            # is set when a batch is handed out (the prefetch may have drawn the next one)
            self.sampler.position = start + k + 1
            yield batch


_DEVICE_KEYS = ("image", "label")


def _device_prefetch(it, device):
    """Yields the batches of ``it`` with image and label on ``device``, one copy ahead."""
    copy_stream = torch.cuda.Stream(device)

    def issue():
        try:
            b = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(copy_stream):
            return {k: (v.to(device, non_blocking=True) if k in _DEVICE_KEYS and torch.is_tensor(v)
                        else v) for k, v in b.items()}

    nxt = issue()
    while nxt is not None:
        cur = nxt
        main = torch.cuda.current_stream(device)
        main.wait_stream(copy_stream)
        for k in _DEVICE_KEYS:
            if torch.is_tensor(cur.get(k)) and cur[k].device.type == "cuda":
                cur[k].record_stream(main)  # allocated on the copy stream, used on the main one
        nxt = issue()  # the next batch's copy runs while the consumer uses this one
        yield cur


def make_loader(datasets, patch, batch_size, *, num_workers=0, pin_memory=None, device=None,
                **kw):
    """MultiDomainSampler + BatchLoader in one call; pin_memory defaults to CUDA present;
    ``device``: deliver image and label there, copied one batch ahead (see BatchLoader)."""
    s = MultiDomainSampler(datasets, patch, batch_size, **kw)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return BatchLoader(s, num_workers=num_workers, pin_memory=pin, device=device)


class ClassificationSet(torch.utils.data.Dataset):
    """Whole-volume classification samples, prepared exactly as ``python -m med3d_ext.train
    transfer --task cls`` (and evaluate and predict with such a run) prepare them: by the same
    function, :func:`~med3d_ext.data.classification_volume`, from each case's source image:
    RAS, one channel, clipped to its own 0.5-99.5 percentiles, z-scored over the whole
    volume, resized (trilinear) straight to ``size``. No preprocessing cache is read.

    dataset: a classification folder (``labels.csv``; or the ``labels.csv`` file), its
             :class:`~med3d_ext.data.Dataset` (``load_dataset``), or a
             :class:`PreprocessedDataset` of one (as before; only its cases' source files and
             classes are used: its cached arrays are the segmentation recipe's, cropped,
             resampled and CT-windowed per dataset, which classification runs never see)
    size:    (D, H, W) or one int, what the CLI's ``--patch`` is
    channel: the channel index (default 0, as the CLI's ``--channel``); the dataset's channel
             name (its modality) is accepted too
    indices: the cases to use, by position (default all)

    Items are dicts: image float32 (1, D, H, W), label int64 scalar (the integer class of
    ``labels.csv``; a CLI run numbers its head's outputs by the sorted classes present, the
    same numbers when the classes are 0, 1, ..., K-1), case str; the default DataLoader
    collate turns them into image (N, 1, D, H, W), label (N,), case list[str]. Augmentation
    (the CLI's random flips) is the training loop's business.
    """

    def __init__(self, dataset, size, *, channel=None, indices=None):
        from pathlib import Path

        from .layouts import Dataset, load_dataset

        if not isinstance(dataset, (Dataset, PreprocessedDataset)):
            p = Path(dataset)
            dataset = load_dataset(p.parent if p.is_file() and p.name == "labels.csv" else p)
        if dataset.targets is None:
            raise ValueError(f"{dataset.name}: not a classification dataset (no labels.csv)")
        self.ds = dataset
        self.size = _as_size(size)
        if isinstance(dataset, PreprocessedDataset):
            self.channel = dataset.channel_index(channel)
            self.names = list(dataset.names)
            self.files = [dataset.meta(i)["images"][0] for i in range(len(dataset))]
            self.targets = [int(t) for t in dataset.targets]
        else:
            self.channel = _cls_channel(dataset, channel)
            self.names = [c.name for c in dataset.cases]
            self.files = [str(c.images[0]) for c in dataset.cases]
            self.targets = [int(dataset.targets[n]) for n in self.names]
        self.indices = list(range(len(self.names))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        from .preprocess import classification_volume

        i = self.indices[k]
        t = classification_volume(self.files[i], self.size, self.channel)
        return {"image": t.contiguous(), "label": torch.tensor(self.targets[i]),
                "case": self.names[i]}


def _cls_channel(ds, channel) -> int:
    """A raw classification dataset's channel: an index (checked against each image when it
    is read), or its channel name (the modality), which is channel 0."""
    if channel is None:
        return 0
    if is_int(channel) or (isinstance(channel, str) and channel.isdigit()):
        if int(channel) < 0:
            raise ValueError(f"{ds.name}: channel {channel!r}: expected an index >= 0")
        return int(channel)
    low = [c.lower() for c in ds.channels]
    if isinstance(channel, str) and channel.lower() in low:
        return low.index(channel.lower())
    raise ValueError(f"{ds.name}: no channel {channel!r}; channels are {ds.channels} (or give "
                     "an index)")
