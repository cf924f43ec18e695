"""Volume I/O: NIfTI (nibabel), NRRD/MHA/DICOM (SimpleITK, optional), RAS reorientation and
the inverse mapping that writes predictions back in a case's source space.

Array convention: a :class:`Volume` holds ``data`` as ``(C, I, J, K)`` in *RAS voxel order*
(the closest canonical orientation, as nibabel's ``as_closest_canonical`` gives it: array
axes 0, 1, 2 increase towards Right, Anterior, Superior), ``affine`` the 4x4 voxel->world
(RAS+ mm) matrix of that array, ``spacing`` the voxel size in mm per array axis. Oblique affines keep their rotation:
only axis permutations and flips are applied to the voxels, so no interpolation happens here.
The batch axes (D, H, W) of the training pipeline are these (I, J, K) axes.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A problem with one input file or dataset; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DataPathError(DataError):
    """A path given to a command that cannot be used as given: a dataset folder that does not
    exist, is a file or holds no dataset, a preprocessing cache folder that is a file, holds
    the dataset or someone else's files, or cannot be created. The command line has to change,
    not the data: the CLIs exit with status 2 (a usage error, as argparse's) for it, and with 1
    for the other DataErrors (a problem met in the data: an unreadable image, a malformed
    dataset.json, ...)."""


NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def as_path(path, what: str = "path") -> Path:
    """``Path(path)``, or a TypeError naming the argument (pathlib's says only "expected str,
    bytes or os.PathLike object, not NoneType")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"med3d_ext.data: argument '{what}' must be a file or folder path, got "
                        f"{type(path).__name__}")
    return Path(path)


def _is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_ENDINGS)


@dataclass
class Volume:
    """One image (or label) volume in RAS voxel order, with what is needed to undo that.

    data:        (C, I, J, K) array (C=1 for 3-D files; 4-D NIfTI => channels)
    affine:      (4, 4) voxel->RAS mm affine of ``data``
    spacing:     (3,) mm per array axis of ``data``
    orig_affine: (4, 4) affine of the file as stored
    orig_shape:  spatial shape of the file as stored
    ornt:        (3, 2) nibabel orientation array: stored axes -> RAS (see nibabel.orientations)
    path:        source file(s)
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    orig_affine: np.ndarray
    orig_shape: tuple
    ornt: np.ndarray
    path: str = ""


# --------------------------------------------------------------------------------------------
# reading


def _read_nifti(path: Path):
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))
    except ImageFileError as e:
        raise DataError(path, f"not a readable image file ({e})") from None
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(path, f"corrupt or truncated file ({type(e).__name__}: {e})") from None
    try:
        # dataobj keeps the on-disk dtype for unscaled integer labels; float images scale
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(path, f"corrupt or truncated file ({type(e).__name__}: {e})") from None
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise DataError(path, "header has no valid affine")
    return data, _affine_in_mm(img)


_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def _affine_in_mm(img) -> np.ndarray:
    """A NIfTI's affine in mm. Everything downstream (spacings, HD95, the written predictions)
    is in mm; the header's space unit says what the affine's numbers are, and "unknown" (the
    common case) is read as mm. A micron file was otherwise scored in microns called mm."""
    affine = np.asarray(img.affine, dtype=np.float64)
    to_mm = _MM_PER_UNIT.get(img.header.get_xyzt_units()[0], 1.0)
    return affine if to_mm == 1.0 else np.diag([to_mm, to_mm, to_mm, 1.0]) @ affine


def _read_itk(path: Path):
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DataError(path, "reading NRRD/MHA/DICOM needs SimpleITK: pip install SimpleITK "
                              "(or pip install 'med3d_ext[itk]')") from None
    try:
        if path.is_dir():  # DICOM series
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise DataError(path, "folder holds no DICOM series")
            if len(ids) > 1:
                # exports often mix a localizer or scout with the axial series: reading the
                # first one GDCM lists would segment or train on whichever that is, unsaid
                sizes = [f"{i} ({len(reader.GetGDCMSeriesFileNames(str(path), i))} files)"
                         for i in ids]
                raise DataError(path, f"folder holds {len(ids)} DICOM series: "
                                      f"{', '.join(sizes[:4])}{', ...' if len(ids) > 4 else ''};"
                                      " put each series in a folder of its own")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"SimpleITK could not read it ({str(e).strip().splitlines()[-1]})") \
            from None
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    ndim = img.GetDimension()
    if ndim != 3:
        raise DataError(path, f"expected a 3-D image, got {ndim}-D")
    arr = np.moveaxis(arr, (0, 1, 2), (2, 1, 0)) if arr.ndim == 3 else \
        np.transpose(arr, (2, 1, 0, 3))
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK world is LPS, NIfTI world is RAS
    return arr, affine


def read_volume(path, *, dtype=None) -> Volume:
    """Read one image file (or DICOM folder) and reorient it to RAS voxel order.

    Raises :class:`DataError` naming the file for missing, unreadable or corrupt files and for
    NaN/Inf voxels in float images.
    """
    import nibabel as nib

    path = as_path(path)
    if not path.exists():
        raise DataError(path, "file does not exist")
    if _is_nifti(path):
        data, affine = _read_nifti(path)
    elif path.is_dir() or str(path).lower().endswith(ITK_ENDINGS):
        data, affine = _read_itk(path)
    else:
        # unknown ending: let nibabel try its formats (Analyze, MGH, ...) before giving up
        try:
            img = nib.load(str(path))
            data, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)
        except Exception as e:  # noqa: BLE001 - any reader failure means "not an image"
            raise DataError(path, f"not a supported image file ({type(e).__name__}: {e})") \
                from None
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)  # 4-D NIfTI: last axis = channels / sequences
    elif data.ndim == 5 and data.shape[3] == 1:  # NIfTI "vector" dim 5 layout
        data = np.moveaxis(data[:, :, :, 0], 3, 0)
    else:
        raise DataError(path, f"expected a 3-D or 4-D image, got shape {tuple(data.shape)}")
    if data.dtype.kind not in "biuf":  # complex (imaginary part dropped), RGB, ... by astype
        raise DataError(path, f"voxel type {data.dtype} is not real-valued (complex, RGB and "
                              "other compound voxel types are not supported)")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(path, f"{bad} NaN/Inf voxels")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    spatial = data.shape[1:]
    ornt, new_affine = _ras_orientation(path, affine, spatial)
    ras = _apply_ornt(data, ornt)
    spacing = np.sqrt((new_affine[:3, :3] ** 2).sum(0))
    return Volume(data=ras, affine=new_affine, spacing=spacing, orig_affine=affine,
                  orig_shape=tuple(int(s) for s in spatial), ornt=ornt, path=str(path))


def _ras_orientation(path, affine: np.ndarray, spatial):
    """(nibabel orientation transform to RAS, the RAS affine) of an image, or a DataError for
    an affine nibabel cannot orient (a zero or repeated axis: a header written with spacing 0
    or a broken sform), which otherwise surfaced as nibabel's OrientationError."""
    from nibabel import orientations as nio

    try:
        ornt = nio.io_orientation(affine)
        return ornt, affine @ nio.inv_ornt_aff(ornt, tuple(spatial))
    except (nio.OrientationError, ValueError, np.linalg.LinAlgError) as e:
        raise DataError(path, "degenerate affine: the voxel axes cannot be oriented in space "
                              f"(a zero spacing or a broken sform/qform?; {e}); affine "
                              f"{np.round(np.asarray(affine), 4).tolist()}") from None


