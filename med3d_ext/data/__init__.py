"""Data layer: NIfTI/ITK reading in RAS, raw dataset layouts (MSD, nnU-Net v2, MedicalNet
lists), the Med3D preprocessing recipe with an automatic cache, patch sampling for single- and
multi-domain training, synthetic 3DSeg-8 and real packaged volumes.

Typical use::

    from med3d_ext import data
    dirs = data.find_datasets("synth/pretrain")       # one dataset folder, or a folder of them
    pre = [data.open_dataset(d) for d in dirs]        # cached; reruns skip unchanged cases
    loader = data.make_loader(pre, patch=48, batch_size=4, seed=0, steps=1000,
                              channels=["FLAIR", None, ...], num_workers=2)
    for batch in loader: ...                          # image, label, dataset_id, case
    state = loader.state_dict()                       # exact resume: loader.load_state_dict

CLI: ``python -m med3d_ext.data {synth,real,preprocess} ...``.
"""

from .io import DataError, DataPathError, Volume, read_volume, save_nifti
from .layouts import Case, Dataset, detect_layout, find_datasets, load_dataset
from .preprocess import (PreprocessedDataset, classification_volume, default_cache_dir,
                         preprocess, resize, to_source_space, write_prediction)
from .sampling import (BatchLoader, ClassificationSet, MultiDomainSampler, PatchSampler,
                       crop_patch, make_loader)

__all__ = [
    "DataError", "DataPathError", "Volume", "read_volume", "save_nifti",
    "Case", "Dataset", "detect_layout", "find_datasets", "load_dataset",
    "PreprocessedDataset", "classification_volume", "default_cache_dir", "preprocess", "resize",
    "to_source_space", "write_prediction",
    "BatchLoader", "ClassificationSet", "MultiDomainSampler", "PatchSampler", "crop_patch", "make_loader",
    "synth", "real", "open_dataset",
]


def synth(out, **kw):
    """Synthetic 3DSeg-8 (see :func:`med3d_ext.data.synthetic.synth`)."""
    from .synthetic import synth as _synth

    return _synth(out, **kw)


def real(out, **kw):
    """Real packaged volumes (see :func:`med3d_ext.data.real_volumes.real`)."""
    from .real_volumes import real as _real

    return _real(out, **kw)


def open_dataset(data, cache=None, **kw) -> PreprocessedDataset:
    """What ``--data DIR`` means: the raw dataset at DIR, preprocessed into ``cache`` (default
    :func:`default_cache_dir`) on first use and reused after. Keyword options go to
    :func:`preprocess` (workers, skip_bad, target_spacing, progress)."""
    return preprocess(data, cache, **kw)
