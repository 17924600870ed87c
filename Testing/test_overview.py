"""maml.overview: the overview PNG on a crude two-phase abdomen (see overview_phantom.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from maml import overview
from maml.errors import InputError
from maml.stats import compute_statistics
from overview_phantom import make_abdomen

NAMES = ["background", "liver", "tumor"]


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@pytest.fixture(scope="module")
def abdomen():
    return make_abdomen(size=(96, 80, 16), spacing=(3.6, 3.6, 7.5))


def _expected_size(n_phases, with_attention, aspect):
    ncols = 3 if with_attention else 2
    panel_h = overview._PANEL_W * min(max(aspect, 0.4), 2.0)
    width = (overview._ROW_LABEL_W + ncols * overview._PANEL_W + (ncols - 1) * overview._GAP
             + (overview._COLORBAR_W if with_attention else 0.15))
    height = (overview._TITLE_H + overview._HEADER_H + n_phases * panel_h
              + (n_phases - 1) * overview._GAP + overview._FOOTER_H)
    return round(height * overview.DPI), round(width * overview.DPI)


def _panel_pixels(fig, ax):
    """The RGB pixels of one axes of a rendered figure."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    box = ax.get_window_extent()
    height = rgba.shape[0]
    r0, r1 = int(round(height - box.y1)), int(round(height - box.y0))
    c0, c1 = int(round(box.x0)), int(round(box.x1))
    return rgba[r0:r1, c0:c1, :3].astype(float)


def test_two_phases_with_attention(tmp_path, abdomen):
    phases, labels, attention = abdomen
    stats = compute_statistics(labels, label_names=NAMES)
    path = overview.write_overview(tmp_path / "out" / "overview.png", phases, labels, attention, stats,
                                   label_names=NAMES, title="case 001")
    assert path.exists() and path.stat().st_size < 1_000_000
    assert [p.name for p in path.parent.iterdir()] == ["overview.png"]  # no temporary file left
    image = imread(path)
    fig = overview.render_overview(phases, labels, attention, stats, NAMES)
    ax = fig.axes[0]
    aspect = (ax.get_ylim()[0] - ax.get_ylim()[1]) / (ax.get_xlim()[1] - ax.get_xlim()[0])
    assert image.shape[:2] == _expected_size(2, True, aspect)
    # 2 rows x 3 panels + 2 colour bars.
    assert len(fig.axes) == 8
    # The picture is not blank: the CT panels hold a range of grey levels.
    assert image[..., :3].std() > 0.1


def test_panels_keep_physical_aspect_ratio():
    """Pixels 2 mm wide and 4 mm tall: the panel's screen proportions are those of the field in mm."""
    phases, labels, _ = make_abdomen(size=(150, 60, 8), spacing=(2.0, 4.0, 10.0))
    fig = overview.render_overview(phases, labels)
    ax = fig.axes[0]
    w_mm = ax.get_xlim()[1] - ax.get_xlim()[0]
    h_mm = ax.get_ylim()[0] - ax.get_ylim()[1]
    image = ax.get_images()[0]
    rows, cols = image.get_array().shape
    assert w_mm == pytest.approx(cols * 2.0) and h_mm == pytest.approx(rows * 4.0)
    fig.canvas.draw()
    box = ax.get_window_extent()
    assert box.height / box.width == pytest.approx(h_mm / w_mm, rel=0.02)


