"""Liver lesions (labelled tumor) and their look-alikes (mimics, labelled liver) painted into the anatomy map.

Sizes: random tumors have log-normal diameters, median 15 mm, truncated to 3-80 mm per kind (most
liver lesions found on CT are small: over 80 % of the LiTS lesions are under 20 mm, Bilic et al.,
Med Image Anal 2023;84:102680), 0-8 per case with 15 % tumor-free cases. Mimics are what a liver
tumor segmenter wrongly calls tumor: simple cysts, hemangiomas, focal fat or sparing, perfusion
differences and vessels cut across (their HU in ``contrast.mimic_hu``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .contrast import LIVER, LIVER_CODES, MAX_MIMICS, MAX_TUMORS, MIMIC_BASE, TUMOR_BASE
from .shapes import Grid, local_coords, smooth_noise, rotation, tube

# Diameter range (mm) per tumor kind for random cases.
_KIND_DIAMETER = {
    "hypervascular": (5.0, 80.0),
    "hypovascular": (3.0, 70.0),
    "arterial_only": (3.0, 30.0),
    "venous_only": (3.0, 40.0),
    "cyst": (6.0, 44.0),
    "necrotic": (20.0, 80.0),
    "heterogeneous": (20.0, 80.0),
}
# Typical radius (mm) per kind when the caller names the kinds (tests want every kind measurable).
_KIND_RADIUS = {
    "hypervascular": (9.0, 28.0),
    "hypovascular": (8.0, 26.0),
    "arterial_only": (6.0, 14.0),
    "venous_only": (6.0, 16.0),
    "cyst": (6.0, 22.0),
    "necrotic": (16.0, 36.0),
    "heterogeneous": (14.0, 32.0),
}
N_TUMORS_P = (0.15, 0.22, 0.17, 0.13, 0.1, 0.08, 0.06, 0.05, 0.04)  # P(0 tumors) ... P(8 tumors)
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 80.0


def tumor_plan(rng, kinds_all, weights, tumor_kinds=None, min_diameter: float = MIN_DIAMETER_MM) -> list[tuple[str, float]]:
    """(kind, radius mm) of each tumor to place: random, or the caller's kinds at their typical sizes.

    Random tumors are at least ``min_diameter`` across: a lesion smaller than a voxel or two would
    be labelled where nothing shows (no reader would outline it), teaching a model to guess.
    """
    if tumor_kinds is not None:
        return [(k, float(rng.uniform(*_KIND_RADIUS[k]))) for k in tumor_kinds]
    n = int(rng.choice(len(N_TUMORS_P), p=N_TUMORS_P))
    # Multiple lesions are mostly of one kind (metastases of one primary, multifocal HCC).
    main = str(rng.choice(kinds_all, p=weights))
    plan = []
    for _ in range(n):
        kind = main if rng.random() < 0.7 else str(rng.choice(kinds_all, p=weights))
        lo, hi = _KIND_DIAMETER[kind]
        d = _truncated_lognormal(rng, 15.0, 0.75, max(lo, min(min_diameter, hi / 2)), hi)
        plan.append((kind, d / 2))
    return plan


def mimic_plan(rng, steatosis: bool) -> list[tuple[str, float]]:
    """(kind, radius mm) of each liver-labelled look-alike: on average about four per case."""
    plan = []

    def some(kind, p, nmax, median_d, lo, hi, sigma=0.5):
        if rng.random() < p:
            for _ in range(int(rng.integers(1, nmax + 1))):
                plan.append((kind, _truncated_lognormal(rng, median_d, sigma, lo, hi) / 2))

    some("cyst", 0.45, 5, 10.0, 3.0, 50.0, 0.6)
    some("hemangioma", 0.3, 2, 16.0, 5.0, 60.0)
    some("focal_fat", 0.15, 2, 25.0, 10.0, 50.0)
    some("perfusion", 0.25, 2, 30.0, 15.0, 50.0, 0.3)
    if steatosis:
        some("fat_sparing", 0.6, 3, 25.0, 10.0, 50.0)
    some("vessel", 0.6, 6, 8.0, 4.0, 14.0, 0.3)
    rng.shuffle(plan)
    return plan[:MAX_MIMICS]


def _truncated_lognormal(rng, median: float, sigma: float, lo: float, hi: float) -> float:
    for _ in range(20):
        d = median * float(np.exp(rng.normal(0, sigma)))
        if lo <= d <= hi:
            return d
    return float(rng.uniform(lo, hi))


class LiverPlacer:
    """Finds centres for lesions deep enough inside the liver, within the venous slices, apart from each other."""

    def __init__(self, rng, grid: Grid, tissue, liver_sl, venous_slices):
        self.rng, self.grid, self.liver_sl = rng, grid, liver_sl
        lmask = np.isin(tissue[liver_sl], LIVER_CODES).astype(np.uint8)
        img = sitk.GetImageFromArray(lmask)
        img.SetSpacing(grid.spacing)
        self.depth = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        )
        self.zs = grid.z[liver_sl[0]]
        self.ys, self.xs = grid.y[liver_sl[1]], grid.x[liver_sl[2]]
        vz, vy, vx = venous_slices  # the venous image's box: lesions lie within it
        self.vbox = [(axis[v.start], axis[v.stop - 1]) for axis, v in ((grid.z, vz), (grid.y, vy), (grid.x, vx))]
        self.taken: list[tuple[np.ndarray, float]] = []

    def centre(self, radius: float, depth_range=None, shrink=True, depth_factor=0.55):
        """A centre for a lesion of ``radius`` (smaller if it must shrink to fit); (centre, radius) or None.

        The centre lies ``depth_factor * radius`` (+ 2 mm) below the liver surface, or at a depth
        within ``depth_range`` (mm); a lesion reaching the surface is cut flat by it (subcapsular).
        """
        rmin = radius * 0.6
        for _attempt in range(5):
            (z0, z1), (y0, y1), (x0, x1) = self.vbox
            m = 0.5 * radius + 1.0
            # The arterial image is shifted by up to 10 mm and breathing by up to 15 mm along z:
            # keep lesions inside both phases' slices.
            mz = m + min(25.0, 0.2 * (z1 - z0))
            zin = (self.zs > z0 + mz) & (self.zs < z1 - mz)
            yin = (self.ys > y0 + m) & (self.ys < y1 - m)
            xin = (self.xs > x0 + m) & (self.xs < x1 - m)
            if depth_range is None:
                ok = self.depth > max(depth_factor * radius + 2.0, 3.0)
            else:
                ok = (self.depth > depth_range[0]) & (self.depth < depth_range[1])
            ok &= zin[:, None, None] & yin[None, :, None] & xin[None, None, :]
            cz, cy, cx = np.nonzero(ok)
            if len(cz):
                for _try in range(12):
                    j = int(self.rng.integers(len(cz)))
                    sl = self.liver_sl
                    c = np.array([self.grid.x[sl[2]][cx[j]], self.grid.y[sl[1]][cy[j]], self.zs[cz[j]]], float)
                    # Apart by their radii plus elongation and lobulation (a quarter) and 3 mm.
                    if all(np.linalg.norm(c - p) > 1.25 * (radius + r) + 3 for p, r in self.taken):
                        self.taken.append((c, radius))
                        return c, radius
            if not shrink:
                return None
            radius *= 0.8
            if radius < rmin:
                return None
        return None


def _blob(rng, grid: Grid, centre, radius, lobulation, elongation=0.18):
    """Box slices, normalised radial distance d (1 on the outline) and an interior texture field."""
    axes = radius * rng.uniform(1 - elongation, 1 + elongation, 3)
    axes *= radius / float(np.prod(axes) ** (1 / 3))
    rot = rotation(*rng.uniform(-np.pi, np.pi, 3))
    r = float(axes.max()) * (1.25 + lobulation) + 3
    sl, Z, Y, X = grid.box(centre - r, centre + r)
    shp = tuple(s.stop - s.start for s in sl)
    u, v, w = local_coords(Z, Y, X, centre, rot)
    d = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2)
    if lobulation:
        d = d * (1.0 + lobulation * smooth_noise(rng, shp, grid.spacing_zyx, max(radius * 0.6, 4.0)))
    inner = smooth_noise(rng, shp, grid.spacing_zyx, max(radius * 0.35, 2.5))
    return sl, d, inner


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected part of ``mask``: a lobulated outline must not shed islands (extra lesions)."""
    if not mask.any():
        return mask
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return sitk.GetArrayViewFromImage(parts) == 1


