"""Writing phantom cases: the nnU-Net v2 raw layout, cases.json and a contact sheet."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .phantom import LABELS, PHASES, PhantomCase, _check_seed, _check_size, make_case

SHEET_CASES = 8  # cases shown on a data set's contact sheet


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (same ending), then rename it."""
    path = Path(path)
    ending = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{ending}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=2) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_image(path: Path, image: sitk.Image) -> None:
    _atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))


def sheet_views(case: PhantomCase) -> dict:
    """Axial slices through the largest tumor (or the liver centre) in both phases, plus a coronal one."""
    if case.tumors:
        big = max(case.tumors, key=lambda t: t["volume_ml"])
        point = big["centre_mm"]
    else:
        point = case.info["liver_centre_mm"]
    views = {"title": case.case_id}
    for phase in PHASES:
        img, lab = case.images[phase], case.labels[phase]
        p = case.arterial_to_venous.TransformPoint(point) if phase == "arterial" else point
        idx = img.TransformPhysicalPointToContinuousIndex(p)
        k = int(np.clip(round(idx[2]), 0, img.GetSize()[2] - 1))
        views[phase] = (sitk.GetArrayViewFromImage(img)[k].copy(), sitk.GetArrayViewFromImage(lab)[k].copy(),
                        img.GetSpacing())
        if phase == "venous":
            j = int(np.clip(round(idx[1]), 0, img.GetSize()[1] - 1))
            views["coronal"] = (sitk.GetArrayViewFromImage(img)[:, j, :].copy(),
                                sitk.GetArrayViewFromImage(lab)[:, j, :].copy(), img.GetSpacing())
    kinds = ", ".join(t["kind"] for t in case.tumors) or "no tumor"
    mimics = ", ".join(sorted({m["kind"] for m in case.info.get("mimics", [])})) or "none"
    sx, _, sz = case.images["venous"].GetSpacing()
    views["title"] = f"{case.case_id} ({sx:.2f} x {sz:.2f} mm)\ntumors: {kinds}\nmimics: {mimics}"
    return views


def write_contact_sheet(views: list[dict], path) -> Path:
    """PNG of the given cases' views (from ``sheet_views``): CT window W400 L50, label contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = len(views)
    fig, axes = plt.subplots(rows, 3, figsize=(11, 3.7 * rows), squeeze=False)
    for r, v in enumerate(views):
        for c, key in enumerate(("arterial", "venous", "coronal")):
            ax = axes[r][c]
            img, lab, spacing = v[key]
            if key == "coronal":
                img, lab = img[::-1], lab[::-1]  # superior at the top
                aspect = spacing[2] / spacing[0]
            else:
                aspect = spacing[1] / spacing[0]
            ax.imshow(img, cmap="gray", vmin=-150, vmax=250, aspect=aspect, interpolation="bilinear")
            for value, color in ((1, "lime"), (2, "red")):
                if (lab == value).any() or (value == 1 and (lab > 0).any()):
                    ax.contour(lab >= value, levels=[0.5], colors=color, linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title({"arterial": "arterial (own geometry)", "venous": "venous", "coronal": "venous coronal"}[key],
                         fontsize=8)
        axes[r][0].set_ylabel(v["title"], fontsize=8)
    fig.suptitle("MAML phantom cases (synthetic, W400 L50; green liver, red tumor)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png", metadata={"Software": None}))
    plt.close(fig)
    return path


def _check_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("imagesTr", "labelsTr", "labels_arterial", "transforms"):
            (out / sub).mkdir(exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"output directory {str(out)!r} is not writable: {error.strerror or error}") from error
    return out


def write_case(case: PhantomCase, out: Path) -> None:
    """Write one case's images, labels and transform in the nnU-Net v2 raw layout under ``out``."""
    cid = case.case_id
    _write_image(out / "imagesTr" / f"{cid}_0000.nii.gz", case.images["arterial"])
    _write_image(out / "imagesTr" / f"{cid}_0001.nii.gz", case.images["venous"])
    _write_image(out / "labelsTr" / f"{cid}.nii.gz", case.labels["venous"])
    _write_image(out / "labels_arterial" / f"{cid}.nii.gz", case.labels["arterial"])
    _atomic_write(out / "transforms" / f"{cid}_arterial_to_venous.tfm",
                  lambda tmp: sitk.WriteTransform(case.arterial_to_venous, tmp))


def write_dataset(out_dir, n_cases: int, seed: int, size: str = "demo", contact_sheet: bool = True,
                  progress: bool = True) -> Path:
    """Generate ``n_cases`` cases (case i from seed ``seed + i``) into ``out_dir``; return ``out_dir``.

    Layout (nnU-Net v2 raw): imagesTr/CASE_0000.nii.gz (arterial), CASE_0001.nii.gz (venous),
    labelsTr/CASE.nii.gz, dataset.json; plus labels_arterial/CASE.nii.gz, transforms/
    CASE_arterial_to_venous.tfm, cases.json (tumors per case) and contact_sheet.png.
    """
    _check_size(size)
    seed = _check_seed(seed)
    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)) or n_cases < 1:
        raise InputError(f"number of phantom cases {n_cases!r} must be a positive integer")
    out = _check_out_dir(out_dir)
    from tqdm import tqdm

    records, views = [], []
    for i in tqdm(range(int(n_cases)), desc="phantom cases", unit="case", disable=not progress):
        case = make_case(seed + i, size)
        write_case(case, out)
        cid = case.case_id
        records.append({
            "case_id": cid,
            "seed": seed + i,
            "images": {"arterial": f"imagesTr/{cid}_0000.nii.gz", "venous": f"imagesTr/{cid}_0001.nii.gz"},
            "label": f"labelsTr/{cid}.nii.gz",
            "label_arterial": f"labels_arterial/{cid}.nii.gz",
            "arterial_to_venous": f"transforms/{cid}_arterial_to_venous.tfm",
            "n_tumors": len(case.tumors),
            "tumors": case.tumors,
            **{k: v for k, v in case.info.items() if k not in ("seed",)},
        })
        if contact_sheet and len(views) < SHEET_CASES:
            views.append(sheet_views(case))
        del case
    dataset = {
        "name": "MAMLPhantom",
        "description": "Synthetic dual-phase (arterial, venous) liver CT phantoms; not patient data, not for clinical use.",
        "channel_names": {"0": "arterial", "1": "venous"},
        # Read by maml train / maml fingerprint: a model trained on this says so (maml.domain).
        "data_kind": "synthetic",
        "labels": dict(LABELS),
        "numTraining": int(n_cases),
        "file_ending": ".nii.gz",
    }
    _write_json(out / "dataset.json", dataset)
    _write_json(out / "cases.json", {
        "generator": "maml.synthetic",
        "seed": seed,
        "size": size,
        "note": "case i uses seed + i: maml.synthetic.make_case(seed, size) regenerates it; centres are LPS mm "
                "in the venous geometry; arterial_to_venous maps venous points to arterial points (elastix).",
        "cases": records,
    })
    if contact_sheet and views:
        write_contact_sheet(views, out / "contact_sheet.png")
    return out

