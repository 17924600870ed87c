"""Geometry primitives of the phantom: the anatomy grid, smooth random fields and painted shapes."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
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


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing_zyx: Sequence[float], scale: float) -> np.ndarray:
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


class Grid:
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


def local_coords(Z, Y, X, centre, rot: np.ndarray | None):
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


def paint(tissue: np.ndarray, sl, mask: np.ndarray, code: int, allowed: Iterable[int] | None) -> None:
    sub = tissue[sl]
    mask = np.broadcast_to(mask, sub.shape)
    if allowed is not None:
        allowed = tuple(allowed)
        ok = sub == allowed[0]
        for a in allowed[1:]:
            ok |= sub == a
        mask = mask & ok
    sub[mask] = code


def ellipsoid(grid: Grid, tissue, centre, radii, code, allowed=None, rot=None, shells=()):
    """Paint an ellipsoid; ``shells`` = ((thickness_mm, code), ...) painted from the outside in."""
    r = float(max(radii)) + 2.0
    b = grid.box([c - r for c in centre], [c + r for c in centre])
    if b is None:
        return None
    sl, Z, Y, X = b
    u, v, w = local_coords(Z, Y, X, centre, rot)
    d = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2)
    paint(tissue, sl, d < 1.0, code, allowed)
    return sl, d


def tube(grid: Grid, tissue, a, b, r0, r1, code, allowed=None):
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
    paint(tissue, sl, d2 < r * r, code, allowed)


def vessel(rng, grid, tissue, a, b, r0, r1, code, allowed=None, bends=3, jitter=0.12):
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
        tube(grid, tissue, pts[k], pts[k + 1], ra, rb, code, allowed)
    return pts


def superellipse_q(x, y, a, b_ant, b_post, p, wobble):
    """Normalised radius of a superellipse (1 on the outline), posteriorly flattened, with wobble."""
    b = np.where(y < 0, b_ant, b_post)
    theta = np.arctan2(y, x)
    q = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
    w = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in wobble)
    return q / w

