"""Synthetic dual-phase (arterial + venous) contrast-enhanced liver CT with ground truth.

No public multi-phase liver CT can be downloaded where this project is developed and tested, so the
tests, the demo, the sample data and the demo model use these phantoms. Each case is an abdominal CT
from the lung bases to the kidneys: body outline, subcutaneous and visceral fat, abdominal wall and
paraspinal muscles, vertebrae and ribs, lung bases, heart, aorta, inferior vena cava, portal, splenic
and hepatic veins, liver, gallbladder, spleen, kidneys (cortex, medulla, sinus), stomach with an
air-fluid level, pancreas and bowel, and 0-4 liver tumors of several kinds (see ``TUMOR_KINDS``). The
Hounsfield units follow each phase's enhancement (late arterial: aorta ~300, liver ~65; portal
venous: aorta ~150, portal vein ~180, liver ~110).

Geometry (all in LPS millimetres, as SimpleITK): the anatomy is drawn on a grid that contains the
venous image; the venous image is that grid cropped. The arterial image has its own grid (origin and
number of slices differ) and its anatomy is displaced by breathing: ``arterial_to_venous`` (rigid
shift of 5-15 mm mostly cranio-caudal, 1-3 degree rotation, smooth B-spline deformation) maps a
physical point of the venous (fixed) image to the corresponding point of the arterial (moving) image,
which is the direction elastix and ``sitk.Resample`` use. The arterial phase is rendered by pulling the
anatomy through the numerically inverted transform. Both phases then get the scanner's blur
(in-plane point spread and slice profile) and correlated noise.

Ground truth: 0 background, 1 liver (parenchyma with its intrahepatic vessels), 2 tumor, in the
venous geometry (``labels["venous"]``); ``labels["arterial"]`` is the same anatomy in the arterial
geometry, for scoring registration.

Everything is a deterministic function of ``(seed, size)``: ``write_dataset`` gives case ``i`` the seed
``seed + i``, so any case can be regenerated alone with ``make_case(seed + i, size)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "PhantomCase",
    "make_case",
    "write_dataset",
    "write_contact_sheet",
    "SIZES",
    "TUMOR_KINDS",
    "case_id_for_seed",
]

PHASES = ("arterial", "venous")
LABELS = {"background": 0, "liver": 1, "tumor": 2}

# Grid per size: (nx, ny, nz), in-plane spacing range (mm), slice spacings to choose from (mm).
# "tiny" is for fast tests only.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (80, 80, 40), "inplane": (4.0, 4.4), "slices": (5.0,), "noise": (8.0, 12.0)},
    "demo": {"shape": (160, 160, 80), "inplane": (1.95, 2.25), "slices": (2.5, 3.0), "noise": (9.0, 14.0)},
    "full": {"shape": (512, 512, 150), "inplane": (0.62, 0.9), "slices": (1.5,), "noise": (16.0, 24.0)},
}

TUMOR_KINDS = (
    "hypervascular",  # HCC-like: bright in arterial, washout in venous, enhancing capsule
    "hypovascular",  # metastasis-like: dark, clearest in venous, faint arterial rim
    "arterial_only",  # small hypervascular lesion, isodense in venous
    "venous_only",  # hypovascular lesion isodense in arterial
    "cyst",  # water density, sharp, no enhancement
    "necrotic",  # enhancing rim around a necrotic (fluid) core
    "heterogeneous",  # mosaic interior with necrotic patches
)
_KIND_WEIGHTS = (0.24, 0.24, 0.1, 0.1, 0.1, 0.11, 0.11)
_KIND_RADIUS = {  # mm
    "hypervascular": (9.0, 28.0),
    "hypovascular": (8.0, 26.0),
    "arterial_only": (6.0, 14.0),
    "venous_only": (6.0, 16.0),
    "cyst": (6.0, 22.0),
    "necrotic": (16.0, 36.0),
    "heterogeneous": (14.0, 32.0),
}
_N_TUMORS_P = (0.15, 0.3, 0.25, 0.18, 0.12)  # P(0 tumors) ... P(4 tumors)
VISIBLE_HU = 10.0  # |mean tumor - mean liver| in a phase's noise-free image for it to count as visible

# Tissue codes of the anatomy map; tumors use 100 + 3 * index + {0 body, 1 capsule/rim, 2 necrosis}.
AIR, FAT, MUSCLE, VFAT, LUNG, CORTEX, CANCELLOUS, DISC, CSF = 0, 1, 2, 3, 4, 5, 6, 7, 8
BLOOD_HEART, MYOCARDIUM, AORTA, IVC, PORTAL, PORTAL_INTRA, HEPATIC_VEIN, LIVER = 9, 10, 11, 12, 13, 14, 15, 16
SPLEEN, KID_CORTEX, KID_MEDULLA, KID_SINUS, STOMACH_WALL, FLUID, GAS, BOWEL_WALL = 17, 18, 19, 20, 21, 22, 23, 24
PANCREAS, GALLBLADDER, BOWEL_CONTENT, RIB = 25, 26, 27, 28
TUMOR_BASE = 100
LIVER_CODES = (LIVER, PORTAL_INTRA, HEPATIC_VEIN)

# (arterial, venous) HU means and (arterial, venous) texture amplitudes per tissue.
_HU = {
    AIR: ((-1000, -1000), (0, 0)),
    FAT: ((-105, -103), (8, 8)),
    MUSCLE: ((48, 58), (6, 6)),
    VFAT: ((-95, -93), (10, 10)),
    LUNG: ((-860, -855), (35, 35)),
    CORTEX: ((850, 850), (60, 60)),
    CANCELLOUS: ((240, 245), (40, 40)),
    DISC: ((85, 90), (6, 6)),
    CSF: ((15, 18), (3, 3)),
    BLOOD_HEART: ((260, 160), (25, 8)),
    MYOCARDIUM: ((120, 105), (8, 6)),
    AORTA: ((300, 155), (8, 5)),
    IVC: ((90, 145), (25, 8)),
    PORTAL: ((135, 185), (8, 6)),
    PORTAL_INTRA: ((135, 185), (8, 6)),
    HEPATIC_VEIN: ((58, 165), (6, 6)),
    LIVER: ((68, 112), (5, 5)),
    SPLEEN: ((125, 118), (30, 5)),
    KID_CORTEX: ((200, 175), (10, 6)),
    KID_MEDULLA: ((85, 160), (8, 6)),
    KID_SINUS: ((-50, -45), (25, 25)),
    STOMACH_WALL: ((85, 95), (6, 6)),
    FLUID: ((10, 12), (3, 3)),
    GAS: ((-990, -990), (5, 5)),
    BOWEL_WALL: ((75, 85), (6, 6)),
    PANCREAS: ((125, 98), (8, 6)),
    GALLBLADDER: ((8, 10), (2, 2)),
    BOWEL_CONTENT: ((20, 22), (10, 10)),
    RIB: ((420, 420), (40, 40)),
}


@dataclass
class PhantomCase:
    """One synthetic case. Images are Int16 HU; labels UInt8 0/1/2 in each phase's own geometry."""

    case_id: str
    images: dict[str, sitk.Image]
    labels: dict[str, sitk.Image]
    arterial_to_venous: sitk.Transform
    tumors: list[dict]
    info: dict = field(default_factory=dict)


