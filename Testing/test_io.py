"""maml.io: reading every supported format and DICOM series, bad inputs, atomic writing."""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from maml import io
from maml.errors import InputError

# An oblique direction (rotation about an oblique axis) and anisotropic spacing: a geometry a wrong
# axis order or a dropped direction would not survive.
_ANGLE = np.deg2rad(20.0)
_AXIS = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)


def _rotation(axis, angle):
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = tuple(_rotation(_AXIS, _ANGLE).ravel())
SPACING = (0.75, 0.8, 2.5)
ORIGIN = (-120.5, 35.25, -402.0)


def make_volume(size=(12, 10, 7), pixel=sitk.sitkInt16, direction=OBLIQUE, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=size[::-1])
    image = sitk.Cast(sitk.GetImageFromArray(array.astype(np.int32)), pixel)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def assert_same_image(a: sitk.Image, b: sitk.Image, tol=1e-5):
    assert a.GetSize() == b.GetSize()
    assert a.GetPixelID() == b.GetPixelID()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 100)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_round_trip_keeps_geometry_and_pixels(tmp_path, suffix):
    image = make_volume()
    path = tmp_path / "sub" / f"ct{suffix}"
    io.write_image(image, path)
    # Only the image (and a detached data file) is left: no temporary files.
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    before = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
    back = io.read_image(path, "venous")
    assert_same_image(image, back)
    # Reading never touches the file(s).
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()} == before


def test_round_trip_float_and_uint8(tmp_path):
    for pixel, name in [(sitk.sitkFloat32, "f.nrrd"), (sitk.sitkUInt8, "l.nii.gz")]:
        image = make_volume(pixel=pixel) if pixel != sitk.sitkUInt8 else sitk.Cast(
            make_volume() > 0, sitk.sitkUInt8)
        io.write_image(image, tmp_path / name)
        assert_same_image(image, io.read_image(tmp_path / name))


def test_compression_is_on(tmp_path):
    image = sitk.Image([64, 64, 32], sitk.sitkInt16)
    image[5, 5, 5] = 7  # not constant, highly compressible
    io.write_image(image, tmp_path / "a.nrrd")
    io.write_image(image, tmp_path / "a.mha")
    io.write_image(image, tmp_path / "a.nii.gz")
    raw = 64 * 64 * 32 * 2
    for name in ("a.nrrd", "a.mha", "a.nii.gz"):
        assert (tmp_path / name).stat().st_size < raw / 10, name


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "x.nii.gz"
    io.write_image(make_volume(seed=1), path)
    second = make_volume(seed=2)
    io.write_image(second, path)
    assert_same_image(second, io.read_image(path))