def test_without_attention_and_without_tumor(tmp_path, abdomen):
    phases, labels, _ = abdomen
    venous_only = {"venous": phases["venous"]}
    path = overview.write_overview(tmp_path / "single.png", venous_only, labels, None, label_names=NAMES)
    image = imread(path)
    fig = overview.render_overview(venous_only, labels, None, label_names=NAMES)
    assert len(fig.axes) == 2  # CT and outlines only: no heatmap, no colour bar
    ax = fig.axes[0]
    aspect = (ax.get_ylim()[0] - ax.get_ylim()[1]) / (ax.get_xlim()[1] - ax.get_xlim()[0])
    assert image.shape[:2] == _expected_size(1, False, aspect)

    no_tumor = sitk.Cast(sitk.ChangeLabel(labels, {2: 1}), sitk.sitkUInt8)
    stats = compute_statistics(no_tumor)
    assert stats["tumor_count"] == 0
    fig = overview.render_overview(phases, no_tumor, None, stats)
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "Tumors found: 0" in texts and "liver's centre" in texts
    assert "Research use only - not for clinical use" in texts
    overview.write_overview(tmp_path / "no_tumor.png", phases, no_tumor)
    assert imread(tmp_path / "no_tumor.png").ndim == 3

    empty = sitk.Image(labels.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labels)
    fig = overview.render_overview(phases, empty)
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "middle slice" in texts and "n/a (no liver)" in texts


def test_slice_goes_through_the_largest_tumor(abdomen):
    phases, labels, attention = abdomen
    stats = compute_statistics(labels)
    fig = overview.render_overview(phases, labels, attention, stats)
    texts = " ".join(t.get_text() for t in fig.texts)
    k = stats["tumors"][0]["centroid_index"][2]
    z = labels.TransformIndexToPhysicalPoint((0, 0, k))[2]  # identity direction: z depends on k only
    assert f"z = {z:.1f} mm" in texts
    assert "largest tumor" in texts
    assert f"{stats['tumors'][0]['diameter_mm']:.1f} mm" in texts