def case_id_for_seed(seed: int) -> str:
    return f"phantom_{seed:04d}"


# ----------------------------------------------------------------------------------------- helpers


def _check_size(size: str) -> dict[str, Any]:
    if size not in SIZES:
        raise InputError(f"unknown phantom size {size!r}: choose one of {', '.join(SIZES)}")
    return SIZES[size]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"phantom seed {seed!r} must be a non-negative integer")
    return int(seed)


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles in radians."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bspline_matrix(n: int, step: float, scale: float) -> np.ndarray:
    """(n, c) cubic B-spline interpolation weights from a coarse grid of pitch ``scale`` mm."""
    u = np.arange(n) * (step / scale) + 1.0
    i = np.floor(u).astype(int)
    f = u - i
    c = int(i.max()) + 3
    w = (
        (1 - f) ** 3 / 6,
        (3 * f**3 - 6 * f**2 + 4) / 6,
        (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
        f**3 / 6,
    )
    m = np.zeros((n, c), dtype=np.float32)
    rows = np.arange(n)
    for k in range(4):
        m[rows, i - 1 + k] += w[k]
    return m


def _noise(rng: np.random.Generator, shape: Sequence[int], spacing_zyx: Sequence[float], scale: float) -> np.ndarray:
    """Smooth Gaussian random field, unit variance per voxel, correlation length ~``scale`` mm."""
    mats = [_bspline_matrix(n, s, scale) for n, s in zip(shape, spacing_zyx)]
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats)).astype(np.float32)
    mz, my, mx = mats
    cz, cy, cx = coarse.shape
    nz, ny, nx = shape
    a = (coarse.reshape(cz * cy, cx) @ mx.T).reshape(cz, cy, nx)
    a = np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(cz * nx, cy) @ my.T  # (cz*nx, ny)
    a = np.ascontiguousarray(a.reshape(cz, nx, ny).transpose(0, 2, 1)).reshape(cz, ny * nx)
    a = (mz @ a).reshape(nz, ny, nx)
    norms = [np.sqrt((m**2).sum(axis=1)) for m in mats]
    a /= norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :]
    return a