def test_write_unsupported_suffix(tmp_path):
    with pytest.raises(InputError, match="unsupported image file type"):
        io.write_image(make_volume(), tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------


def write_dicom_series(image: sitk.Image, folder, series_uid: str, description: str, number: int = 1,
                       extra_tags=()):
    """Write a CT volume as one DICOM file per slice, after SimpleITK's DicomSeriesFromArray example.
    ``extra_tags``: more (tag, value) pairs for every slice."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    direction = image.GetDirection()
    series_tags = [
        ("0008|0031", now_time),
        ("0008|0021", now_date),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.99999.1"),  # study instance UID
        ("0020|000e", series_uid),
        # row and column direction cosines: the first two columns of the direction matrix
        ("0020|0037", "\\".join(map(str, direction[0::3] + direction[1::3]))),
        ("0008|103e", description),
        ("0020|0011", str(number)),
        ("0008|0060", "CT"),
        ("0010|0010", "Phantom^Liver"),
        ("0010|0020", "P0001"),
        ("0018|0050", str(image.GetSpacing()[2])),  # slice thickness
        ("0028|1053", "1"),  # rescale slope
        ("0028|1052", "0"),  # rescale intercept
        *extra_tags,
    ]
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in series_tags:
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0008|0012", now_date)
        slice_.SetMetaData("0008|0013", now_time)
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0013", str(k + 1))  # instance number
        slice_.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")  # SOP instance UID
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(slice_)


def dicom_volume(direction=OBLIQUE):
    image = make_volume(size=(16, 12, 6), direction=direction)
    image.SetSpacing((0.7, 0.7, 3.0))
    return image


def test_dicom_series_reads_back_with_geometry(tmp_path):
    image = dicom_volume()
    folder = tmp_path / "dicom"
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.1.11", "Arterial 1.0 B30f")
    back = io.read_image(folder, "arterial")
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_dicom_folder_with_two_series_lists_them_and_one_can_be_picked(tmp_path):
    folder = tmp_path / "dicom"
    uid_a = "1.2.826.0.1.3680043.2.1125.1.21"
    uid_v = "1.2.826.0.1.3680043.2.1125.1.22"
    arterial = dicom_volume()
    venous = make_volume(size=(16, 12, 5), direction=OBLIQUE, seed=3)
    venous.SetSpacing((0.7, 0.7, 3.0))
    write_dicom_series(arterial, folder, uid_a, "Arterial phase", number=3)
    write_dicom_series(venous, folder, uid_v, "Venous phase", number=4)

    with pytest.raises(InputError) as info:
        io.read_image(folder, "venous")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("venous (")
    assert "2 DICOM series" in message
    for text in (uid_a, uid_v, "'Arterial phase'", "'Venous phase'", "6 files", "5 files", "::"):
        assert text in message

    picked = io.read_image(f"{folder}::{uid_v}", "venous")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(picked), sitk.GetArrayFromImage(venous))
    picked = io.read_image(folder, "arterial", series_uid=uid_a)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(picked), sitk.GetArrayFromImage(arterial))

    with pytest.raises(InputError, match=r"no DICOM series '1\.2\.3'.*Venous phase"):
        io.read_image(f"{folder}::1.2.3", "venous")


def test_dicom_missing_slice_is_rejected(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(dicom_volume(), folder, "1.2.826.0.1.3680043.2.1125.1.31", "CT")
    sorted(folder.iterdir())[2].unlink()
    with pytest.raises(InputError, match="unevenly spaced"):
        io.read_image(folder, "venous")


def test_single_dicom_file_asks_for_the_folder(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(dicom_volume(), folder, "1.2.826.0.1.3680043.2.1125.1.41", "CT")
    with pytest.raises(InputError, match="single DICOM file; give the folder"):
        io.read_image(sorted(folder.iterdir())[0], "venous")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"arterial \(.*\): folder holds no DICOM series"):
        io.read_image(tmp_path, "arterial")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / "nope.nii.gz", "arterial")
    _one_line(info, "arterial", "nope.nii.gz", "no such file")


def test_garbage_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError) as info:
        io.read_image(garbage, "venous")
    _one_line(info, "venous", "garbage.nii.gz", "not a readable image")

    empty = tmp_path / "empty.nrrd"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes"):
        io.read_image(empty, "venous")

    good = tmp_path / "good.nii"
    io.write_image(make_volume(size=(40, 40, 20)), good)
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(good.read_bytes()[:5000])
    # ITK alone would fill the missing voxels with zeros.
    with pytest.raises(InputError) as info:
        io.read_image(truncated, "venous")
    _one_line(info, "venous", "truncated.nii", "truncated")

    good_gz = tmp_path / "good.nii.gz"
    io.write_image(make_volume(size=(40, 40, 20)), good_gz)
    truncated_gz = tmp_path / "truncated.nii.gz"
    truncated_gz.write_bytes(good_gz.read_bytes()[:5000])
    with pytest.raises(InputError) as info:
        io.read_image(truncated_gz, "venous")
    _one_line(info, "venous", "truncated.nii.gz", "truncated")

    for good_file in (good, good_gz):  # the check passes complete files
        io.read_image(good_file)

    good_mha = tmp_path / "good.mha"
    io.write_image(make_volume(size=(40, 40, 20)), good_mha)
    truncated_mha = tmp_path / "truncated.mha"
    truncated_mha.write_bytes(good_mha.read_bytes()[:3000])
    with pytest.raises(InputError) as info:
        io.read_image(truncated_mha, "venous")
    _one_line(info, "venous", "truncated.mha")


def test_2d_and_single_slice(tmp_path):
    sitk.WriteImage(sitk.Image([10, 10], sitk.sitkInt16) + sitk.GaussianSource(sitk.sitkInt16, [10, 10]), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / "flat.nrrd", "venous")
    _one_line(info, "venous", "flat.nrrd", "2D")
    one = make_volume(size=(10, 10, 1))
    sitk.WriteImage(one, str(tmp_path / "one.nii.gz"))
    with pytest.raises(InputError, match="single slice"):
        io.read_image(tmp_path / "one.nii.gz", "venous")


def test_4d_and_vector_images(tmp_path):
    frames = [make_volume(seed=s, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) for s in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "fourd.nii.gz"))
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / "fourd.nii.gz", "arterial")
    _one_line(info, "arterial", "fourd.nii.gz", "4D")

    vector = sitk.Compose(*frames)
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(InputError, match="3 components per voxel"):
        io.read_image(tmp_path / "vector.mha", "arterial")


def test_4d_with_one_time_point_is_a_volume(tmp_path):
    frame = make_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(sitk.JoinSeries([frame]), str(tmp_path / "t1.nii.gz"))
    back = io.read_image(tmp_path / "t1.nii.gz")
    assert back.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(frame))


def test_empty_nan_and_constant_volumes(tmp_path):
    nan = sitk.GetImageFromArray(np.full((4, 5, 6), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / "nan.nrrd", "venous")
    _one_line(info, "venous", "nan.nrrd", "every voxel is NaN")

    some = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    some[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(some), str(tmp_path / "some.nrrd"))
    with pytest.raises(InputError, match="1 NaN or infinite"):
        io.read_image(tmp_path / "some.nrrd", "venous")

    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(tmp_path / "zero.mha"))
    with pytest.raises(InputError, match="constant"):
        io.read_image(tmp_path / "zero.mha", "venous")

    # A header with a zero-size axis: ITK will not write one, so write the NRRD header by hand.
    (tmp_path / "empty.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 0\nencoding: raw\nendian: little\n"
        "data file: empty.raw\n"
    )
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / "empty.nhdr", "venous")
    _one_line(info, "venous", "empty.nhdr")


def test_series_uid_on_a_file_is_an_error(tmp_path):
    io.write_image(make_volume(), tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="only be given for a DICOM folder"):
        io.read_image(f"{tmp_path / 'a.nii.gz'}::1.2.3")


# --------------------------------------------------------------------------------------------------
# JSON and the atomic output folder
# --------------------------------------------------------------------------------------------------


def test_write_json_converts_numpy_and_nan(tmp_path):
    path = tmp_path / "stats.json"
    io.write_json({"n": np.int64(3), "v": np.float32(1.5), "a": np.arange(3), "bad": float("nan"),
                   "t": (1, 2)}, path)
    assert json.loads(path.read_text()) == {"n": 3, "v": 1.5, "a": [0, 1, 2], "bad": None, "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_atomic_output_dir_success_keeps_unrelated_files(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me")
    (out / "stats.json").write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("mine")
    with io.atomic_output_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        io.write_json({"tumor_count": 1}, tmp / "stats.json")
        io.write_image(make_volume(), tmp / "segmentation.nii.gz")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert not (out / "segmentation.nii.gz").exists()  # nothing visible until the end
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert json.loads((out / "stats.json").read_text()) == {"tumor_count": 1}
    assert (out / "segmentation.nii.gz").exists()
    assert (out / "sub" / "mine.txt").read_text() == "mine"
    assert (out / "sub" / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_output_dir_new_folder(tmp_path):
    out = tmp_path / "a" / "b" / "result"
    with io.atomic_output_dir(out) as tmp:
        (tmp / "x.txt").write_text("x")
    assert (out / "x.txt").read_text() == "x"
    assert sorted(p.name for p in out.parent.iterdir()) == ["result"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_dir_leaves_nothing_on_error(tmp_path, error):
    out = tmp_path / "result"
    out.mkdir()
    (out / "stats.json").write_text("previous run")
    with pytest.raises(type(error)):
        with io.atomic_output_dir(out) as tmp:
            io.write_json({"x": 1}, tmp / "stats.json")
            (tmp / "half.nii.gz").write_bytes(b"half")
            raise error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]
    assert sorted(p.name for p in out.iterdir()) == ["stats.json"]
    assert (out / "stats.json").read_text() == "previous run"

    fresh = tmp_path / "fresh"
    with pytest.raises(type(error)):
        with io.atomic_output_dir(fresh) as tmp:
            (tmp / "half.nii.gz").write_bytes(b"half")
            raise error
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_atomic_output_dir_disk_full(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(InputError, match=f"no space left on device writing {out}"):
        with io.atomic_output_dir(out) as tmp:
            (tmp / "half.nii.gz").write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_on_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        with io.atomic_output_dir(tmp_path / "f"):
            pass


@pytest.mark.parametrize("name, pixel", [("nan.nii.gz", np.float32), ("nan.nii", np.float64)])
def test_nan_voxels_in_nifti_are_refused_not_read_as_zero(tmp_path, name, pixel):
    """ITK's NIfTI reader turns NaN into 0 without a word; the file itself is checked."""
    array = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(pixel)
    array[2, 3, 4:6] = np.nan
    array[1, 1, 1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    with pytest.raises(InputError) as info:
        io.read_image(tmp_path / name, "phase 'venous'")
    _one_line(info, "phase 'venous'", name, "3 NaN or infinite voxel(s)")
    clean = np.nan_to_num(array, posinf=0.0)
    sitk.WriteImage(sitk.GetImageFromArray(clean), str(tmp_path / name))
    assert io.read_image(tmp_path / name).GetSize() == (8, 7, 6)