def paint_tumor(rng, grid: Grid, tissue, tex, index: int, kind: str, centre, radius: float) -> dict:
    """A tumor of ``kind`` into liver voxels: body, rim or capsule, necrosis (codes TUMOR_BASE + 3 * index + part)."""
    assert index < MAX_TUMORS
    code = TUMOR_BASE + 3 * index
    lob = {"cyst": 0.03}.get(kind, rng.uniform(0.04, 0.2))
    sl, d, inner = _blob(rng, grid, centre, radius, lob)
    sub = tissue[sl]
    body = _largest_component((d < 1.0) & np.isin(sub, LIVER_CODES))
    # Rim and capsule are at least one voxel thick, else they vanish at coarse resolution.
    vox = min(grid.spacing)
    rim_mm = {"hypervascular": rng.uniform(1.0, 3.0), "hypovascular": rng.uniform(1.5, 5.0),
              "necrotic": rng.uniform(2.5, 6.0), "heterogeneous": rng.uniform(2.0, 4.0)}.get(kind, 0.0)
    capsule = kind == "hypervascular" and radius > 5 and rng.random() < 0.75
    rim = body & (d > 1.0 - max(rim_mm, vox) / radius) if rim_mm else np.zeros_like(body)
    necrotic = kind == "necrotic" or (kind in ("hypervascular", "hypovascular") and radius > 14 and rng.random() < 0.35)
    if kind == "heterogeneous":
        nec = body & (inner > rng.uniform(0.6, 1.1))
        necrotic = bool(nec.any())
    elif necrotic:
        frac = rng.uniform(0.45, 0.75) if kind == "necrotic" else rng.uniform(0.3, 0.5)
        nec = body & (d < frac * (1.0 + 0.25 * inner))
    else:
        nec = np.zeros_like(body)
    sub[body] = code
    has_rim = kind in ("hypovascular", "necrotic", "heterogeneous") and radius > 4 and rng.random() < 0.8
    if capsule or has_rim:
        sub[rim & ~nec] = code + 1
    sub[nec] = code + 2
    tex[sl][body] = inner[body]
    return {
        "kind": kind,
        "centre_rel": [float(c) for c in centre],
        "radius_mm": round(float(radius), 2),
        "capsule": bool(capsule),
        "rim": bool(has_rim),
        "necrotic": bool(necrotic),
        "code": code,
    }


