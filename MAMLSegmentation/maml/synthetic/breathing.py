"""Breathing between the phases: the true arterial -> venous transform and its numerical inverse."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk


def breathing_transform(rng, venous_ref: sitk.Image, domain: tuple, liver_c_world) -> tuple:
    """(venous -> arterial transform, its rigid part, its B-spline part, a summary): rigid (shift +
    rotation about the liver) after a B-spline warp."""
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


def invert_breathing(rigid: sitk.Euler3DTransform, bs: sitk.BSplineTransform, domain, step: float) -> sitk.Transform:
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
        if change < 1e-3:  # mm
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