def _marker_volume(direction):
    """A volume with a bright block on the patient's right-anterior side and no labels."""
    size, spacing = (40, 36, 6), (5.0, 5.0, 8.0)
    ref = sitk.Image(list(size), sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetDirection(tuple(np.asarray(direction, float).ravel()))
    ref.SetOrigin(tuple(-(np.asarray(direction, float).reshape(3, 3) * spacing) @ ((np.array(size) - 1) / 2)))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    m = np.asarray(ref.GetDirection()).reshape(3, 3) * spacing
    phys = idx @ m.T + np.asarray(ref.GetOrigin())
    values = np.full(len(idx), -50, np.int16)
    # Patient right = -x (LPS), anterior = -y.
    values[(phys[:, 0] < -40) & (phys[:, 0] > -80) & (phys[:, 1] < -30) & (phys[:, 1] > -70)] = 400
    values[np.abs(phys[:, 0]) > 90] = -1000  # air at the sides: Hounsfield units
    array = np.zeros(size[::-1], np.int16)
    array[idx[:, 2], idx[:, 1], idx[:, 0]] = values
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    labels = sitk.Image(list(size), sitk.sitkUInt8)
    labels.CopyInformation(ref)
    return image, labels


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]]),
     _rotation([0.2, -0.3, 1.0], np.deg2rad(12))],
    ids=["LPS", "RAS", "rotated90", "oblique"],
)
def test_radiological_orientation(direction):
    """Whatever the storage order, the patient's right-anterior block shows top-left on screen."""
    image, labels = _marker_volume(direction)
    fig = overview.render_overview({"venous": image}, labels)
    panel = _panel_pixels(fig, fig.axes[0]).mean(axis=2)
    h, w = panel.shape
    quadrants = {
        "top-left": panel[: h // 2, : w // 2].mean(), "top-right": panel[: h // 2, w // 2:].mean(),
        "bottom-left": panel[h // 2:, : w // 2].mean(), "bottom-right": panel[h // 2:, w // 2:].mean(),
    }
    assert max(quadrants, key=quadrants.get) == "top-left", quadrants


def test_same_picture_for_any_storage_order(tmp_path, abdomen):
    phases, labels, attention = abdomen
    reference = overview.render_overview(phases, labels, attention)
    flip = {n: sitk.DICOMOrient(im, "RAI") for n, im in phases.items()}
    flip_att = {n: sitk.DICOMOrient(im, "RAI") for n, im in attention.items()}
    flipped = overview.render_overview(flip, sitk.DICOMOrient(labels, "RAI"), flip_att)
    a = _panel_pixels(reference, reference.axes[2])
    b = _panel_pixels(flipped, flipped.axes[2])
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 1.0


def test_oblique_image_is_drawn(tmp_path):
    direction = _rotation([1, 1, 0.3], np.deg2rad(20))
    phases, labels, attention = make_abdomen(size=(72, 60, 12), spacing=(4.8, 4.8, 10.0),
                                             direction=direction)
    path = overview.write_overview(tmp_path / "oblique.png", phases, labels, attention)
    assert imread(path).shape[2] in (3, 4)


def test_bad_inputs(abdomen):
    phases, labels, attention = abdomen
    with pytest.raises(InputError, match="no phase"):
        overview.render_overview({}, labels)
    small = sitk.Image([10, 10, 10], sitk.sitkInt16)
    with pytest.raises(InputError, match="phase 'venous' is not on the label map's grid"):
        overview.render_overview({"venous": small}, labels)
    with pytest.raises(InputError, match="attention map 'delayed' has no phase"):
        overview.render_overview(phases, labels, {"delayed": attention["venous"]})


def test_footer_shows_each_tumors_enhancement(abdomen):
    from maml.stats import add_enhancement

    phases, labels, attention = abdomen
    plain = compute_statistics(labels, label_names=NAMES)
    stats = add_enhancement(compute_statistics(labels, label_names=NAMES), labels, phases)
    assert stats["tumors"]
    lines = overview._footer_lines(stats, dict(enumerate(NAMES)), 1, 2)
    extra = lines[len(overview._footer_lines(plain, dict(enumerate(NAMES)), 1, 2)):]
    shown = stats["tumors"][: overview.MAX_ENHANCEMENT_LINES]
    assert len(extra) == len(shown)
    for line, tumor in zip(extra, shown):
        e = tumor["enhancement"]
        assert line.startswith(f"Tumor {tumor['id']} vs liver: arterial {e['contrast_hu']['arterial']:+.0f} HU")
        assert f"venous {e['contrast_hu']['venous']:+.0f} HU" in line
        assert f"APHE {'yes' if e['aphe'] else 'no'}" in line and "not LI-RADS" in line
    # the footer grows by one line per tumor shown
    taller = overview.render_overview(phases, labels, attention, stats, NAMES)
    plain_fig = overview.render_overview(phases, labels, attention, plain, NAMES)
    grown = taller.get_size_inches()[1] - plain_fig.get_size_inches()[1]
    assert grown == pytest.approx(overview._LINE_H * len(extra))


@pytest.mark.parametrize("accepted", [True, False])
def test_a_domain_warning_cannot_be_missed(abdomen, accepted):
    """Accepted out-of-distribution input: a red band over the title and a watermark across the
    panels; a plain warning (e.g. a model without fingerprint): the band only, in orange."""
    phases, labels, attention = abdomen
    stats = compute_statistics(labels, label_names=NAMES)

    def pixels(domain):
        fig = overview.render_overview(phases, labels, attention, dict(stats, domain_check=domain), NAMES)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)

    plain = pixels({"status": "ok", "sentence": "fine"})
    marked = pixels({"status": "warning", "accepted_out_of_distribution": accepted,
                     "sentence": "maml-liver-demo was trained on synthetic phantoms only"})
    changed = np.abs(marked - plain).sum(-1) > 30
    rows = changed.shape[0]
    assert changed[: rows // 10].mean() > 0.1  # the band over the title
    band = marked[: rows // 10][changed[: rows // 10]]
    assert (band[:, 0] > band[:, 1] + 60).mean() > 0.5  # red or orange, not black text
    panels = changed[rows // 4: 3 * rows // 4].mean()
    assert (panels > 0.01) if accepted else (panels == 0)
