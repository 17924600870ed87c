"""The per-epoch log (jsonl, csv) and the training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_path, write_text_atomic


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_logs(out_dir: Path, rows: list[dict]) -> None:
    """log.jsonl and log.csv from all rows (rewritten atomically: a resume drops replayed epochs)."""
    import csv
    import io

    write_text_atomic(out_dir / "log.jsonl",
                      "".join(json.dumps({k: _finite(v) for k, v in r.items()}) + "\n" for r in rows))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text_atomic(out_dir / "log.csv", stream.getvalue())


def read_log(out_dir: Path) -> list[dict]:
    path = out_dir / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line of a killed run
    return rows


def plot_curves(out_dir: Path, rows: list[dict], phases: Sequence[str], labels: Sequence[str]) -> Path:
    """training_curves.png: losses, validation Dice per head and label, learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out_dir / "training_curves.png"
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for key, style in [("train_loss", "-"), ("train_joint", "--")] + [
            (f"train_intra_{p}", ":") for p in phases]:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], style,
                    label=key.replace("train_", ""))
    ax.set_title("training loss (Dice + CE)")
    ax.set_xlabel("epoch")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    heads = ["fused", *phases]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for h, head in enumerate(heads):
        for l, label in enumerate(labels):
            # lines: the per-epoch pseudo-Dice on fixed patches; dots: full-volume validations
            key = f"val_pseudo_dice_{head}_{label}"
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), styles[h % 4], color=colours[l % len(colours)],
                        label=f"{head} {label}")
            key = f"val_dice_{head}_{label}"
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o", color=colours[l % len(colours)], markersize=5,
                        fillstyle="full" if head == "fused" else "none",
                        label=f"{head} {label} (full volumes)")
    ax.set_title("validation Dice: pseudo-Dice per epoch (lines), full volumes (dots)")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(epochs, [r.get("lr") for r in rows])
    ax.set_title("learning rate")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path
