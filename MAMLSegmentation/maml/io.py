"""Reading and writing images and results.

Reading: :func:`read_image` takes a NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``) or
MetaImage (``.mha``/``.mhd``) file, or a folder holding a DICOM series, and returns a 3D scalar
SimpleITK image (LPS physical space, the file's own pixel type). Everything that would make the
image unusable raises :class:`~maml.errors.InputError` with one line naming the input and its path.
Input files are only ever opened for reading.

Writing: every writer is atomic. :func:`write_image` and :func:`write_json` write a temporary file
beside the target and move it into place with :func:`os.replace`; :func:`atomic_output_dir` gives a
whole temporary result folder that only appears under its real name when the block succeeds. A full
disk becomes ``InputError("no space left on device writing <path>")``.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "SERIES_SEPARATOR",
    "read_image",
    "list_dicom_series",
    "dicom_files",
    "write_image",
    "write_json",
    "atomic_output_dir",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_FILES_KEY = "maml_dicom_source_files"
# "DIR::SERIESUID" picks one series of a DICOM folder holding several.
SERIES_SEPARATOR = "::"

# DICOM slices whose spacing differs by more than this (relative) from the median are rejected:
# a volume built from them would have a wrong geometry (missing slices, mixed acquisitions).
SLICE_SPACING_RTOL = 0.05

_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_MODALITY = "0008|0060"
_TAG_SERIES_NUMBER = "0020|0011"
_TAG_IMAGE_POSITION = "0020|0032"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, name: str = "image", series_uid: str | None = None) -> sitk.Image:
    """Read a 3D scalar volume from a file or a DICOM series folder.

    ``path`` is an image file, a folder with one DICOM series, or ``"FOLDER::SERIESUID"`` (or
    ``series_uid=``) to pick one series of a folder holding several. ``name`` (e.g. the phase name)
    starts every error message.

    Raises :class:`InputError` for: a missing path, a file that cannot be read, a folder with no
    DICOM series or several without a choice, unevenly spaced DICOM slices, a 2D image (including a
    single-slice volume), a 4D image or vector pixels, an empty volume, NaN/infinite voxels, a
    constant volume. The pixel type is kept as stored.
    """
    text = os.fspath(path)
    if series_uid is None and SERIES_SEPARATOR in text:
        text, series_uid = text.split(SERIES_SEPARATOR, 1)
    p = Path(text)
    label = f"{name} ({p})"
    if not p.exists():
        raise InputError(f"{label}: no such file or folder")
    if p.is_dir():
        image = _read_dicom_series(p, label, series_uid)
    else:
        if series_uid is not None:
            raise InputError(f"{label}: a series UID can only be given for a DICOM folder")
        image = _read_file(p, label)
    return _check_volume(image, label)


def _read_file(p: Path, label: str) -> sitk.Image:
    if not os.access(p, os.R_OK):
        raise InputError(f"{label}: file is not readable (permission denied)")
    if p.stat().st_size == 0:
        raise InputError(f"{label}: file is empty (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(
            f"{label}: not a readable image file (expected NIfTI, NRRD, MHA/MHD or a DICOM folder)"
        ) from None
    if reader.GetImageIOFromFileName(str(p)) == "GDCMImageIO":
        raise InputError(
            f"{label}: is a single DICOM file; give the folder holding the whole series instead"
        )
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "read error"
        raise InputError(f"{label}: file is corrupt or truncated ({_short(detail)})") from None
    if reader.GetImageIO() == "NiftiImageIO" or p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(p, label)
    return image


def _check_nifti_complete(p: Path, label: str) -> None:
    """ITK's NIfTI reader fills a truncated file's missing voxels with zeros without a word, and reads
    NaN voxels as 0 just as silently; check that the file holds ``vox_offset`` + all voxel bytes
    (decompressing a ``.gz`` as a stream) and, for float data, that every voxel is finite."""
    opener = gzip.open if _is_gzip(p) else open
    non_finite = 0
    try:
        with opener(p, "rb") as fh:
            header = fh.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return
            expected, offset, float_dtype = layout
            have = len(header)
            pending = header[offset:] if float_dtype is not None else b""
            while have < expected:
                chunk = fh.read(min(1 << 22, expected - have))
                if not chunk:
                    break
                have += len(chunk)
                if float_dtype is not None:
                    pending += chunk
                    whole = len(pending) - len(pending) % float_dtype.itemsize
                    values = np.frombuffer(pending[:whole], dtype=float_dtype)
                    non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
                    pending = pending[whole:]
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{label}: file is corrupt or truncated (compressed data ends early)") from None
    if have < expected:
        raise InputError(
            f"{label}: file is truncated ({have} of {expected} bytes of header and voxel data)"
        )
    if non_finite:
        raise InputError(f"{label}: image has {non_finite} NaN or infinite voxel(s), which would be "
                         "read as 0; replace them (e.g. with the image's minimum) and try again")


def _is_gzip(p: Path) -> bool:
    with open(p, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


# NIfTI datatype codes of floating-point voxels
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """(vox_offset + voxel bytes, vox_offset, float dtype or None) from a NIfTI-1/-2 header, or
    None if it cannot be parsed."""
    if len(header) < 348:
        return None
    for endian in ("<", ">"):
        sizeof_hdr = np.frombuffer(header[:4], dtype=f"{endian}i4")[0]
        if sizeof_hdr == 348:
            dims = np.frombuffer(header[40:56], dtype=f"{endian}i2").astype(np.int64)
            datatype = int(np.frombuffer(header[70:72], dtype=f"{endian}i2")[0])
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{endian}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{endian}f4")[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            dims = np.frombuffer(header[16:80], dtype=f"{endian}i8")
            datatype = int(np.frombuffer(header[12:14], dtype=f"{endian}i2")[0])
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{endian}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{endian}i8")[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or offset < 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]]))
    float_dtype = (np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
                   if datatype in _NIFTI_FLOAT_TYPES else None)
    return offset + voxels * bitpix // 8, offset, float_dtype


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in ``folder`` (not its subfolders): one dict per series with ``uid``,
    ``files`` (number of files), ``description``, ``modality`` and ``number`` (may be empty)."""
    folder = Path(folder)
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        info = {"uid": uid, "files": len(files), "description": "", "modality": "", "number": ""}
        if files:
            tags = _read_tags(files[0], (_TAG_SERIES_DESCRIPTION, _TAG_MODALITY, _TAG_SERIES_NUMBER))
            info["description"] = tags.get(_TAG_SERIES_DESCRIPTION, "")
            info["modality"] = tags.get(_TAG_MODALITY, "")
            info["number"] = tags.get(_TAG_SERIES_NUMBER, "")
        series.append(info)
    return series