def paint_mimic(rng, grid: Grid, tissue, tex, index: int, kind: str, centre, radius: float) -> dict:
    """A look-alike into liver parenchyma (codes MIMIC_BASE + 3 * index + part; the label stays liver)."""
    code = MIMIC_BASE + 3 * index
    if kind == "vessel":
        # A vein segment running mostly cranio-caudally: a round spot on axial slices.
        direction = rng.normal(0, 1, 3) * np.array([0.5, 0.5, 1.0])
        direction /= np.linalg.norm(direction)
        half = rng.uniform(8, 25) * direction
        r = radius * rng.uniform(0.3, 0.6)
        tube(grid, tissue, centre - half, centre + half, r, r * rng.uniform(0.7, 1.0), code, (LIVER,))
        return {"kind": kind, "centre_rel": [float(c) for c in centre], "radius_mm": round(float(r), 2), "code": code}
    lob = {"cyst": 0.02, "hemangioma": rng.uniform(0.04, 0.12)}.get(kind, rng.uniform(0.2, 0.35))
    elong = {"perfusion": 0.45, "focal_fat": 0.45, "fat_sparing": 0.35}.get(kind, 0.15)
    sl, d, inner = _blob(rng, grid, centre, radius, lob, elong)
    sub = tissue[sl]
    body = (d < 1.0) & (sub == LIVER)
    sub[body] = code
    if kind == "hemangioma":
        if radius > 9 or rng.random() < 0.3:
            # Peripheral nodules (part 1) around an unenhanced core (part 0), a filled-in shell (part 2).
            shell = body & (d > rng.uniform(0.55, 0.85))
            sub[shell] = code + 2
            nodules = body & (d > 0.6) & (inner > rng.uniform(0.5, 1.0))
            sub[nodules] = code + 1
        else:
            sub[body] = code + 1  # small flash-filling hemangioma: blood pool throughout
    tex[sl][body] = inner[body]
    return {"kind": kind, "centre_rel": [float(c) for c in centre], "radius_mm": round(float(radius), 2), "code": code}


def place_lesions(rng, grid: Grid, tissue, tex, liver_sl, venous_slices, plan, mimics,
                  subcapsular: float = 0.25) -> tuple[list, list]:
    """Paint the mimics, then the tumors (a fraction ``subcapsular`` of them at the liver surface);
    lesions that find no room are left out."""
    placer = LiverPlacer(rng, grid, tissue, liver_sl, venous_slices)
    placed_mimics = []
    for kind, radius in mimics:
        depth = {"perfusion": (0.5, 6.0), "vessel": (6.0, 60.0)}.get(kind)
        found = placer.centre(radius, depth, shrink=False) if depth else placer.centre(radius)
        if found is not None:
            placed_mimics.append(paint_mimic(rng, grid, tissue, tex, len(placed_mimics), kind, *found))
    tumors = []
    for kind, radius in plan:
        # A quarter of the tumors lie just under the capsule (they bulge into or flatten at the surface).
        found = placer.centre(radius, depth_factor=0.2 if rng.random() < subcapsular else 0.55)
        if found is not None:
            tumors.append(paint_tumor(rng, grid, tissue, tex, len(tumors), kind, *found))
    return tumors, placed_mimics
