"""Results of an evaluation: the per-case rows, their summary, and the JSON, CSV and table made of them."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import DEFINITIONS, LESION_COLUMNS, METRICS, SIZE_BINS_ML, summarize, summarize_lesions

LESION_TABLE_COLUMNS = ("case", "lesion", "kind", "volume_ml", "size_bin", "detected", "dice")


@dataclass
class EvaluationResult:
    labels: dict[str, int]
    rows: list[dict] = field(default_factory=list)  # one per case and label
    summary: dict = field(default_factory=dict)
    lesion_label: str | None = None  # the label scored lesion by lesion (None: no lesion figures)
    lesion_summary: dict | None = None

    @classmethod
    def from_rows(cls, labels: Mapping[str, int], rows: list[dict], lesion_label: str | None = None
                  ) -> "EvaluationResult":
        result = cls(dict(labels), rows, summarize(rows, list(labels)), lesion_label)
        if lesion_label is not None:
            result.lesion_summary = summarize_lesions([r for r in rows if r["label"] == lesion_label])
        return result

    def to_dict(self) -> dict:
        out = {"definitions": DEFINITIONS, "labels": self.labels,
               "summary": _json_safe(self.summary), "cases": _json_safe(self.rows)}
        if self.lesion_label is not None:
            out["lesion_label"] = self.lesion_label
            out["lesion_summary"] = _json_safe(self.lesion_summary)
        return out

    def csv_columns(self) -> list[str]:
        columns = ["case", "label", "value", *METRICS, "gt_voxels", "pred_voxels"]
        return columns + list(LESION_COLUMNS) if self.lesion_label is not None else columns

    def csv_text(self) -> str:
        """One row per case and label, then mean and std rows (for the lesion label's columns: over
        cases, so its mean of lesions_false_positive is the false positives per case)."""
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=self.csv_columns(), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(row)
        lesion_rows = [r for r in self.rows if r["label"] == self.lesion_label and "lesions" in r]
        for statistic in ("mean", "std"):
            for label, value in self.labels.items():
                row = {"case": statistic, "label": label, "value": value,
                       **{m: self.summary[label][m][statistic] for m in METRICS}}
                if label == self.lesion_label and lesion_rows:
                    reduce = np.mean if statistic == "mean" else np.std
                    row.update({c: float(reduce([float(r[c]) for r in lesion_rows])) for c in LESION_COLUMNS})
                writer.writerow(row)
        return stream.getvalue()

    def lesion_rows(self) -> list[dict]:
        """One row per reference lesion and per false-positive predicted lesion."""
        out = []
        for row in self.rows:
            if row["label"] != self.lesion_label or "lesions" not in row:
                continue
            for index, lesion in enumerate(row["lesions"], start=1):
                out.append({"case": row["case"], "lesion": index, "kind": "reference", **lesion})
            for index, volume in enumerate(row["false_positive_volumes_ml"], start=1):
                out.append({"case": row["case"], "lesion": index, "kind": "false_positive",
                            "volume_ml": volume, "size_bin": "", "detected": "", "dice": 0.0})
        return out

    def lesion_csv_text(self) -> str:
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=LESION_TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.lesion_rows())
        return stream.getvalue()

    def table(self) -> str:
        """A short human-readable summary."""
        lines = [f"{'label':<14}{'n':>4}  {'Dice':>15}  {'ASSD mm':>15}  {'ASSD vox':>15}  {'HD95 mm':>15}"]
        for label in self.labels:
            s = self.summary[label]
            cells = [f"{s[m]['mean']:7.4f}±{s[m]['std']:<7.4f}" for m in METRICS]
            lines.append(f"{label:<14}{s['dice']['n']:>4}  " + "  ".join(cells))
        if self.lesion_summary is not None:
            lines += lesion_table(self.lesion_label, self.lesion_summary)
        return "\n".join(lines)


def lesion_table(label: str, s: Mapping) -> list[str]:
    lines = [
        f"{label} lesions: {s['detected_lesions']} of {s['reference_lesions']} detected (sensitivity "
        f"{s['lesion_sensitivity']:.3f}), {s['false_positives']} false positives "
        f"({s['false_positives_per_case']:.2f} per case)",
        f"  lesion-wise Dice {s['lesion_wise_dice']['mean']:.4f}±{s['lesion_wise_dice']['std']:.4f}"
        f" (per case, missed and false lesions count 0); Dice of detected lesions "
        f"{s['detected_lesion_dice']:.4f}",
    ]
    cells = []
    for name, _, _ in SIZE_BINS_ML:
        b = s["size_bins"][name]
        cells.append(f"{name}: {b['detected']}/{b['lesions']} detected, Dice {b['dice_mean']:.4f}"
                     if b["lesions"] else f"{name}: none")
    lines.append("  by size: " + "; ".join(cells))
    return lines


def _json_safe(value):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def result_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """OUT.json, OUT.csv and OUT_lesions.csv (``out`` may end in .json, .csv or neither)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".json", ".csv") else out
    # names are appended to, never substituted: OUT "tune_o0.25" is not "tune_o0" + ".25"
    return tuple(stem.with_name(stem.name + ending) for ending in (".json", ".csv", "_lesions.csv"))


def write_results(result: EvaluationResult, out: str | Path) -> list[Path]:
    """Writes OUT.json and OUT.csv, and OUT_lesions.csv (one row per lesion) when lesions were
    scored; returns the paths written."""
    from ..io import write_text_atomic  # lazily: SimpleITK stays unloaded for pure scoring

    json_path, csv_path, lesions_path = result_paths(out)
    write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2))
    write_text_atomic(csv_path, result.csv_text())
    if result.lesion_label is None:
        return [json_path, csv_path]
    write_text_atomic(lesions_path, result.lesion_csv_text())
    return [json_path, csv_path, lesions_path]