def _read_tags(filename: str, keys) -> dict:
    reader = sitk.ImageFileReader()
    reader.SetFileName(filename)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    return {k: reader.GetMetaData(k).strip() for k in keys if reader.HasMetaDataKey(k)}


def _describe(info: dict) -> str:
    parts = [info["uid"]]
    extra = []
    if info["description"]:
        extra.append(repr(info["description"]))
    if info["number"]:
        extra.append(f"series {info['number']}")
    if info["modality"]:
        extra.append(info["modality"])
    extra.append(f"{info['files']} file{'s' if info['files'] != 1 else ''}")
    return f"{parts[0]} ({', '.join(extra)})"


def _read_dicom_series(folder: Path, label: str, series_uid: str | None) -> sitk.Image:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise InputError(f"{label}: folder is not readable (permission denied)")
    series = list_dicom_series(folder)
    if not series:
        raise InputError(
            f"{label}: folder holds no DICOM series (give a NIfTI/NRRD/MHA file or a DICOM folder)"
        )
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(_describe(s) for s in series)
            raise InputError(
                f"{label}: folder holds {len(series)} DICOM series: {listing}. "
                f"Pick one as '{folder}{SERIES_SEPARATOR}SERIESUID'"
            )
        chosen = series[0]
    else:
        matches = [s for s in series if s["uid"] == series_uid.strip()]
        if not matches:
            listing = "; ".join(_describe(s) for s in series)
            raise InputError(f"{label}: no DICOM series {series_uid!r} in the folder; it holds: {listing}")
        chosen = matches[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen["uid"])
    if len(files) < 2:
        raise InputError(
            f"{label}: DICOM series {chosen['uid']} has {len(files)} file; a 3D volume needs several slices"
        )
    _check_slice_spacing(files, label)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
        # The source slices, for outputs that reference them (a DICOM SEG): see dicom_files().
        image.SetMetaData(DICOM_FILES_KEY, "\n".join(os.path.abspath(f) for f in files))
        return image
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "read error"
        raise InputError(f"{label}: DICOM series {chosen['uid']} cannot be read ({_short(detail)})") from None


def dicom_files(image: sitk.Image) -> list[str]:
    """The DICOM files (in slice order) ``image`` was read from by :func:`read_image`; ``[]`` for an
    image read from a file or computed."""
    if not image.HasMetaDataKey(DICOM_FILES_KEY):
        return []
    return image.GetMetaData(DICOM_FILES_KEY).split("\n")