def _apply_ornt(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes (1..3) of (C, I, J, K)."""
    from nibabel import orientations as nio

    out = np.stack([nio.apply_orientation(c, ornt) for c in data]) if len(data) else data
    return np.ascontiguousarray(out)


def read_header(path):
    """Cheap header read: (spacing in RAS voxel order (3,), RAS spatial shape (3,), channels)."""
    import nibabel as nib

    path = as_path(path)
    if not path.exists():
        raise DataError(path, "file does not exist")
    if not _is_nifti(path):
        v = read_volume(path)
        return v.spacing, np.array(v.data.shape[1:]), v.data.shape[0]
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"not a readable image file ({type(e).__name__}: {e})") from None
    shape = img.shape
    # the shapes read_volume takes: 3-D, 4-D (channels last) and NIfTI's 5-D vector layout
    # (x, y, z, 1, components), as ITK and 3D Slicer write multi-component images
    if len(shape) == 3:
        channels = 1
    elif len(shape) == 4:
        channels = shape[3]
    elif len(shape) == 5 and shape[3] == 1:
        channels = shape[4]
    else:
        raise DataError(path, f"expected a 3-D or 4-D image, got shape {tuple(shape)}")
    if img.affine is None or not np.all(np.isfinite(img.affine)):
        raise DataError(path, "header has no valid affine")
    ornt, aff = _ras_orientation(path, _affine_in_mm(img), shape[:3])
    perm = ornt[:, 0].astype(int)
    ras_shape = np.empty(3, dtype=int)
    ras_shape[perm] = shape[:3]
    return np.sqrt((aff[:3, :3] ** 2).sum(0)), ras_shape, int(channels)


# --------------------------------------------------------------------------------------------
# writing back to source space


def ras_to_source(array: np.ndarray, ornt) -> np.ndarray:
    """Undo the RAS reorientation of a spatial (I, J, K) or (C, I, J, K) array."""
    from nibabel import orientations as nio

    inv = _invert_ornt(np.asarray(ornt))  # ornt maps stored->RAS; inv maps RAS->stored
    if array.ndim == 3:
        return np.ascontiguousarray(nio.apply_orientation(array, inv))
    return np.ascontiguousarray(np.stack([nio.apply_orientation(a, inv) for a in array], -1))


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    # ornt[i] = (target axis of stored axis i, flip). The inverse sends target axis t back to i.
    inv = np.zeros_like(ornt)
    for i, (t, f) in enumerate(ornt):
        inv[int(t)] = (i, f)
    return inv


def save_nifti(array: np.ndarray, affine: np.ndarray, path, *, dtype=None) -> Path:
    """Write an array (I, J, K) or (I, J, K, C) as NIfTI with ``affine``: the sform, and the
    qform too unless the affine has a shear (which a qform cannot hold); units mm."""
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        # nibabel picks the format from the suffix, and would name the temporary in its error
        raise DataError(path, "a NIfTI output path must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=1)
    try:  # the qform holds only a rotation and zooms: nibabel would strip a shear from it
        # silently, and a reader that prefers the qform (ITK) then places the volume elsewhere
        img.set_qform(affine, code=1, strip_shears=False)
    except nib.spatialimages.HeaderDataError:  # a sheared affine (e.g. CT gantry tilt)
        img.set_qform(None, code=0)
    img.header.set_xyzt_units("mm")  # affines are in mm; viewers otherwise say "unknown"
    # a unique temporary in the same folder (the rename is atomic there), named for its type:
    # nibabel picks the format and compression from the suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" + "".join(path.suffixes[-2:]))
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:  # a Ctrl-C or a full disk mid-write leaves neither a torn file nor the temporary
        tmp.unlink(missing_ok=True)
    return path
