"""A crude two-phase abdominal CT (arterial + venous) with a liver, two tumors and fake MA attention
maps, for the overview picture's tests and for looking at the picture by eye.

Coordinates are LPS millimetres: x towards the patient's left, y posterior, z superior. The liver
lies on the patient's right (x < 0), the spleen on the left, the spine posterior.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

HU = {
    # name: (arterial, venous)
    "fat": (-100, -100),
    "muscle": (50, 55),
    "bowel": (20, 30),
    "liver": (65, 115),
    "portal": (110, 190),
    "tumor": (135, 80),  # HCC: arterial hyperenhancement, venous washout
    "capsule": (90, 150),  # enhancing pseudo-capsule in the venous phase
    "aorta": (330, 160),
    "ivc": (80, 150),
    "spleen": (125, 120),
    "kidney": (190, 170),
    "bone": (650, 650),
}

TUMORS = [((-80.0, 5.0, 6.0), 19.0), ((-45.0, -38.0, -12.0), 7.0)]


def make_abdomen(size=(192, 160, 24), spacing=(1.8, 1.8, 5.0), direction=None, seed=0):
    """Return (phases {"arterial", "venous"}, labels (0/1 liver/2 tumor), attention {...})."""
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    ref = sitk.Image(list(size), sitk.sitkInt16)
    ref.SetSpacing(spacing)
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    ref.SetDirection(tuple(direction.ravel()))
    centre_index = (np.asarray(size) - 1) / 2
    ref.SetOrigin(tuple(-(direction * np.asarray(spacing)) @ centre_index))  # volume centred on 0
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    m = (direction * np.asarray(spacing)).astype(np.float32)
    o = np.asarray(ref.GetOrigin(), np.float32)
    x = o[0] + m[0, 0] * i + m[0, 1] * j + m[0, 2] * k
    y = o[1] + m[1, 0] * i + m[1, 1] * j + m[1, 2] * k
    z = o[2] + m[2, 0] * i + m[2, 1] * j + m[2, 2] * k

    def ellipsoid(c, r):
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    def tube(c, r):  # along z
        return ((x - c[0]) / r) ** 2 + ((y - c[1]) / r) ** 2 <= 1

    body_r = ((x / 165) ** 2 + ((y - 5) / 115) ** 2)
    body = body_r <= 1
    inner = (x / 150) ** 2 + ((y - 5) / 100) ** 2 <= 1
    muscle_wall = inner & ~((x / 140) ** 2 + ((y - 5) / 90) ** 2 <= 1)
    liver = (ellipsoid((-75, -5, 0), (68, 80, 75)) & inner & ~ellipsoid((-5, 25, 0), (35, 45, 200))
             & ~ellipsoid((-10, -60, -10), (40, 30, 60)))
    portal = liver & (tube((-60, 5, 0), 6) | (((x + 95) ** 2 + (y - 20) ** 2 <= 16) & (z > -30)))
    spleen = ellipsoid((95, 35, 15), (30, 45, 50)) & inner
    kidney = ellipsoid((75, 60, -35), (25, 30, 45)) & inner
    spine = tube((0, 75), 18)
    aorta = tube((18, 45), 11)
    ivc = tube((-25, 42), 11)
    tumor = np.zeros(x.shape, bool)
    capsule = np.zeros(x.shape, bool)
    rings = np.zeros(x.shape, np.float32)
    for c, r in TUMORS:
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        tumor |= d <= r
        capsule |= (d <= r) & (d > r - 2.5)
        rings = np.maximum(rings, np.exp(-(((d - r) / 4.0) ** 2)))

    rng = np.random.default_rng(seed)
    phases = {}
    for p, phase in enumerate(("arterial", "venous")):
        a = np.full(x.shape, -1000.0, np.float32)
        a[body] = HU["fat"][p]
        a[inner] = HU["bowel"][p] + 25 * np.sin(x[inner] / 9) * np.cos(y[inner] / 7)
        a[muscle_wall] = HU["muscle"][p]
        for name, mask in (("spleen", spleen), ("kidney", kidney), ("liver", liver),
                           ("portal", portal), ("aorta", aorta), ("ivc", ivc)):
            a[mask] = HU[name][p]
        a[spine] = HU["bone"][p]
        a[tumor] = HU["tumor"][p] + (25 if p == 0 else 10) * np.sin(x[tumor] / 3) * np.sin(y[tumor] / 4)
        a[capsule] = HU["capsule"][p]
        a += rng.normal(0, 12, a.shape).astype(np.float32)
        img = sitk.GetImageFromArray(np.round(a).astype(np.int16))
        img.CopyInformation(ref)
        phases[phase] = img

    lab = np.zeros(x.shape, np.uint8)
    lab[liver] = 1
    lab[tumor] = 2
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(ref)

    # Fake attention, as in the paper's Figure 2: the arterial map on the tumor body, the venous map
    # on its rim (the pseudo-capsule); low elsewhere, a little higher in the liver.
    smooth = 0.08 + 0.12 * liver + 0.05 * np.sin(x / 20) * np.cos(y / 25)
    inside = np.zeros(x.shape, np.float32)
    for c, r in TUMORS:
        d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        inside = np.maximum(inside, np.exp(-((d / r) ** 2) * 1.5))
    attention = {}
    for phase, field in (("arterial", smooth + 0.85 * inside), ("venous", smooth + 0.8 * rings)):
        img = sitk.GetImageFromArray(np.clip(field, 0, 1).astype(np.float32))
        img.CopyInformation(ref)
        attention[phase] = img
    return phases, labels, attention