def _check_slice_spacing(files: list[str], label: str) -> None:
    """Reject series whose slices are not evenly spaced along the slice normal (GDCM already sorted
    them): ITK would silently build a volume with one spacing and a wrong geometry."""
    positions = []
    for f in files:
        value = _read_tags(f, (_TAG_IMAGE_POSITION,)).get(_TAG_IMAGE_POSITION)
        if value is None:
            return  # no positions (e.g. secondary capture): nothing to check, ITK falls back
        try:
            positions.append([float(v) for v in value.replace(" ", "").split("\\")])
        except ValueError:
            return
    pos = np.asarray(positions)
    if pos.shape[1] != 3:
        return
    gaps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    median = float(np.median(gaps))
    if median <= 0 or np.any(gaps <= 1e-6):
        raise InputError(
            f"{label}: DICOM series has several slices at the same position (mixed acquisitions?); "
            "export the volume you mean as NIfTI or pick another series"
        )
    if np.any(np.abs(gaps - median) > SLICE_SPACING_RTOL * median):
        raise InputError(
            f"{label}: DICOM slices are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm; "
            "missing slices?); a volume built from them would have a wrong geometry"
        )


def _check_volume(image: sitk.Image, label: str) -> sitk.Image:
    from .preprocessing import validate_image

    dim = image.GetDimension()
    size = tuple(image.GetSize())
    if dim == 4 and size[3] == 1:
        # A 4D header with a single time point is a 3D volume (some converters write these).
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        dim, size = 3, tuple(image.GetSize())
    if dim == 2:
        raise InputError(f"{label}: image is 2D (size {_fmt_size(size)}); a 3D volume is needed")
    if dim >= 4:
        raise InputError(
            f"{label}: image is {dim}D (size {_fmt_size(size)}); a single 3D volume is needed "
            "(split the time series / phases into separate files)"
        )
    validate_image(image, label)
    return image


def _fmt_size(size) -> str:
    return "x".join(str(s) for s in size)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # ITK reports write failures as RuntimeError carrying the system's message.
    return isinstance(exc, RuntimeError) and (
        "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)
    )


def _no_space(target: Path) -> InputError:
    return InputError(f"no space left on device writing {target}")


def _full_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[len(name) - len(suffix):]
    return Path(name).suffix


def _temp_name(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` atomically, compressed where the format allows it.

    The image is written under its final file name inside a temporary folder beside ``path`` (so a
    detached header such as ``.nhdr``/``.mhd`` names the right data file), then each file is moved
    into place with :func:`os.replace`, data files before the header. Parent folders are created.
    """
    target = Path(path)
    if _full_suffix(target.name).lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{target}: unsupported image file type (use one of {', '.join(IMAGE_SUFFIXES)})")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if _is_no_space(exc):
            raise _no_space(target) from None
        raise InputError(f"cannot create folder {target.parent}: {exc.strerror or exc}") from None
    tmp_dir = _temp_name(target)
    try:
        tmp_dir.mkdir()
        tmp_file = tmp_dir / target.name
        sitk.WriteImage(image, str(tmp_file), useCompression=True)
        written = sorted(tmp_dir.iterdir(), key=lambda f: f.name == target.name)  # header last
        for f in written:
            os.replace(f, target.parent / f.name)
    except (OSError, RuntimeError) as exc:
        if _is_no_space(exc):
            raise _no_space(target) from None
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"cannot write {target}: {_short(message)}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _jsonable(obj):
    """numpy scalars/arrays, paths and tuples to JSON types; NaN/infinity to null."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically. numpy values are converted, NaN becomes null."""
    target = Path(path)
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    write_bytes_atomic(text.encode("utf-8"), target)
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and :func:`os.replace`."""
    target = Path(path)
    tmp = _temp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as fh:  # "x": a fresh file with the user's umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_no_space(exc):
            raise _no_space(target) from None
        raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path``; it replaces ``path`` when the block succeeds and is
    removed otherwise. For writers that want a path (torch.save, np.save, savefig)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; move its contents into ``out_dir`` on success.

    Write every result file into the yielded folder. When the block ends normally, ``out_dir`` is
    created if needed (when it does not exist, the temporary folder is simply renamed to it) and each
    entry replaces the one of the same name there; other files the user keeps in ``out_dir`` are left
    alone. When the block raises (including ``KeyboardInterrupt``), the temporary folder is removed
    and ``out_dir`` is untouched. A full disk is re-raised as
    ``InputError("no space left on device writing <out_dir>")``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} exists and is not a folder")
    tmp = _temp_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        if _is_no_space(exc):
            raise _no_space(out) from None
        raise InputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        try:
            if not out.exists():
                os.rename(tmp, out)  # all at once
            else:
                _merge_into(tmp, out)
        except OSError as exc:
            if _is_no_space(exc):
                raise _no_space(out) from None
            raise InputError(f"cannot move results into {out}: {exc.strerror or exc}") from None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_no_space(exc) and not isinstance(exc, InputError):
            raise _no_space(out) from exc
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                _merge_into(entry, target)
                continue
            if target.exists() or target.is_symlink():
                _remove(target)
            os.replace(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