class _Grid:
    """The anatomy grid: 1-D patient-relative coordinates (mm) of voxel centres along x, y, z."""

    def __init__(self, origin_rel: Sequence[float], spacing: Sequence[float], size_xyz: Sequence[int]):
        self.spacing = tuple(float(s) for s in spacing)
        self.size = tuple(int(n) for n in size_xyz)
        self.x, self.y, self.z = (
            (o + s * np.arange(n)).astype(np.float32) for o, s, n in zip(origin_rel, spacing, size_xyz)
        )
        self.shape = (self.size[2], self.size[1], self.size[0])
        self.spacing_zyx = self.spacing[::-1]

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices (z, y, x) and broadcastable coordinates Z, Y, X of the box [lo, hi]; None if empty."""
        sl = []
        for axis, (l, h) in zip((self.x, self.y, self.z), zip(lo, hi)):
            o, s, n = float(axis[0]), float(axis[1] - axis[0]), len(axis)
            i0 = max(0, int(math.floor((l - o) / s)))
            i1 = min(n, int(math.ceil((h - o) / s)) + 1)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        sx, sy, sz = sl
        Z = self.z[sz][:, None, None]
        Y = self.y[sy][None, :, None]
        X = self.x[sx][None, None, :]
        return (sz, sy, sx), Z, Y, X


def _local(Z, Y, X, centre, rot: np.ndarray | None):
    """Coordinates of grid points in a frame centred at ``centre`` with axes the rows of ``rot``."""
    dx, dy, dz = X - np.float32(centre[0]), Y - np.float32(centre[1]), Z - np.float32(centre[2])
    if rot is None:
        return dx, dy, dz
    r = rot.astype(np.float32)
    return (
        r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz,
        r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz,
        r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz,
    )


def _paint(tissue: np.ndarray, sl, mask: np.ndarray, code: int, allowed: Iterable[int] | None) -> None:
    sub = tissue[sl]
    mask = np.broadcast_to(mask, sub.shape)
    if allowed is not None:
        allowed = tuple(allowed)
        ok = sub == allowed[0]
        for a in allowed[1:]:
            ok |= sub == a
        mask = mask & ok
    sub[mask] = code


def _ellipsoid(grid: _Grid, tissue, centre, radii, code, allowed=None, rot=None, shells=()):
    """Paint an ellipsoid; ``shells`` = ((thickness_mm, code), ...) painted from the outside in."""
    r = float(max(radii)) + 2.0
    b = grid.box([c - r for c in centre], [c + r for c in centre])
    if b is None:
        return None
    sl, Z, Y, X = b
    u, v, w = _local(Z, Y, X, centre, rot)
    d = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2)
    _paint(tissue, sl, d < 1.0, code, allowed)
    return sl, d


def _tube(grid: _Grid, tissue, a, b, r0, r1, code, allowed=None):
    """Paint a tapered capsule from point a (radius r0) to b (radius r1)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    rmax = max(r0, r1) + 1.0
    box = grid.box(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
    if box is None:
        return
    sl, Z, Y, X = box
    ab = b - a
    L2 = float(ab @ ab) or 1e-6
    px, py, pz = X - a[0], Y - a[1], Z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / L2, 0.0, 1.0)
    d2 = (px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2
    r = r0 + (r1 - r0) * t
    _paint(tissue, sl, d2 < r * r, code, allowed)


def _vessel(rng, grid, tissue, a, b, r0, r1, code, allowed=None, bends=3, jitter=0.12):
    """A gently curved vessel from a to b as a chain of tapered capsules; returns its points."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    length = float(np.linalg.norm(b - a))
    pts = [a]
    for k in range(1, bends):
        t = k / bends
        pts.append(a + t * (b - a) + rng.normal(0, jitter * length / bends, 3))
    pts.append(b)
    n = len(pts) - 1
    for k in range(n):
        ra = r0 + (r1 - r0) * k / n
        rb = r0 + (r1 - r0) * (k + 1) / n
        _tube(grid, tissue, pts[k], pts[k + 1], ra, rb, code, allowed)
    return pts


def _superellipse_q(x, y, a, b_ant, b_post, p, wobble):
    """Normalised radius of a superellipse (1 on the outline), posteriorly flattened, with wobble."""
    b = np.where(y < 0, b_ant, b_post)
    theta = np.arctan2(y, x)
    q = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
    w = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in wobble)
    return q / w


# ------------------------------------------------------------------------------------------ anatomy


def _draw_anatomy(rng: np.random.Generator, grid: _Grid, body: dict, venous_slices, tumor_kinds=None):
    """Tissue map (uint8 codes), a texture field, the tumor descriptions, whether there is a gallbladder."""
    A, Ba, Bp = body["A"], body["Ba"], body["Bp"]
    tfat, tmus = body["fat"], body["muscle"]
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    x2, y2 = grid.x[None, :], grid.y[:, None]
    zc = grid.z[:, None, None]
    wob = [(k, rng.uniform(0, 0.025), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    q0 = _superellipse_q(x2, y2, A, Ba, Bp, 2.3, wob)
    q1 = _superellipse_q(x2, y2, A - tfat, Ba - tfat, Bp - tfat * 0.7, 2.3, wob)
    Ain, Bain, Bpin = A - tfat - tmus, Ba - tfat - tmus, Bp - tfat * 0.7 - tmus
    q2 = _superellipse_q(x2, y2, Ain, Bain, Bpin, 2.2, wob)
    # The abdomen widens slightly towards the pelvis, the chest narrows a little towards the top.
    s = (1.0 + 0.05 * np.clip(-grid.z / 200.0, 0, 1) - 0.04 * np.clip(grid.z / 80.0, 0, 1)).astype(np.float32)
    s3 = s[:, None, None]
    tissue[q0[None] < s3] = FAT
    tissue[q1[None] < s3] = MUSCLE
    cavity = q2[None] < s3
    tissue[cavity] = VFAT

    # Diaphragm: two domes, the right one higher (z = 0 at its apex); the lungs reach lower at the
    # periphery and furthest in the posterior costophrenic recesses.
    zl = rng.uniform(-28, -12)
    ax_d, ay_d = 0.62 * Ain, 0.95 * max(Bain, Bpin)
    depth = rng.uniform(30, 42)
    yd = rng.uniform(-0.1, 0.15) * Bpin
    post = np.clip(y2 / Bpin, 0, 1) * rng.uniform(25, 40)
    domes = [(-0.45 * Ain, yd, 0.0), (0.45 * Ain, yd, zl)]
    zd = np.maximum.reduce(
        [zc0 - (depth + post) * np.minimum(((x2 - xc) / ax_d) ** 2 + ((y2 - yc) / ay_d) ** 2, 1.3)
         for xc, yc, zc0 in domes]
    ).astype(np.float32)
    top = np.nonzero(grid.z > float(zd.min()) - 1)[0]
    if len(top):
        ks = slice(top[0], top[-1] + 1)
        zz = grid.z[ks][:, None, None]
        sub = tissue[ks]
        cav = cavity[ks]
        sub[cav & (zz > zd[None] + 4)] = LUNG
        sub[cav & (zz > zd[None]) & (zz <= zd[None] + 4)] = MUSCLE

    # Ribs: bands in the abdominal wall, sloping down anteriorly, fewer anteriorly at lower levels.
    qr0 = _superellipse_q(x2, y2, Ain + 2, Bain + 2, Bpin + 2, 2.2, wob)
    qr1 = _superellipse_q(x2, y2, Ain + 9, Bain + 9, Bpin + 9, 2.2, wob)
    ring = (qr0 >= 1) & (qr1 < 1)
    phi = np.arctan2(np.abs(x2), y2)  # 0 posterior midline, pi anterior midline
    iy, ix = np.nonzero(ring)
    phr = phi[iy, ix]
    rib_pitch, rib_slope, rib_phase = rng.uniform(28, 34), rng.uniform(40, 55), rng.uniform(0, 40)
    rib_z = np.nonzero(grid.z > -135)[0]
    if len(rib_z) and len(iy):
        zz = grid.z[rib_z][:, None]
        band = np.cos(2 * np.pi * (zz + rib_slope * phr[None] + rib_phase) / rib_pitch) > 0.62
        phmax = np.clip(2.75 + 0.011 * zz, 1.2, 2.75)
        band &= (phr[None] > 0.3) & (phr[None] < phmax)
        band &= (zz * s[rib_z][:, None] > -200)
        inside = q0[iy, ix][None] < s[rib_z][:, None]
        band &= inside
        kk, jj = np.nonzero(band)
        tissue[rib_z[kk], iy[jj], ix[jj]] = RIB

    # Spine and back muscles.
    spine_y = Bp - tfat * 0.7 - rng.uniform(60, 70)
    vb_rx, vb_ry = rng.uniform(20, 24), rng.uniform(16, 19)
    for sign in (-1, 1):
        pm = ((x2 - sign * 36) / 27) ** 2 + ((y2 - (spine_y + 44)) / 20) ** 2 < 1
        tissue[:, pm & (q1 < 1.0)] = MUSCLE
    vb = ((x2 / vb_rx) ** 2 + ((y2 - spine_y) / vb_ry) ** 2) < 1
    vb_in = ((x2 / (vb_rx - 2.5)) ** 2 + ((y2 - spine_y) / (vb_ry - 2.5)) ** 2) < 1
    canal_y = spine_y + vb_ry + 9
    canal = (x2**2 + (y2 - canal_y) ** 2) < 8.5**2
    arch = ((x2**2 + (y2 - canal_y) ** 2) < 13.5**2) | ((np.abs(x2) < 4) & (y2 > canal_y) & (y2 < canal_y + 32))
    disc_pitch, disc_phase = rng.uniform(30, 36), rng.uniform(0, 36)
    is_disc = ((grid.z + disc_phase) % disc_pitch) < 7.5
    for k in range(grid.shape[0]):
        sl = tissue[k]
        sl[arch] = CORTEX
        sl[canal] = CSF
        if is_disc[k]:
            sl[vb] = DISC
        else:
            sl[vb] = CORTEX
            sl[vb_in] = CANCELLOUS

    # Aorta and inferior vena cava (the IVC runs through the liver's bare area higher up).
    ao_r = rng.uniform(10.5, 13.5)
    ao = (rng.uniform(8, 16), spine_y - vb_ry - ao_r - 1.5)
    z_lo, z_hi = float(grid.z[0]) - 5, float(grid.z[-1]) + 5
    _tube(grid, tissue, (ao[0], ao[1], z_lo), (ao[0] + rng.uniform(-3, 3), ao[1] + 2, z_hi), ao_r, ao_r, AORTA,
          (VFAT, LUNG, MUSCLE, FAT))
    ivc_r = rng.uniform(9, 12)
    ivc_low = np.array([-rng.uniform(22, 30), spine_y - vb_ry - ivc_r + 2, z_lo])
    ivc_mid = np.array([ivc_low[0] - 4, ivc_low[1] - 8, -60.0])
    ivc_top = np.array([ivc_low[0] + 6, ivc_low[1] - 22, 8.0])
    for a, b in ((ivc_low, ivc_mid), (ivc_mid, ivc_top)):
        _tube(grid, tissue, a, b, ivc_r, ivc_r, IVC, (VFAT, MUSCLE, LUNG))

    # Diaphragmatic crura around the aorta (they keep the liver off the aorta and spine).
    _tube(grid, tissue, (ao[0], ao[1] + 2, -120.0), (ao[0], ao[1] + 2, 5.0), ao_r + 6, ao_r + 6, MUSCLE, (VFAT,))

    # Heart above the central diaphragm.
    hc = (0.12 * Ain + rng.uniform(-8, 8), -0.3 * Bain + rng.uniform(-5, 5), rng.uniform(45, 60))
    hr = (0.45 * Ain, 0.42 * Bain, 55.0)
    hrot = _rot(0, 0, rng.uniform(-0.5, -0.2))
    _ellipsoid(grid, tissue, hc, hr, MYOCARDIUM, (LUNG,), hrot)
    _ellipsoid(grid, tissue, hc, tuple(r - 9 for r in hr), BLOOD_HEART, (MYOCARDIUM,), hrot)

    # Kidneys (cortex, medulla, sinus), psoas.
    kid_pts = []
    for sign, zk in ((1, -rng.uniform(100, 120)), (-1, -rng.uniform(115, 138))):
        kc = (sign * (vb_rx + rng.uniform(42, 50)), spine_y + rng.uniform(0, 10), zk)
        kr = (rng.uniform(24, 28), rng.uniform(17, 20), rng.uniform(48, 56))
        krot = _rot(rng.uniform(-0.25, -0.1), -sign * rng.uniform(0.1, 0.25), sign * rng.uniform(0.3, 0.6))
        _ellipsoid(grid, tissue, kc, kr, KID_CORTEX, (VFAT,), krot)
        _ellipsoid(grid, tissue, kc, tuple(r - 7 for r in kr), KID_MEDULLA, (KID_CORTEX,), krot)
        sc = (kc[0] - sign * 9, kc[1] - 4, kc[2])
        _ellipsoid(grid, tissue, sc, (10, 7, kr[2] * 0.5), KID_SINUS, (KID_MEDULLA, KID_CORTEX, VFAT), krot)
        kid_pts.append(kc)
    for sign in (-1, 1):
        _tube(grid, tissue, (sign * (vb_rx + 8), spine_y - 2, -110), (sign * (vb_rx + 22), spine_y - 8, -260), 6,
              26, MUSCLE, (VFAT,))

    # Spleen (crescent), stomach (air-fluid level), gallbladder: all have priority over the liver.
    spc = (0.62 * Ain + rng.uniform(-6, 6), 0.3 * Bpin + rng.uniform(-8, 8), -rng.uniform(40, 55))
    spr = (rng.uniform(22, 28), rng.uniform(48, 60), rng.uniform(45, 58))
    sprot = _rot(0.2, 0, rng.uniform(0.5, 0.8))
    _ellipsoid(grid, tissue, spc, spr, SPLEEN, (VFAT,), sprot)
    hil = (spc[0] - 0.9 * spr[0], spc[1] - 0.2 * spr[1], spc[2])
    _ellipsoid(grid, tissue, hil, (spr[0] * 0.8, spr[1] * 0.5, spr[2] * 0.7), VFAT, (SPLEEN,), sprot)

    stc = (0.3 * Ain + rng.uniform(-8, 8), -0.35 * Bain + rng.uniform(-6, 6), -rng.uniform(35, 55))
    strd = (rng.uniform(35, 48), rng.uniform(28, 36), rng.uniform(40, 55))
    strot = _rot(0, 0.3, rng.uniform(-0.6, -0.2))
    res = _ellipsoid(grid, tissue, stc, strd, STOMACH_WALL, (VFAT,), strot)
    if res is not None:
        sl, d = res
        inner = (d < 1 - 4.5 / min(strd)) & (tissue[sl] == STOMACH_WALL)
        yy = grid.y[sl[1]][None, :, None]
        level = stc[1] - strd[1] * rng.uniform(0.1, 0.5)
        _paint(tissue, sl, inner & (yy < level), GAS, None)
        _paint(tissue, sl, inner & (yy >= level), FLUID, None)

    has_gb = rng.random() < 0.85
    gbc = (-0.22 * Ain + rng.uniform(-8, 8), -0.4 * Bain + rng.uniform(-5, 8), -rng.uniform(85, 105))
    if has_gb:
        _ellipsoid(grid, tissue, gbc, (rng.uniform(11, 16), rng.uniform(11, 16), rng.uniform(28, 40)), GALLBLADDER,
                   (VFAT,), _rot(rng.uniform(0.3, 0.6), 0, 0.3))

    # Portal confluence, splenic vein, superior mesenteric vein, main portal trunk to the hilum.
    conf = np.array([rng.uniform(-2, 8), ao[1] - ao_r - rng.uniform(14, 20), -rng.uniform(95, 110)])
    hilum = np.array([-0.3 * Ain + rng.uniform(-6, 6), ivc_mid[1] - rng.uniform(22, 30), -rng.uniform(62, 72)])
    spl_hilum = np.array([spc[0] - spr[0] * 0.7, spc[1] - 0.1 * spr[1], spc[2] - 15])
    _vessel(rng, grid, tissue, conf, spl_hilum, 4.5, 4.0, PORTAL, (VFAT,), jitter=0.06)
    _vessel(rng, grid, tissue, conf + (0, -3, 0), conf + (rng.uniform(-5, 5), -15, -120), 5.5, 5.0, PORTAL, (VFAT,))
    pv_r = rng.uniform(6.5, 8.0)
    _vessel(rng, grid, tissue, conf, hilum, pv_r, pv_r * 0.9, PORTAL, (VFAT,), bends=2, jitter=0.05)

    # Liver: two soft-united ellipsoids (right and left lobes), randomly warped, filling visceral fat.
    lr_c = np.array([-0.42 * Ain, 0.02 * Bpin, -55.0]) + rng.uniform(-6, 6, 3)
    lr_r = np.array([0.68 * Ain, 0.95 * max(Bain, Bpin), 105.0]) * rng.uniform(0.9, 1.12, 3)
    ll_c = np.array([0.1 * Ain, -0.5 * Bain, -35.0]) + rng.uniform(-6, 6, 3)
    ll_r = np.array([0.55 * Ain, 0.4 * Bain, 52.0]) * rng.uniform(0.88, 1.15, 3)
    lrot = _rot(rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.05), rng.uniform(-0.15, 0.15))
    llrot = _rot(0, rng.uniform(-0.1, 0.2), rng.uniform(-0.3, 0.0))
    lo = np.minimum(lr_c - lr_r, ll_c - ll_r) - 15
    hi = np.maximum(lr_c + lr_r, ll_c + ll_r) + 15
    box = grid.box(lo, hi)
    if box is None:
        raise AssertionError("liver outside the anatomy grid")
    sl, Z, Y, X = box
    shp = tuple(s.stop - s.start for s in sl)
    warp = 14.0
    wx, wy, wz = (_noise(rng, shp, grid.spacing_zyx, 70.0) * warp for _ in range(3))
    Xw, Yw, Zw = X + wx, Y + wy, Z + wz * 0.7
    u, v, w = _local(Zw, Yw, Xw, lr_c, lrot)
    f1 = np.sqrt((u / lr_r[0]) ** 2 + (v / lr_r[1]) ** 2 + (w / lr_r[2]) ** 2)
    # The right lobe tapers inferiorly and medially: shrink its lower medial part.
    f1 = f1 + 0.35 * np.clip(-(w / lr_r[2]), 0, None) * np.clip((u / lr_r[0]) + 0.2, 0, None)
    u, v, w = _local(Zw, Yw, Xw, ll_c, llrot)
    f2 = np.sqrt((u / ll_r[0]) ** 2 + (v / ll_r[1]) ** 2 + (w / ll_r[2]) ** 2)
    k = 6.0
    f = -np.log(np.exp(-k * f1) + np.exp(-k * f2)) / k
    f += 0.05 * _noise(rng, shp, grid.spacing_zyx, 25.0)
    # No liver posterior and medial to the inferior vena cava (that is retroperitoneum).
    liver_mask = (f < 1.12) & ~((Xw > ivc_mid[0] - 2) & (Yw > ivc_mid[1] + 4))
    _paint(tissue, sl, liver_mask, LIVER, (VFAT,))
    del wx, wy, wz, Xw, Yw, Zw, u, v, w, f1, f2, f

    liver_sl = sl
    lsub = tissue[sl]
    lz, ly, lx = np.nonzero(lsub == LIVER)
    if len(lz) < 100:
        raise AssertionError("degenerate liver")
    liver_pts = np.stack([grid.x[sl[2]][lx], grid.y[sl[1]][ly], grid.z[sl[0]][lz]], axis=1)

    def liver_point(near=None, spread=None):
        if near is None:
            return liver_pts[rng.integers(len(liver_pts))].astype(float)
        for _ in range(30):
            p = liver_pts[rng.integers(len(liver_pts))].astype(float)
            if np.linalg.norm(p - near) < spread:
                return p
        return p

    # Intrahepatic portal branches and hepatic veins (painted into liver only).
    rpv_end = np.array([-0.62 * Ain, 0.05 * Bpin, -65.0]) + rng.uniform(-8, 8, 3)
    lpv_end = np.array([0.05 * Ain, -0.5 * Bain, -45.0]) + rng.uniform(-8, 8, 3)
    allowed_l = (LIVER, VFAT)
    _vessel(rng, grid, tissue, hilum, rpv_end, pv_r * 0.8, 4.0, PORTAL_INTRA, (LIVER,))
    _vessel(rng, grid, tissue, hilum, lpv_end, pv_r * 0.65, 3.2, PORTAL_INTRA, (LIVER,))
    _tube(grid, tissue, hilum, hilum, pv_r, pv_r, PORTAL, allowed_l)
    for root in [rpv_end] * 3 + [lpv_end] * 2 + [hilum] * 2:
        tgt = liver_point(root, 80.0)
        _vessel(rng, grid, tissue, root, tgt, 3.2, 1.8, PORTAL_INTRA, (LIVER,), bends=2)
    hv_root = ivc_top + np.array([0, 4, -22.0])
    hv_targets = [
        np.array([-0.85 * Ain, 0.1 * Bpin, -70.0]),
        np.array([-0.3 * Ain, -0.65 * Bain, -85.0]),
        np.array([0.22 * Ain, -0.6 * Bain, -40.0]),
    ]
    for tgt in hv_targets:
        tgt = tgt + rng.uniform(-10, 10, 3)
        pts = _vessel(rng, grid, tissue, hv_root, tgt, rng.uniform(5.0, 6.5), 2.2, HEPATIC_VEIN, (LIVER,))
        mid = pts[len(pts) // 2]
        _vessel(rng, grid, tissue, mid, liver_point(mid, 60.0), 3.0, 1.8, HEPATIC_VEIN, (LIVER,), bends=2)

    # Pancreas along the splenic vein, bowel loops below: both fill the remaining visceral fat.
    pan_a = conf + np.array([-18, -6, -8])
    pan_b = spl_hilum + np.array([-8, -6, 8])
    _vessel(rng, grid, tissue, pan_a, pan_b, rng.uniform(10, 13), rng.uniform(7, 10), PANCREAS, (VFAT,), jitter=0.08)
    for _ in range(int(rng.integers(7, 12))):
        a = np.array([rng.uniform(-0.75, 0.75) * Ain, rng.uniform(-0.85, 0.0) * Bain, rng.uniform(-260, -70)])
        b = a + rng.normal(0, 35, 3)
        r = rng.uniform(9, 16)
        _vessel(rng, grid, tissue, a, b, r, r, BOWEL_WALL, (VFAT,), bends=2)
        _vessel(rng, grid, tissue, a, b, r - 3, r - 3, GAS if rng.random() < 0.3 else BOWEL_CONTENT, (BOWEL_WALL,),
                bends=1)

    # Texture field for tissue heterogeneity (tumors get their own below).
    tex = _noise(rng, grid.shape, grid.spacing_zyx, 9.0)

    n = int(rng.choice(len(_N_TUMORS_P), p=_N_TUMORS_P))
    kinds = [str(k) for k in rng.choice(TUMOR_KINDS, size=n, p=_KIND_WEIGHTS)]
    if tumor_kinds is not None:
        kinds = list(tumor_kinds)
    tumors = _place_tumors(rng, grid, tissue, tex, liver_sl, venous_slices, kinds)
    return tissue, tex, tumors, has_gb


def _place_tumors(rng, grid: _Grid, tissue, tex, liver_sl, venous_slices, kinds) -> list[dict]:
    # Depth of each liver voxel below the liver surface, within the venous field of view.
    lsub = tissue[liver_sl]
    lmask = np.isin(lsub, LIVER_CODES).astype(np.uint8)
    img = sitk.GetImageFromArray(lmask)
    img.SetSpacing(grid.spacing)
    depth = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    )
    zs = grid.z[liver_sl[0]]
    vz0, vz1 = grid.z[venous_slices.start], grid.z[venous_slices.stop - 1]
    tumors: list[dict] = []
    for index, kind in enumerate(kinds):
        rmin, rmax = _KIND_RADIUS[kind]
        radius = float(rng.uniform(rmin, rmax))
        centre = None
        for _attempt in range(5):
            zin = (zs > vz0 + 0.5 * radius) & (zs < vz1 - 0.5 * radius)
            ok = (depth > max(0.55 * radius + 2.0, 4.0)) & zin[:, None, None]
            cz, cy, cx = np.nonzero(ok)
            if len(cz):
                for _try in range(12):
                    j = int(rng.integers(len(cz)))
                    c = np.array([grid.x[liver_sl[2]][cx[j]], grid.y[liver_sl[1]][cy[j]], zs[cz[j]]], float)
                    if all(np.linalg.norm(c - t["_c"]) > radius + t["radius_mm"] + 3 for t in tumors):
                        centre = c
                        break
            if centre is not None:
                break
            radius *= 0.8
            if radius < rmin * 0.7:
                break
        if centre is None:
            continue
        tumors.append(_tumor(rng, grid, tissue, tex, len(tumors), kind, centre, radius))
        tumors[-1]["_c"] = centre
    return tumors


def _tumor(rng, grid: _Grid, tissue, tex, index: int, kind: str, centre, radius: float) -> dict:
    code = TUMOR_BASE + 3 * index
    axes = radius * rng.uniform(0.82, 1.18, 3)
    axes *= radius / float(np.prod(axes) ** (1 / 3))
    rot = _rot(*rng.uniform(-np.pi, np.pi, 3))
    r = float(axes.max()) * 1.25 + 3
    box = grid.box(centre - r, centre + r)
    sl, Z, Y, X = box
    shp = tuple(s.stop - s.start for s in sl)
    u, v, w = _local(Z, Y, X, centre, rot)
    d = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2)
    lob = {"cyst": 0.03}.get(kind, rng.uniform(0.06, 0.16))
    d = d * (1.0 + lob * _noise(rng, shp, grid.spacing_zyx, max(radius * 0.6, 5.0)))
    inner = _noise(rng, shp, grid.spacing_zyx, max(radius * 0.35, 3.5))
    sub = tissue[sl]
    allowed = np.isin(sub, LIVER_CODES)
    body = (d < 1.0) & allowed
    rim_mm = {"hypervascular": rng.uniform(1.5, 3.0), "hypovascular": rng.uniform(2.0, 4.0),
              "necrotic": rng.uniform(3.0, 6.0), "heterogeneous": rng.uniform(2.0, 4.0)}.get(kind, 0.0)
    capsule = kind == "hypervascular" and rng.random() < 0.8
    rim = body & (d > 1.0 - rim_mm / radius) if rim_mm else np.zeros_like(body)
    necrotic = kind == "necrotic" or (kind in ("hypervascular", "hypovascular") and radius > 16 and rng.random() < 0.35)
    if kind == "heterogeneous":
        nec = body & (inner > 0.9)
        necrotic = bool(nec.any())
    elif necrotic:
        frac = rng.uniform(0.45, 0.7) if kind == "necrotic" else rng.uniform(0.3, 0.5)
        nec = body & (d < frac * (1.0 + 0.25 * inner))
    else:
        nec = np.zeros_like(body)
    sub[body] = code
    if kind in ("hypervascular", "hypovascular", "necrotic", "heterogeneous") and (capsule or kind != "hypervascular"):
        sub[rim & ~nec] = code + 1
    sub[nec] = code + 2
    tsub = tex[sl]
    tsub[body] = inner[body]
    return {
        "kind": kind,
        "centre_rel": [float(c) for c in centre],
        "radius_mm": round(float(radius), 2),
        "capsule": bool(capsule),
        "necrotic": bool(necrotic),
        "code": code,
    }


def _tumor_hu(rng, kind: str, liver: tuple[float, float]) -> dict[int, tuple[tuple[float, float], tuple[float, float]]]:
    """(arterial, venous) HU and texture amplitude of a tumor's body, rim/capsule and necrosis."""
    la, lv = liver
    U = rng.uniform
    nec = ((U(8, 30),) * 2, (8.0, 8.0))
    if kind == "hypervascular":
        body = ((la + U(45, 90), lv - U(20, 40)), (U(8, 15), U(5, 10)))
        rim = ((la + U(0, 15), lv + U(18, 40)), (4.0, 4.0))
    elif kind == "hypovascular":
        body = ((la - U(15, 30), lv - U(40, 65)), (U(5, 10), U(5, 10)))
        rim = ((la + U(10, 35), lv - U(10, 25)), (5.0, 5.0))
    elif kind == "arterial_only":
        body = ((la + U(40, 80), lv + U(-4, 4)), (6.0, 3.0))
        rim = body
    elif kind == "venous_only":
        body = ((la + U(-4, 4), lv - U(30, 55)), (3.0, 5.0))
        rim = body
    elif kind == "cyst":
        hu = U(0, 15)
        body = ((hu, hu + U(0, 3)), (2.0, 2.0))
        rim = body
    elif kind == "necrotic":
        body = ((la + U(20, 50), lv - U(5, 20)), (U(8, 14), U(6, 10)))
        rim = ((la + U(35, 70), lv + U(-5, 10)), (6.0, 6.0))
    else:  # heterogeneous
        body = ((la + U(15, 50), lv - U(15, 35)), (U(20, 32), U(15, 25)))
        rim = ((la + U(20, 45), lv - U(0, 15)), (8.0, 8.0))
    return {0: body, 1: rim, 2: nec}


# -------------------------------------------------------------------------------------- transforms


def _breathing(rng, venous_ref: sitk.Image, domain: tuple, liver_c_world) -> sitk.Transform:
    """Venous -> arterial transform: rigid (shift + rotation about the liver) after a B-spline warp."""
    tz = rng.uniform(5, 15) * rng.choice([-1.0, 1.0])
    t = (rng.uniform(-3, 3), rng.uniform(-3, 3), tz)
    ang = np.deg2rad(rng.uniform(1, 3))
    ax = rng.normal(0, 1, 3) * np.array([1.0, 0.35, 0.35])
    ax /= np.linalg.norm(ax)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter([float(c) for c in liver_c_world])
    rigid.SetRotation(*(float(a) for a in ax * ang))
    rigid.SetTranslation([float(v) for v in t])

    origin, size_mm = domain
    mesh = [max(4, int(round(s / 45.0))) for s in size_mm]
    ref = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    ref.SetOrigin([float(o) for o in origin])
    ref.SetSpacing([float(s) for s in size_mm])
    bs = sitk.BSplineTransformInitializer(ref, mesh, order=3)
    # Control-point grid (x, y, z order of ITK's fixed parameters); the outer three layers stay zero
    # so the warp vanishes at the domain border, and it is strongest around the liver.
    n = [m + 3 for m in mesh]
    fp = bs.GetFixedParameters()
    gorigin = np.array(fp[3:6])
    gspacing = np.array(fp[6:9])
    coords = [gorigin[i] + gspacing[i] * np.arange(n[i]) for i in range(3)]
    gz, gy, gx = np.meshgrid(coords[2], coords[1], coords[0], indexing="ij")
    dist2 = (gx - liver_c_world[0]) ** 2 + (gy - liver_c_world[1]) ** 2 + (gz - liver_c_world[2]) ** 2
    weight = np.exp(-dist2 / (2 * 90.0**2))
    keep = np.zeros((n[2], n[1], n[0]), bool)
    keep[3:-3, 3:-3, 3:-3] = True
    params = []
    for amp in (1.5, 1.5, 2.5):  # x, y, z amplitude in mm
        c = rng.normal(0, amp, (n[2], n[1], n[0])) * weight * keep
        params.append(np.clip(c, -2.5 * amp, 2.5 * amp).ravel())
    bs.SetParameters(np.concatenate(params).tolist())
    breathing = {"translation_mm": [round(float(v), 3) for v in t], "rotation_deg": round(float(np.rad2deg(ang)), 3),
                 "rotation_axis": [round(float(v), 4) for v in ax]}
    return sitk.CompositeTransform([rigid, bs]), rigid, bs, breathing


def _trilinear(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Sample ``field`` (nz, ny, nx, C) at continuous indices ``pts`` (N, 3) in (x, y, z) order, clamped."""
    nz, ny, nx = field.shape[:3]
    hi = np.array([nx - 1, ny - 1, nz - 1], float)
    p = np.clip(pts, 0, hi)
    i0 = np.minimum(np.floor(p).astype(np.intp), np.maximum(hi.astype(np.intp) - 1, 0))
    f = p - i0
    out = 0.0
    for dz in (0, 1):
        wz = f[:, 2] if dz else 1 - f[:, 2]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            for dx in (0, 1):
                wx = f[:, 0] if dx else 1 - f[:, 0]
                out = out + (wx * wy * wz)[:, None] * field[i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx]
    return out


def _inverse(rigid: sitk.Euler3DTransform, bs: sitk.BSplineTransform, domain, step: float) -> sitk.Transform:
    """Arterial -> venous point mapping: inverse B-spline (fixed-point iteration) after the inverse rigid."""
    origin, size_mm = domain
    size = [int(math.ceil(s / step)) + 1 for s in size_mm]
    field_img = sitk.TransformToDisplacementField(
        bs, sitk.sitkVectorFloat64, size, [float(o) for o in origin], [step] * 3, [1, 0, 0, 0, 1, 0, 0, 0, 1]
    )
    d = sitk.GetArrayFromImage(field_img)  # (nz, ny, nx, 3), components x, y, z in mm
    gz, gy, gx = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    grid_idx = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    u = -d.reshape(-1, 3)
    # v = x + u(x) inverts x' = v + d(v) when u(x) = -d(x + u(x)); the warp is a contraction.
    for _ in range(50):
        u_new = -_trilinear(d, grid_idx + u / step)
        change = float(np.abs(u_new - u).max())
        u = u_new
        if change < 1e-4:
            break
    inv_img = sitk.GetImageFromArray(u.reshape(d.shape), isVector=True)
    inv_img.CopyInformation(field_img)
    # One displacement field for the whole arterial -> venous mapping (trilinear interpolation
    # reproduces the rigid part exactly), sampled over the same domain: resampling with it is much
    # cheaper than with the composite.
    composite = sitk.CompositeTransform([sitk.DisplacementFieldTransform(inv_img), rigid.GetInverse()])
    whole = sitk.TransformToDisplacementField(
        composite, sitk.sitkVectorFloat64, size, [float(o) for o in origin], [step] * 3, [1, 0, 0, 0, 1, 0, 0, 0, 1]
    )
    return sitk.DisplacementFieldTransform(whole)


# ---------------------------------------------------------------------------------------- scanning


def _scan(hu: sitk.Image, rng: np.random.Generator, noise_sd: float) -> sitk.Image:
    """Scanner blur (in-plane PSF, slice profile) and spatially correlated noise -> Int16 HU."""
    sx, sy, sz = hu.GetSpacing()
    var = [(0.5 * sx) ** 2, (0.5 * sy) ** 2, (0.42 * sz) ** 2]
    img = sitk.DiscreteGaussian(hu, variance=var, maximumKernelWidth=32, maximumError=0.01, useImageSpacing=True)
    arr = sitk.GetArrayFromImage(img)
    white = rng.standard_normal(arr.shape, dtype=np.float32)
    nimg = sitk.GetImageFromArray(white)
    nimg.SetSpacing(hu.GetSpacing())
    nimg = sitk.DiscreteGaussian(nimg, variance=[(0.6 * sx) ** 2, (0.6 * sy) ** 2, (0.3 * sz) ** 2],
                                 maximumKernelWidth=16, maximumError=0.01, useImageSpacing=True)
    noise = sitk.GetArrayFromImage(nimg)
    noise *= np.float32(noise_sd / max(float(noise.std()), 1e-6))
    arr += noise
    out = sitk.GetImageFromArray(np.clip(np.rint(arr), -1024, 3071).astype(np.int16))
    out.CopyInformation(hu)
    return out


def _image(arr: np.ndarray, origin, spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin([float(o) for o in origin])
    img.SetSpacing([float(s) for s in spacing])
    return img


# ------------------------------------------------------------------------------------------ a case


def make_case(seed: int, size: str = "demo", *, tumor_kinds: Sequence[str] | None = None) -> PhantomCase:
    """Generate one dual-phase case, a deterministic function of ``(seed, size)``.

    ``tumor_kinds`` (optional) replaces the random number and kinds of tumors, e.g. ``["cyst"]`` or
    ``[]``; kinds are those of ``TUMOR_KINDS``. A tumor that finds no room in the liver is left out.
    """
    spec = _check_size(size)
    seed = _check_seed(seed)
    if tumor_kinds is not None:
        bad = [k for k in tumor_kinds if k not in TUMOR_KINDS]
        if bad:
            raise InputError(f"unknown tumor kind(s) {bad}: choose from {', '.join(TUMOR_KINDS)}")
    rng = np.random.default_rng(seed)
    nx, ny, nz = spec["shape"]
    sxy = float(round(rng.uniform(*spec["inplane"]), 4))
    sz = float(rng.choice(spec["slices"]))
    spacing = (sxy, sxy, sz)
    fov_x, fov_y, lz = nx * sxy, ny * sxy, nz * sz

    # Body size fitted to the field of view; patient-relative frame: x=0 midline, y=0 body centre,
    # z=0 apex of the right hemidiaphragm.
    A = fov_x * rng.uniform(0.39, 0.45)
    Ba = min(A * rng.uniform(0.66, 0.8), fov_y * 0.42)
    Bp = Ba * rng.uniform(0.85, 0.95)
    scale = A / 150.0
    body = {"A": A, "Ba": Ba, "Bp": Bp, "fat": rng.uniform(8, 30) * scale, "muscle": rng.uniform(7, 11)}
    z_top = rng.uniform(28, 55)
    body_y = rng.uniform(-6, 10)  # body centre relative to the field-of-view centre (table below)
    c0 = np.array([rng.uniform(-5, 5), rng.uniform(-20, 20), rng.uniform(-450, -250)])  # world of patient origin
    venous_origin_rel = np.array([-(nx - 1) / 2 * sxy + rng.uniform(-3, 3), -(ny - 1) / 2 * sxy - body_y,
                                  z_top - (nz - 1) * sz])
    pad_xy, pad_z = 4, int(math.ceil(45.0 / sz))
    anat_origin_rel = venous_origin_rel - np.array([pad_xy * sxy, pad_xy * sxy, pad_z * sz])
    grid = _Grid(anat_origin_rel, spacing, (nx + 2 * pad_xy, ny + 2 * pad_xy, nz + 2 * pad_z))
    vsl = (slice(pad_z, pad_z + nz), slice(pad_xy, pad_xy + ny), slice(pad_xy, pad_xy + nx))

    tissue, tex, tumors, has_gb = _draw_anatomy(rng, grid, body, vsl[0], tumor_kinds)

    # Per-case enhancement (contrast timing and dose vary between patients).
    lut = np.zeros((2, 256), np.float32)
    amp = np.zeros((2, 256), np.float32)
    jitter = {LIVER: (rng.uniform(-8, 8), rng.uniform(-12, 12)), AORTA: (rng.uniform(-50, 50), rng.uniform(-15, 15)),
              PORTAL: (rng.uniform(-20, 20), rng.uniform(-15, 15)), SPLEEN: (rng.uniform(-15, 15), rng.uniform(-8, 8))}
    jitter[PORTAL_INTRA] = jitter[PORTAL]
    jitter[BLOOD_HEART] = (jitter[AORTA][0] * 0.7, jitter[AORTA][1])
    for code, ((ha, hv), (ta, tv)) in _HU.items():
        ja, jv = jitter.get(code, (0.0, 0.0))
        lut[0, code], lut[1, code] = ha + ja, hv + jv
        amp[0, code], amp[1, code] = ta, tv
    liver_hu = (float(lut[0, LIVER]), float(lut[1, LIVER]))
    for t in tumors:
        for part, ((ha, hv), (ta, tv)) in _tumor_hu(rng, t["kind"], liver_hu).items():
            lut[0, t["code"] + part], lut[1, t["code"] + part] = ha, hv
            amp[0, t["code"] + part], amp[1, t["code"] + part] = ta, tv

    hu = [lut[p][tissue] + amp[p][tissue] * tex for p in (0, 1)]
    del tex
    liver_m = tissue == LIVER
    liver_mean = [float(h[liver_m].mean()) for h in hu]
    del liver_m

    label = np.zeros(grid.shape, np.uint8)
    label[np.isin(tissue, LIVER_CODES)] = 1
    label[tissue >= TUMOR_BASE] = 2

    # World geometry.
    anat_origin = anat_origin_rel + c0
    venous_origin = venous_origin_rel + c0
    venous_label = _image(label[vsl].copy(), venous_origin, spacing)
    vlab_arr = label[vsl]
    vtis = tissue[vsl]
    for t in tumors:
        codes = (t["code"], t["code"] + 1, t["code"] + 2)
        # Contrast of the lesion's interior (body and necrosis; a thin capsule or rim is left out).
        tm = (tissue == codes[0]) | (tissue == codes[2])
        if not tm.any():
            tm = (tissue >= codes[0]) & (tissue <= codes[2])
        contrast = {ph: round(float(hu[p][tm].mean()) - liver_mean[p], 1) for p, ph in enumerate(PHASES)}
        t["contrast_hu"] = contrast
        t["visible_phases"] = [ph for ph in PHASES if abs(contrast[ph]) >= VISIBLE_HU]
        t["volume_ml"] = round(float(((vtis >= codes[0]) & (vtis <= codes[2])).sum()) * sxy * sxy * sz / 1000.0, 2)
        t["centre_mm"] = [round(float(c), 2) for c in np.asarray(t.pop("centre_rel")) + c0]
        del t["_c"], t["code"]
    del vtis, vlab_arr

    # Breathing misalignment and the arterial grid.
    anat_size_mm = np.array(grid.size) * np.array(spacing)
    domain = (anat_origin - np.array(spacing) * 0.5 - 20.0, anat_size_mm + 40.0)
    lz_i, ly_i, lx_i = np.nonzero(label[vsl] > 0)
    liver_c = np.array([lx_i.mean() * sxy, ly_i.mean() * sxy, lz_i.mean() * sz]) + venous_origin
    a2v, rigid, bs, breathing = _breathing(rng, venous_label, domain, liver_c)
    v_from_a = _inverse(rigid, bs, domain, step=6.0)
    art_origin = venous_origin + np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-10, 10)])
    art_nz = nz + int(rng.integers(-3, 4))
    art_ref = sitk.Image([nx, ny, art_nz], sitk.sitkFloat32)
    art_ref.SetOrigin([float(o) for o in art_origin])
    art_ref.SetSpacing(spacing)

    anat_art = _image(hu[0], anat_origin, spacing)
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

    venous_hu = _image(np.ascontiguousarray(hu[1][vsl]), venous_origin, spacing)
    del hu
    voxel_ml = sxy * sxy * sz / 1000.0
    noise_v = rng.uniform(*spec["noise"])
    noise_a = noise_v * rng.uniform(1.0, 1.2)
    images = {
        "arterial": _scan(arterial_hu, np.random.default_rng([seed, 1]), noise_a),
        "venous": _scan(venous_hu, np.random.default_rng([seed, 2]), noise_v),
    }
    info = {
        "seed": seed,
        "size": size,
        "spacing_xyz": list(spacing),
        "noise_sd_hu": {"arterial": round(noise_a, 2), "venous": round(noise_v, 2)},
        "liver_hu": {ph: round(liver_mean[p], 1) for p, ph in enumerate(PHASES)},
        "liver_volume_ml": round(float((label[vsl] > 0).sum()) * voxel_ml, 1),
        "liver_centre_mm": [round(float(c), 2) for c in liver_c],
        "gallbladder": bool(has_gb),
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


# ------------------------------------------------------------------------------------------ output


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


def _sheet_views(case: PhantomCase) -> dict:
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
    views["title"] = f"{case.case_id}: {kinds}"
    return views


def write_contact_sheet(views: list[dict], path) -> Path:
    """PNG of the given cases' views (from ``_sheet_views``): CT window W400 L50, label contours."""
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
    fig.tight_layout()
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
        if contact_sheet and len(views) < 4:
            views.append(_sheet_views(case))
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
        "generator": "maml.phantom",
        "seed": seed,
        "size": size,
        "note": "case i uses seed + i: maml.phantom.make_case(seed, size) regenerates it; centres are LPS mm "
                "in the venous geometry; arterial_to_venous maps venous points to arterial points (elastix).",
        "cases": records,
    })
    if contact_sheet and views:
        write_contact_sheet(views, out / "contact_sheet.png")
    return out
