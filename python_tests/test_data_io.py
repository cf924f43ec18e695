"""med3d_ext.data.io: RAS reorientation, inverse mapping, nibabel's test files, ITK formats."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from med3d_ext.data.io import DataError, ras_to_source, read_header, read_volume  # noqa: E402
from python_tests._datahelp import affine, rng, save  # noqa: E402

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def _world_values_agree(vol, src_data, src_aff):
    """Every voxel's value sits at the same world position in the source and the RAS array
    (independent check: world coordinates, not nibabel's orientation helpers)."""
    idx = np.argwhere(np.ones(vol.data.shape[1:], bool))
    world = nib.affines.apply_affine(vol.affine, idx)
    back = nib.affines.apply_affine(np.linalg.inv(src_aff), world)
    ijk = np.rint(back).astype(int)
    assert np.abs(back - ijk).max() < 1e-4
    np.testing.assert_array_equal(vol.data[0][tuple(idx.T)], src_data[tuple(ijk.T)])


@pytest.mark.parametrize("codes,rot", [("RAS", 0), ("LAS", 0), ("LPS", 0), ("PIR", 0),
                                       ("SLP", 0), ("LPS", 25), ("RAS", -35)])
def test_reorient_to_ras(tmp_path, codes, rot):
    r = rng()
    shape = tuple(int(v) for v in r.integers(3, 9, 3))
    aff = affine(r.uniform(0.5, 3, 3), codes, shape, rot_deg=rot)
    data = r.normal(size=shape).astype(np.float32)
    p = save(tmp_path / "x.nii.gz", data, aff)
    v = read_volume(p)
    # RAS voxel order: each array axis runs mostly along +R, +A, +S
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    assert v.data.shape[0] == 1
    _world_values_agree(v, data, aff)
    # reference: nibabel's own canonical reorientation
    can = nib.as_closest_canonical(nib.load(str(p)))
    np.testing.assert_allclose(v.affine, can.affine, atol=1e-5)
    np.testing.assert_array_equal(v.data[0], can.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(v.spacing, np.linalg.norm(can.affine[:3, :3], axis=0), rtol=1e-5)
    assert v.orig_shape == shape
    # inverse puts the voxels back exactly
    np.testing.assert_array_equal(ras_to_source(v.data[0], v.ornt), data)
    hsp, hshape, hc = read_header(p)
    np.testing.assert_allclose(hsp, v.spacing, rtol=1e-6)
    assert tuple(hshape) == v.data.shape[1:] and hc == 1


def test_4d_is_multichannel(tmp_path):
    r = rng()
    data = r.normal(size=(5, 6, 7, 3)).astype(np.float32)
    aff = affine((1, 1, 2), "LPS", (5, 6, 7))
    v = read_volume(save(tmp_path / "m.nii.gz", data, aff))
    assert v.data.shape == (3, 5, 6, 7)
    for c in range(3):
        np.testing.assert_array_equal(v.data[c], nib.apply_orientation(data[..., c], v.ornt))
    back = ras_to_source(v.data, v.ornt)
    np.testing.assert_array_equal(back, data)


def test_nan_inf_rejected(tmp_path):
    data = rng().normal(size=(4, 5, 6)).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    p = save(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 2 NaN/Inf voxels"):
        read_volume(p)


def test_truncated_and_non_image(tmp_path):
    data = rng().normal(size=(16, 16, 16)).astype(np.float32)
    p = save(tmp_path / "ok.nii.gz", data, np.eye(4))
    raw = p.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"trunc\.nii\.gz: corrupt or truncated"):
        read_volume(tmp_path / "trunc.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello, I am not an image" * 20))
    with pytest.raises(DataError, match=r"text\.nii\.gz"):
        read_volume(tmp_path / "text.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not a supported image"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
                                  "standard.nii.gz", "reoriented_anat_moved.nii",
                                  "functional.nii"])
def test_nibabel_bundled_files(name):
    p = NIB_DATA / name
    if not p.exists():
        pytest.skip(f"{p} not shipped with this nibabel")
    img = nib.load(str(p))
    v = read_volume(p)
    expect_c = img.shape[3] if len(img.shape) == 4 else 1
    assert v.data.shape[0] == expect_c
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    src = np.asanyarray(img.dataobj)
    src = src if src.ndim == 4 else src[..., None]
    # first and last channel agree with the source at the same world positions
    for c in {0, expect_c - 1}:
        sub = type(v)(v.data[c:c + 1], v.affine, v.spacing, v.orig_affine, v.orig_shape,
                      v.ornt)
        _world_values_agree(sub, src[..., c], img.affine)


def test_nibabel_non_nifti_files():
    # MINC loads through nibabel's generic path; an Analyze header without its .img, and a
    # header with a bad datatype, are clear errors naming the file
    mnc = NIB_DATA / "minc1_1_scale.mnc"
    try:
        ref = nib.load(str(mnc))
        ref_data = np.asanyarray(ref.dataobj)
    except Exception:  # noqa: BLE001 - optional reader backend missing
        ref = None
    if ref is not None:
        v = read_volume(mnc)
        _world_values_agree(v, ref_data, ref.affine)
    for name in ("analyze.hdr", "bad_datatype+orig.HEAD"):
        if (NIB_DATA / name).exists():
            with pytest.raises(DataError, match=name.replace("+", r"\+")):
                read_volume(NIB_DATA / name)


