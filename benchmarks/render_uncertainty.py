"""The README's uncertainty picture: the bundled sample case, its labels and its uncertainty map.

    python benchmarks/render_uncertainty.py --out Resources/Screenshots/uncertainty-sample.png

Segments the sample case with the bundled model (both phases, as `maml segment` does) and draws the
axial slice through the largest tumor: the venous phase with the liver and tumor outlines, and the
uncertainty map over it, with each tumor's mean uncertainty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MAMLSegmentation"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from maml.pipeline import default_model_path, segment

    sample = default_model_path().parents[1] / "SampleData"
    result = segment({"arterial": str(sample / "phantom_arterial.nrrd"),
                      "venous": str(sample / "phantom_venous.nrrd")})
    labels = sitk.GetArrayFromImage(result.labels)
    uncertainty = sitk.GetArrayFromImage(result.uncertainty)
    venous = sitk.GetArrayFromImage(result.phases_on_reference["venous"]).astype(np.float32)
    tumors = result.stats["tumors"]
    k = tumors[0]["axial_slice_index"] if tumors else int(np.argmax((labels > 0).sum((1, 2))))
    # SimpleITK arrays are (z, y, x) in LPS index order: row 0 is anterior for an identity direction
    extent = (0, labels.shape[2] * result.labels.GetSpacing()[0], labels.shape[1] * result.labels.GetSpacing()[1], 0)

    fig = Figure(figsize=(9.0, 4.6), dpi=110, facecolor="white")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2)
    for ax in panels:
        ax.imshow(venous[k], cmap="gray", vmin=-100, vmax=250, extent=extent)
        ax.set_xticks([])
        ax.set_yticks([])
    for value, colour in ((1, "#DB9166"), (2, "#DE4D42")):
        panels[0].contour(labels[k] == value, levels=[0.5], colors=colour, linewidths=1.2, extent=extent,
                          origin="upper")
    heat = panels[1].imshow(np.ma.masked_less(uncertainty[k], 0.02), cmap="inferno", vmin=0, vmax=1,
                            alpha=0.85, extent=extent)
    panels[1].contour(labels[k] == 2, levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed",
                      extent=extent, origin="upper")
    bar = fig.colorbar(heat, ax=panels[1], fraction=0.046, pad=0.02)
    bar.set_label("uncertainty (0-1)")
    panels[0].set_title("venous phase: liver and tumor outlines", fontsize=9)
    panels[1].set_title("uncertainty: entropy and head disagreement", fontsize=9)
    means = ", ".join(f"tumor {t['id']} {t['mean_uncertainty']:.2f}" for t in tumors[:4])
    fig.suptitle(f"Bundled sample case, axial slice {k}; mean uncertainty per tumor: {means}", fontsize=9)
    fig.savefig(args.out)
    print(f"wrote {args.out}; domain check: {result.stats['domain_check']['status']}")


if __name__ == "__main__":
    main()
