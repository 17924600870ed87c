"""Many cases: `maml segment-batch` over an nnU-Net-layout folder or a CSV of cases.

Each case goes to OUT/CASE/ exactly as `maml segment` writes it; a case whose stats.json exists is
skipped, so an interrupted batch resumes. Under torchrun (RANK / WORLD_SIZE) each process takes every
WORLD_SIZE-th case. Every process rewrites OUT/summary.csv and summary.json from all finished cases
when it ends, so the last one to finish leaves the complete table.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CancelledError, InputError, MAMLError, OutOfDistributionError
from .model import LoadedModel

CASE_ROW = "case_summary.json"
SUMMARY_FIELDS = ["case", "status", "domain_check", "head", "tumor_count", "liver_volume_ml",
                  "tumor_volume_ml", "tumor_burden", "seconds", "dice_liver", "dice_tumor", "assd_mm_tumor", "message"]


@dataclass
class BatchCase:
    case_id: str
    phases: dict[str, Path]
    label: Path | None = None


def _image_files(folder: Path) -> list[Path]:
    from .io import IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES))


def _strip_suffix(name: str) -> str:
    from .io import IMAGE_SUFFIXES

    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def cases_from_nnunet_folder(root: Path, model_phases: list[str]) -> list[BatchCase]:
    """imagesTs/ (or imagesTr/, or the folder itself) with CASE_XXXX files; labels from labelsTs/Tr."""
    channel_names = None
    if (root / "dataset.json").is_file():
        try:
            channel_names = json.loads((root / "dataset.json").read_text()).get("channel_names")
        except json.JSONDecodeError as error:
            raise InputError(f"{root / 'dataset.json'} is not valid JSON: {error}") from None
    phase_of = ({int(k): v for k, v in channel_names.items()} if channel_names
                else dict(enumerate(model_phases)))
    for images_name, labels_name in (("imagesTs", "labelsTs"), ("imagesTr", "labelsTr"), (".", None)):
        images = root / images_name
        if images.is_dir() and any(_strip_suffix(p.name)[-5:-4] == "_" for p in _image_files(images)):
            break
    else:
        raise InputError(f"{root}: no imagesTs/ or imagesTr/ folder with CASE_XXXX image files")
    cases: dict[str, BatchCase] = {}
    for path in _image_files(images):
        stem = _strip_suffix(path.name)
        case_id, _, channel = stem.rpartition("_")
        if not case_id or not channel.isdigit():
            continue
        phase = phase_of.get(int(channel))
        if phase is None:
            raise InputError(f"{path}: channel {int(channel)} is not named in dataset.json / the model")
        cases.setdefault(case_id, BatchCase(case_id, {})).phases[phase] = path
    labels_dir = root / labels_name if labels_name else None
    for case in cases.values():
        if labels_dir is not None and labels_dir.is_dir():
            found = [p for p in _image_files(labels_dir) if _strip_suffix(p.name) == case.case_id]
            case.label = found[0] if found else None
    return [cases[k] for k in sorted(cases)]


def cases_from_csv(path: Path, model_phases: list[str]) -> list[BatchCase]:
    """Columns: case, one per phase (paths, relative to the CSV's folder), optional label."""
    try:
        rows = list(csv.DictReader(_io.StringIO(path.read_text())))
    except OSError as error:
        raise InputError(f"cannot read case list {path}: {error.strerror}") from None
    if not rows or "case" not in rows[0]:
        raise InputError(f"case list {path} needs a header with a 'case' column and phase columns "
                         f"({', '.join(model_phases)})")
    phase_columns = [c for c in rows[0] if c in model_phases]
    if not phase_columns:
        raise InputError(f"case list {path} has no phase column: expected some of {model_phases}")
    cases = []
    for row in rows:
        phases = {p: path.parent / row[p] for p in phase_columns if (row.get(p) or "").strip()}
        label = path.parent / row["label"] if (row.get("label") or "").strip() else None
        cases.append(BatchCase(row["case"].strip(), phases, label))
    return cases


def find_cases(input_path: str | Path, model_phases: list[str]) -> list[BatchCase]:
    root = Path(input_path)
    if root.is_file() and root.suffix.lower() == ".csv":
        cases = cases_from_csv(root, model_phases)
    elif root.is_dir():
        cases = cases_from_nnunet_folder(root, model_phases)
    else:
        raise InputError(f"batch input {root} is neither a folder nor a .csv case list")
    if not cases:
        raise InputError(f"batch input {root} holds no cases")
    return cases


def shard(cases: list[BatchCase]) -> list[BatchCase]:
    """This process's share under torchrun; every case when run alone."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return cases[rank::world]


def _evaluate(case: BatchCase, labels_image, config) -> dict:
    import SimpleITK as sitk

    from .evaluation import evaluate_images
    from .io import read_image

    truth = read_image(case.label, f"labels of case {case.case_id!r}")
    truth = sitk.Cast(truth, sitk.sitkUInt8)
    names = {l.name: l.value for l in config.labels if l.value != 0}
    metrics = evaluate_images(labels_image, truth, names, case.case_id)
    row = {f"dice_{name}": round(m["dice"], 4) for name, m in metrics.items()}
    if "tumor" in metrics:
        row["assd_mm_tumor"] = metrics["tumor"]["assd_mm"]
    return row


def run_batch(input_path: str | Path, out_dir: str | Path, model: LoadedModel, options,
              overwrite: bool = False, overview: bool = True,
              progress: Callable[[str, float, str], None] | None = None,
              cancel: Callable[[], bool] | None = None) -> list[dict]:
    from .io import write_json
    from .pipeline import segment, write_result

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = shard(find_cases(input_path, model.config.phases))
    rows = []
    for index, case in enumerate(mine):
        if progress:
            progress("case", index / len(mine), f"case {case.case_id} ({index + 1}/{len(mine)})")
        case_dir = out_dir / case.case_id
        if (case_dir / "stats.json").is_file() and not overwrite:
            continue
        start = time.perf_counter()
        row = {"case": case.case_id}
        try:
            result = segment(case.phases, model, options, cancel=cancel)
            if case.label is not None:
                row.update(_evaluate(case, result.labels, model.config))
            write_result(result, case_dir, overview=overview)
            stats = result.stats
            row.update(status="ok", domain_check=stats["domain_check"]["status"],
                       head=stats["head"], tumor_count=stats["tumor_count"],
                       liver_volume_ml=stats.get("liver_volume_ml"),
                       tumor_volume_ml=stats.get("tumor_volume_ml"), tumor_burden=stats.get("tumor_burden"))
        except CancelledError:
            raise
        except OutOfDistributionError as error:
            row.update(status="refused", domain_check="refused", message=str(error))
        except MAMLError as error:
            row.update(status="error", message=str(error))
        row["seconds"] = round(time.perf_counter() - start, 2)
        write_json(row, out_dir / f".{case.case_id}.{CASE_ROW}" if row["status"] != "ok"
                   else case_dir / CASE_ROW)
        rows.append(row)
    if progress:
        progress("case", 1.0, "writing the summary")
    write_summary(out_dir)
    return rows


def write_summary(out_dir: Path) -> list[dict]:
    """summary.csv / summary.json from every case row in OUT (finished and failed cases)."""
    from .io import write_bytes_atomic, write_json

    rows = []
    for path in sorted(out_dir.glob(f"*/{CASE_ROW}")) + sorted(out_dir.glob(f".*.{CASE_ROW}")):
        row = json.loads(path.read_text())
        if path.name.startswith(".") and (out_dir / row["case"] / CASE_ROW).is_file():
            continue  # failed once, done since
        rows.append(row)
    text = _io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(text.getvalue().encode(), out_dir / "summary.csv")
    ok = [r for r in rows if r.get("status") == "ok"]
    summary = {"cases": len(rows), "ok": len(ok), "failed": len(rows) - len(ok), "rows": rows}
    for key in ("dice_liver", "dice_tumor"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = round(sum(values) / len(values), 4)
    write_json(summary, out_dir / "summary.json")
    return rows