def test_itk_formats(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    r = rng()
    arr = r.normal(size=(7, 6, 5)).astype(np.float32)  # (z, y, x) in ITK order
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((10.0, -4.0, 3.0))
    for ext in ("nrrd", "mha"):
        p = tmp_path / f"x.{ext}"
        sitk.WriteImage(img, str(p))
        v = read_volume(p)
        assert v.data.shape == (1, 5, 6, 7)
        # LPS world (ITK) -> RAS world: x and y flip sign
        idx = np.array([1, 2, 3])  # (x, y, z) ITK index
        lps = np.array(img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx)))
        ras = lps * [-1, -1, 1]
        vox = np.rint(nib.affines.apply_affine(np.linalg.inv(v.affine), ras)).astype(int)
        assert v.data[0][tuple(vox)] == arr[idx[2], idx[1], idx[0]]
        np.testing.assert_allclose(np.sort(v.spacing), [0.7, 0.9, 2.5], rtol=1e-6)


def test_itk_missing_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import now raises ImportError
    p = tmp_path / "x.nrrd"
    p.write_bytes(b"NRRD0004\n")
    with pytest.raises(DataError, match="needs SimpleITK: pip install SimpleITK"):
        read_volume(p)


def _write_series(sitk, img, folder, prefix, series_uid):
    """``img`` as a DICOM series in ``folder``, one ``<prefix><k>.dcm`` per slice."""
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, val in (("0020|0032", "\\".join(map(str, pos))), ("0020|0013", str(k)),
                         ("0020|000e", series_uid), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                         ("0008|0060", "CT")):
            sl.SetMetaData(tag, val)
        w.SetFileName(str(folder / f"{prefix}{k}.dcm"))
        w.Execute(sl)


def test_itk_dicom_series_folder(tmp_path):  # the locale: conftest's _keep_locale
    sitk = pytest.importorskip("SimpleITK")
    r = rng()
    arr = r.integers(-1000, 1000, (4, 5, 6)).astype(np.int16)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    _write_series(sitk, img, tmp_path, "s", "1.2.826.0.1.3680043.2.1125.1")
    v = read_volume(tmp_path)
    assert v.data.shape == (1, 6, 5, 4)
    np.testing.assert_allclose(v.spacing, [0.5, 0.7, 2.0], rtol=1e-5)
    for idx in ((0, 0, 0), (5, 4, 3), (2, 1, 3)):  # ITK (x, y, z)
        ras = np.array(img.TransformIndexToPhysicalPoint(idx)) * [-1, -1, 1]
        vox = np.rint(nib.affines.apply_affine(np.linalg.inv(v.affine), ras)).astype(int)
        assert v.data[0][tuple(vox)] == arr[idx[2], idx[1], idx[0]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no DICOM series"):
        read_volume(empty)
    # a second series in the folder (a scout beside the axial series): refused, both named
    # (the first series GDCM listed was read, whichever it was)
    _write_series(sitk, img[:, :, :2], tmp_path, "scout", "1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(DataError, match=r"2 DICOM series: .*1\.2\.826\.0\.1\.3680043\.2\.1125\.1 "
                                        r"\(4 files\).*\(2 files\).*folder of its own"):
        read_volume(tmp_path)


def test_sheared_affine_is_written_without_a_stripped_qform(tmp_path):
    """A sheared affine (CT gantry tilt) got a qform (code 1) with the shear stripped by
    nibabel: up to 8.5 mm from the sform, and ITK, which reads the qform, placed the prediction
    elsewhere (evaluate audit). The qform is now left unset (code 0) for such an affine; a
    rotation with zooms still gets both."""
    from med3d_ext.data.io import save_nifti

    data = rng().integers(0, 3, (6, 7, 8)).astype(np.uint8)
    sheared = np.array([[0.8, 0.0, 0.0, 10.0], [0.0, 0.9, 0.4, -20.0],
                        [0.0, 0.0, 3.0, 30.0], [0, 0, 0, 1]])
    img = nib.load(str(save_nifti(data, sheared, tmp_path / "shear.nii.gz")))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 0
    np.testing.assert_allclose(img.affine, sheared, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    rotated = affine((0.7, 0.9, 3.0), "LPS", (6, 7, 8), rot_deg=25)
    img = nib.load(str(save_nifti(data, rotated, tmp_path / "rot.nii.gz")))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), rotated, atol=1e-5)
    np.testing.assert_allclose(img.get_sform(), rotated, atol=1e-6)


@pytest.mark.parametrize("unit,to_mm", [("micron", 1e-3), ("meter", 1e3), ("mm", 1.0),
                                        ("unknown", 1.0)])
def test_space_units_are_read_as_mm(tmp_path, unit, to_mm):
    """A micron-unit header was read as mm: spacings, HD95 and the written prediction were off
    by 1000x (evaluate audit). The affine is scaled to mm; "unknown" stays mm."""
    data = rng().normal(size=(5, 6, 7)).astype(np.float32)
    aff = affine((0.7, 0.9, 3.0), "LPS", (5, 6, 7), rot_deg=20)
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units(unit if unit != "unknown" else 0)
    p = tmp_path / "u.nii.gz"
    nib.save(img, str(p))
    v = read_volume(p)
    np.testing.assert_allclose(v.spacing, np.array([0.7, 0.9, 3.0]) * to_mm,
                               rtol=1e-5)
    np.testing.assert_allclose(v.orig_affine, np.diag([to_mm] * 3 + [1]) @ aff, rtol=1e-6,
                               atol=1e-9)
    sp, _, _ = read_header(p)
    np.testing.assert_allclose(sp, v.spacing, rtol=1e-6)
