"""Synthetic dual-phase (arterial + venous) contrast-enhanced liver CT with ground truth.

No public multi-phase liver CT can be downloaded where this project is developed and tested, so the
tests, the demo, the sample data and the demo model use these phantoms. So that a model trained on
them learns the liver and its tumors rather than this generator, everything the generator controls is
drawn per case over published ranges: the acquisition (``scanner``: slice thickness 0.7-5 mm,
in-plane pixels, field of view that sometimes cuts the body, noise level and grain), the contrast
timing and each tissue's HU in both phases (``contrast``), the body and liver shape (``anatomy``),
0-8 tumors of several kinds and 3-80 mm, and liver-labelled look-alikes: cysts, hemangiomas, focal
fat and sparing, perfusion differences and vessels cut across (``lesions``).

Geometry (all in LPS millimetres, as SimpleITK): the anatomy is drawn on a grid that contains the
venous image; the venous image is that grid cropped. The arterial image has its own grid (origin and
number of slices differ) and its anatomy is displaced by breathing: ``arterial_to_venous`` (rigid
shift of 5-15 mm mostly cranio-caudal, 1-3 degree rotation, smooth B-spline deformation) maps a
physical point of the venous (fixed) image to the corresponding point of the arterial (moving) image,
which is the direction elastix and ``sitk.Resample`` use. The arterial phase is rendered by pulling the
anatomy through the numerically inverted transform. Both phases then get the scanner's blur
(partial volume: in-plane point spread and slice profile) and correlated noise.

Ground truth: 0 background, 1 liver (parenchyma with its intrahepatic vessels and mimics), 2 tumor, in
the venous geometry (``labels["venous"]``); ``labels["arterial"]`` is the same anatomy in the arterial
geometry, for scoring registration.

Everything is a deterministic function of ``(seed, size)``: ``write_dataset`` gives case ``i`` the seed
``seed + i``, so any case can be regenerated alone with ``make_case(seed + i, size)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .anatomy import add_ascites, draw_anatomy
from .breathing import breathing_transform, invert_breathing
from .contrast import (AORTA, KIND_WEIGHTS, LIVER, LIVER_CODES, MIMIC_KINDS, PORTAL, TUMOR_BASE, TUMOR_KINDS,
                       draw_timing, lesion_hu, mimic_hu, tissue_hu)
from .lesions import MIN_DIAMETER_MM, mimic_plan, place_lesions, tumor_plan
from .scanner import draw_protocol, image, scan
from .shapes import Grid

PHASES = ("arterial", "venous")
LABELS = {"background": 0, "liver": 1, "tumor": 2}

# Grid per size. "demo" draws its geometry per case (``scanner.draw_protocol``) around ``shape``'s
# voxel count; "tiny" (fast tests) and "full" keep a fixed grid with the listed in-plane spacing
# range and slice spacings. Noise: standard deviation range (HU) in the venous phase.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (80, 80, 40), "inplane": (4.0, 4.4), "slices": (5.0,), "noise": (8.0, 14.0)},
    "demo": {"shape": (160, 160, 80), "random_geometry": True, "noise": (8.0, 30.0)},
    "full": {"shape": (512, 512, 150), "inplane": (0.62, 0.9), "slices": (1.5,), "noise": (12.0, 30.0)},
}
VISIBLE_HU = 10.0  # |mean tumor - mean liver| in a phase's noise-free image for it to count as visible


@dataclass
class PhantomCase:
    """One synthetic case. Images are Int16 HU; labels UInt8 0/1/2 in each phase's own geometry.

    ``tumors`` lists the labelled lesions, ``info["mimics"]`` the liver-labelled look-alikes,
    ``info`` also what was drawn (protocol, timing, HU per tissue and phase).
    """

    case_id: str
    images: dict[str, sitk.Image]
    labels: dict[str, sitk.Image]
    arterial_to_venous: sitk.Transform
    tumors: list[dict]
    info: dict = field(default_factory=dict)


def case_id_for_seed(seed: int) -> str:
    return f"phantom_{seed:04d}"


def _check_size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise InputError(f"unknown phantom size {size!r}: choose one of {', '.join(SIZES)}")
    return SIZES[size]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"phantom seed {seed!r} must be a non-negative integer")
    return int(seed)


def _check_kinds(kinds, allowed, what: str):
    if kinds is not None:
        bad = [k for k in kinds if k not in allowed]
        if bad:
            raise InputError(f"unknown {what}(s) {bad}: choose from {', '.join(allowed)}")


def _draw_body(rng, spec: dict) -> tuple[dict, dict]:
    """Body outline and liver shape, and the protocol whose field of view fits (or cuts) the body."""
    if spec.get("random_geometry"):
        A = float(rng.uniform(120, 190))  # half-width: 24-38 cm wide abdomens
        protocol = draw_protocol(rng, spec, 2 * A)
        fov_y = protocol["size"][1] * protocol["spacing"][1]
        Ba = min(A * rng.uniform(0.62, 0.8), fov_y * 0.48)
    else:
        protocol = draw_protocol(rng, spec, 0.0)
        fov_x = protocol["size"][0] * protocol["spacing"][0]
        fov_y = protocol["size"][1] * protocol["spacing"][1]
        A = fov_x * rng.uniform(0.39, 0.45)
        Ba = min(A * rng.uniform(0.66, 0.8), fov_y * 0.42)
    scale = A / 150.0
    lob = rng.random()
    body = {
        "A": A, "Ba": Ba, "Bp": Ba * rng.uniform(0.85, 0.95),
        "fat": rng.uniform(6, 32) * scale, "muscle": rng.uniform(6, 12),
        "liver_scale": float(rng.uniform(0.82, 1.2)),
        "left_lobe": float(rng.uniform(0.55, 1.4)),
        "lobulation": 0.0 if lob < 0.6 else float(rng.uniform(0.02, 0.05) if lob < 0.85 else rng.uniform(0.05, 0.1)),
        "riedel": bool(rng.random() < 0.12),
    }
    return body, protocol


def make_case(seed: int, size: str = "demo", *, tumor_kinds: Sequence[str] | None = None,
              mimic_kinds: Sequence[str] | None = None) -> PhantomCase:
    """Generate one dual-phase case, a deterministic function of ``(seed, size)``.

    ``tumor_kinds`` (optional) replaces the random number and kinds of tumors, e.g. ``["hypovascular"]``
    or ``[]``; kinds are those of ``TUMOR_KINDS``, each at its typical size. ``mimic_kinds`` does the
    same for the liver-labelled look-alikes (``MIMIC_KINDS``). A lesion that finds no room is left out.
    """
    spec = _check_size(size)
    seed = _check_seed(seed)
    _check_kinds(tumor_kinds, TUMOR_KINDS, "tumor kind")
    _check_kinds(mimic_kinds, MIMIC_KINDS, "mimic kind")
    rng = np.random.default_rng(seed)
    body, protocol = _draw_body(rng, spec)
    timing = draw_timing(rng)
    nx, ny, nz = protocol["size"]
    sxy, _, sz = spacing = protocol["spacing"]
    lz = nz * sz

    # Patient-relative frame: x=0 midline, y=0 body centre, z=0 apex of the right hemidiaphragm. Short
    # z extents (thin slices) cover a random part of the liver.
    z_top = rng.uniform(min(28.0, lz - 150.0), 55.0)
    body_y = rng.uniform(-6, 10)  # body centre relative to the field-of-view centre (table below)
    c0 = np.array([rng.uniform(-5, 5), rng.uniform(-20, 20), rng.uniform(-450, -250)])  # world of patient origin
    venous_origin_rel = np.array([-(nx - 1) / 2 * sxy + protocol["fov_shift_x"], -(ny - 1) / 2 * sxy - body_y,
                                  z_top - (nz - 1) * sz])
    pad_xy, pad_z = int(math.ceil(10.0 / sxy)), int(math.ceil(40.0 / sz))
    anat_origin_rel = venous_origin_rel - np.array([pad_xy * sxy, pad_xy * sxy, pad_z * sz])
    grid = Grid(anat_origin_rel, spacing, (nx + 2 * pad_xy, ny + 2 * pad_xy, nz + 2 * pad_z))
    vsl = (slice(pad_z, pad_z + nz), slice(pad_xy, pad_xy + ny), slice(pad_xy, pad_xy + nx))

    tissue, tex, liver_sl, has_gb = draw_anatomy(rng, grid, body)
    # Perihepatic fluid in some cases, from its own stream so that the other draws stay as they were.
    fluid_rng = np.random.default_rng([seed, 3])
    ascites_mm = float(fluid_rng.uniform(3, 15)) if fluid_rng.random() < 0.12 else 0.0
    if ascites_mm:
        add_ascites(grid, tissue, liver_sl, ascites_mm)
    min_tumor_mm = max(MIN_DIAMETER_MM, sz, 2.0 * sxy)  # visible: about a slice and two pixels across
    plan = tumor_plan(rng, TUMOR_KINDS, KIND_WEIGHTS, tumor_kinds, min_diameter=min_tumor_mm)
    if mimic_kinds is None:
        mimics_planned = mimic_plan(rng, timing["steatosis"])
    else:
        mimics_planned = [(k, float(rng.uniform(5, 12))) for k in mimic_kinds]
    # Tumors the caller names are placed whole inside the liver (tests measure their interior).
    tumors, mimics = place_lesions(rng, grid, tissue, tex, liver_sl, vsl, plan, mimics_planned,
                                   subcapsular=0.25 if tumor_kinds is None else 0.0)

    # Each tissue's HU in both phases, from the case's contrast timing.
    lut = np.zeros((2, 256), np.float32)
    amp = np.zeros((2, 256), np.float32)
    for code, ((ha, hv), (ta, tv)) in tissue_hu(rng, timing).items():
        lut[:, code], amp[:, code] = (ha, hv), (ta, tv)
    liver_hu = (float(lut[0, LIVER]), float(lut[1, LIVER]))
    blood = (float(lut[0, AORTA]), float(lut[1, PORTAL]))
    for m in mimics:
        for part, ((ha, hv), (ta, tv)) in mimic_hu(rng, m["kind"], liver_hu, blood, timing).items():
            lut[:, m["code"] + part], amp[:, m["code"] + part] = (ha, hv), (ta, tv)
    for t in tumors:
        for part, ((ha, hv), (ta, tv)) in lesion_hu(rng, t["kind"], liver_hu, timing["conspicuity"]).items():
            lut[:, t["code"] + part], amp[:, t["code"] + part] = (ha, hv), (ta, tv)

    hu = [lut[p][tissue] + amp[p][tissue] * tex for p in (0, 1)]
    del tex
    liver_m = tissue == LIVER
    liver_mean = [float(h[liver_m].mean()) for h in hu]
    del liver_m

    label_of = np.zeros(256, np.uint8)
    label_of[list(LIVER_CODES)] = 1
    label_of[TUMOR_BASE:] = 2
    label = label_of[tissue]

    anat_origin = anat_origin_rel + c0
    venous_origin = venous_origin_rel + c0
    venous_label = image(label[vsl].copy(), venous_origin, spacing)
    vtis = tissue[vsl]
    voxel_ml = sxy * sxy * sz / 1000.0
    for t in tumors:
        codes = (t["code"], t["code"] + 1, t["code"] + 2)
        # Contrast of the lesion's interior (body and necrosis; a thin capsule or rim is left out).
        tm = (tissue == codes[0]) | (tissue == codes[2])
        if not tm.any():
            tm = (tissue >= codes[0]) & (tissue <= codes[2])
        contrast = {ph: round(float(hu[p][tm].mean()) - liver_mean[p], 1) for p, ph in enumerate(PHASES)}
        t["contrast_hu"] = contrast
        t["visible_phases"] = [ph for ph in PHASES if abs(contrast[ph]) >= VISIBLE_HU]
        t["volume_ml"] = round(float(((vtis >= codes[0]) & (vtis <= codes[2])).sum()) * voxel_ml, 3)
        t["centre_mm"] = [round(float(c), 2) for c in np.asarray(t.pop("centre_rel")) + c0]
        del t["code"]
    for m in mimics:
        inside = (vtis >= m["code"]) & (vtis <= m["code"] + 2)
        m["volume_ml"] = round(float(inside.sum()) * voxel_ml, 3)
        m["centre_mm"] = [round(float(c), 2) for c in np.asarray(m.pop("centre_rel")) + c0]
        del m["code"]
    del vtis

    # Breathing misalignment and the arterial grid.
    anat_size_mm = np.array(grid.size) * np.array(spacing)
    domain = (anat_origin - np.array(spacing) * 0.5 - 20.0, anat_size_mm + 40.0)
    lz_i, ly_i, lx_i = np.nonzero(label[vsl] > 0)
    liver_c = np.array([lx_i.mean() * sxy, ly_i.mean() * sxy, lz_i.mean() * sz]) + venous_origin
    a2v, rigid, bs, breathing = breathing_transform(rng, venous_label, domain, liver_c)
    v_from_a = invert_breathing(rigid, bs, domain, step=8.0)
    art_origin = venous_origin + np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-10, 10)])
    art_nz = nz + int(rng.integers(-3, 4))
    art_ref = sitk.Image([nx, ny, art_nz], sitk.sitkFloat32)
    art_ref.SetOrigin([float(o) for o in art_origin])
    art_ref.SetSpacing(spacing)

    anat_art = image(hu[0], anat_origin, spacing)
    arterial_hu = sitk.Resample(anat_art, art_ref, v_from_a, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    del anat_art
    masks = sitk.GetImageFromArray(np.stack([label > 0, label == 2], axis=-1).astype(np.float32), isVector=True)
    masks.SetOrigin([float(o) for o in anat_origin])
    masks.SetSpacing(spacing)
    m = sitk.GetArrayFromImage(sitk.Resample(masks, art_ref, v_from_a, sitk.sitkLinear, 0.0))
    del masks
    art_lab = np.zeros(m.shape[:3], np.uint8)
    art_lab[m[..., 0] >= 0.5] = 1
    art_lab[m[..., 1] >= 0.5] = 2
    del m
    arterial_label = sitk.GetImageFromArray(art_lab)
    arterial_label.CopyInformation(art_ref)

    venous_hu = image(np.ascontiguousarray(hu[1][vsl]), venous_origin, spacing)
    del hu
    noise_a, noise_v = protocol["noise_sd_arterial"], protocol["noise_sd_venous"]
    grain, psf = protocol["noise_grain_mm"], protocol["psf_mm"]
    images = {
        "arterial": scan(arterial_hu, np.random.default_rng([seed, 1]), noise_a, grain, psf),
        "venous": scan(venous_hu, np.random.default_rng([seed, 2]), noise_v, grain, psf),
    }
    key_tissues = {"liver": LIVER, "aorta": AORTA, "portal_vein": PORTAL}
    info = {
        "seed": seed,
        "size": size,
        "spacing_xyz": [float(s) for s in spacing],
        "grid_xyz": [int(n) for n in (nx, ny, nz)],
        "noise_sd_hu": {"arterial": round(noise_a, 2), "venous": round(noise_v, 2)},
        "noise_grain_mm": round(grain, 2),
        "liver_hu": {ph: round(liver_mean[p], 1) for p, ph in enumerate(PHASES)},
        "tissue_hu": {name: {ph: round(float(lut[p, code]), 1) for p, ph in enumerate(PHASES)}
                      for name, code in key_tissues.items()},
        "contrast_timing": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing.items()},
        "body_width_mm": round(2 * float(body["A"]), 1),
        "min_tumor_diameter_mm": round(float(min_tumor_mm), 2),
        "liver_volume_ml": round(float((label[vsl] > 0).sum()) * voxel_ml, 1),
        "liver_centre_mm": [round(float(c), 2) for c in liver_c],
        "gallbladder": bool(has_gb),
        "ascites_mm": round(ascites_mm, 1),
        "mimics": mimics,
        "breathing": breathing,
    }
    return PhantomCase(
        case_id=case_id_for_seed(seed),
        images=images,
        labels={"arterial": arterial_label, "venous": venous_label},
        arterial_to_venous=a2v,
        tumors=tumors,
        info=info,
    )
