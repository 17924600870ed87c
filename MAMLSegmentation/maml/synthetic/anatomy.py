"""The phantom's anatomy: a tissue-code map of the abdomen from the lung bases to the kidneys.

Body outline, subcutaneous and visceral fat, abdominal wall and paraspinal muscles, vertebrae and
ribs, lung bases, heart, aorta, inferior vena cava, portal, splenic and hepatic veins, liver (right
and left lobes, caudate lobe, sometimes a Riedel lobe, smooth to lobulated contour), gallbladder,
spleen, kidneys (cortex, medulla, sinus), stomach with an air-fluid level, pancreas and bowel loops.
Shapes and sizes are drawn per case; lesions are added by ``lesions``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .contrast import (AORTA, BLOOD_HEART, BOWEL_CONTENT, BOWEL_WALL, CANCELLOUS, CORTEX, CSF, DISC, FAT, FLUID,
                       GALLBLADDER, GAS, HEPATIC_ARTERY, HEPATIC_VEIN, IVC, KID_CORTEX, KID_MEDULLA, KID_SINUS,
                       LIVER, LUNG, MUSCLE, MYOCARDIUM, PANCREAS, PORTAL, PORTAL_INTRA, RIB, SPLEEN, STOMACH_WALL,
                       VFAT)
from .shapes import Grid, ellipsoid, local_coords, smooth_noise, paint, rotation, superellipse_q, tube, vessel


def draw_anatomy(rng: np.random.Generator, grid: Grid, body: dict):
    """Tissue map (uint8 codes), texture field, the liver's box (slices), whether there is a gallbladder.

    ``body`` gives the outline (half-width A, anterior and posterior half-depths Ba, Bp), the fat and
    muscle thickness, and the liver's shape: ``liver_scale`` (size), ``left_lobe`` (relative size),
    ``lobulation`` (surface bumps), ``riedel`` (an inferior tongue of the right lobe).
    """
    A, Ba, Bp = body["A"], body["Ba"], body["Bp"]
    tfat, tmus = body["fat"], body["muscle"]
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    x2, y2 = grid.x[None, :], grid.y[:, None]
    wob = [(k, rng.uniform(0, 0.025), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    q0 = superellipse_q(x2, y2, A, Ba, Bp, 2.3, wob)
    q1 = superellipse_q(x2, y2, A - tfat, Ba - tfat, Bp - tfat * 0.7, 2.3, wob)
    Ain, Bain, Bpin = A - tfat - tmus, Ba - tfat - tmus, Bp - tfat * 0.7 - tmus
    q2 = superellipse_q(x2, y2, Ain, Bain, Bpin, 2.2, wob)
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
    qr0 = superellipse_q(x2, y2, Ain + 2, Bain + 2, Bpin + 2, 2.2, wob)
    qr1 = superellipse_q(x2, y2, Ain + 9, Bain + 9, Bpin + 9, 2.2, wob)
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
    tube(grid, tissue, (ao[0], ao[1], z_lo), (ao[0] + rng.uniform(-3, 3), ao[1] + 2, z_hi), ao_r, ao_r, AORTA,
          (VFAT, LUNG, MUSCLE, FAT))
    ivc_r = rng.uniform(9, 12)
    ivc_low = np.array([-rng.uniform(22, 30), spine_y - vb_ry - ivc_r + 2, z_lo])
    ivc_mid = np.array([ivc_low[0] - 4, ivc_low[1] - 8, -60.0])
    ivc_top = np.array([ivc_low[0] + 6, ivc_low[1] - 22, 8.0])
    for a, b in ((ivc_low, ivc_mid), (ivc_mid, ivc_top)):
        tube(grid, tissue, a, b, ivc_r, ivc_r, IVC, (VFAT, MUSCLE, LUNG))

    # Diaphragmatic crura around the aorta (they keep the liver off the aorta and spine).
    tube(grid, tissue, (ao[0], ao[1] + 2, -120.0), (ao[0], ao[1] + 2, 5.0), ao_r + 6, ao_r + 6, MUSCLE, (VFAT,))

    # Heart above the central diaphragm.
    hc = (0.12 * Ain + rng.uniform(-8, 8), -0.3 * Bain + rng.uniform(-5, 5), rng.uniform(45, 60))
    hr = (0.45 * Ain, 0.42 * Bain, 55.0)
    hrot = rotation(0, 0, rng.uniform(-0.5, -0.2))
    ellipsoid(grid, tissue, hc, hr, MYOCARDIUM, (LUNG,), hrot)
    ellipsoid(grid, tissue, hc, tuple(r - 9 for r in hr), BLOOD_HEART, (MYOCARDIUM,), hrot)

    # Kidneys (cortex, medulla, sinus), psoas.
    kid_pts = []
    for sign, zk in ((1, -rng.uniform(100, 120)), (-1, -rng.uniform(115, 138))):
        kc = (sign * (vb_rx + rng.uniform(42, 50)), spine_y + rng.uniform(0, 10), zk)
        kr = (rng.uniform(24, 28), rng.uniform(17, 20), rng.uniform(48, 56))
        krot = rotation(rng.uniform(-0.25, -0.1), -sign * rng.uniform(0.1, 0.25), sign * rng.uniform(0.3, 0.6))
        ellipsoid(grid, tissue, kc, kr, KID_CORTEX, (VFAT,), krot)
        ellipsoid(grid, tissue, kc, tuple(r - 7 for r in kr), KID_MEDULLA, (KID_CORTEX,), krot)
        sc = (kc[0] - sign * 9, kc[1] - 4, kc[2])
        ellipsoid(grid, tissue, sc, (10, 7, kr[2] * 0.5), KID_SINUS, (KID_MEDULLA, KID_CORTEX, VFAT), krot)
        kid_pts.append(kc)
    for sign in (-1, 1):
        tube(grid, tissue, (sign * (vb_rx + 8), spine_y - 2, -110), (sign * (vb_rx + 22), spine_y - 8, -260), 6,
              26, MUSCLE, (VFAT,))

    # Spleen (crescent), stomach (air-fluid level), gallbladder: all have priority over the liver.
    spc = (0.62 * Ain + rng.uniform(-6, 6), 0.3 * Bpin + rng.uniform(-8, 8), -rng.uniform(40, 55))
    spr = (rng.uniform(22, 28), rng.uniform(48, 60), rng.uniform(45, 58))
    sprot = rotation(0.2, 0, rng.uniform(0.5, 0.8))
    ellipsoid(grid, tissue, spc, spr, SPLEEN, (VFAT,), sprot)
    hil = (spc[0] - 0.9 * spr[0], spc[1] - 0.2 * spr[1], spc[2])
    ellipsoid(grid, tissue, hil, (spr[0] * 0.8, spr[1] * 0.5, spr[2] * 0.7), VFAT, (SPLEEN,), sprot)

    stc = (0.3 * Ain + rng.uniform(-8, 8), -0.35 * Bain + rng.uniform(-6, 6), -rng.uniform(35, 55))
    strd = (rng.uniform(35, 48), rng.uniform(28, 36), rng.uniform(40, 55))
    strot = rotation(0, 0.3, rng.uniform(-0.6, -0.2))
    res = ellipsoid(grid, tissue, stc, strd, STOMACH_WALL, (VFAT,), strot)
    if res is not None:
        sl, d = res
        inner = (d < 1 - 4.5 / min(strd)) & (tissue[sl] == STOMACH_WALL)
        yy = grid.y[sl[1]][None, :, None]
        level = stc[1] - strd[1] * rng.uniform(0.1, 0.5)
        paint(tissue, sl, inner & (yy < level), GAS, None)
        paint(tissue, sl, inner & (yy >= level), FLUID, None)

    has_gb = rng.random() < 0.85
    gbc = (-0.22 * Ain + rng.uniform(-8, 8), -0.4 * Bain + rng.uniform(-5, 8), -rng.uniform(85, 105))
    if has_gb:
        ellipsoid(grid, tissue, gbc, (rng.uniform(11, 16), rng.uniform(11, 16), rng.uniform(28, 40)), GALLBLADDER,
                   (VFAT,), rotation(rng.uniform(0.3, 0.6), 0, 0.3))

    # Portal confluence, splenic vein, superior mesenteric vein, main portal trunk to the hilum.
    conf = np.array([rng.uniform(-2, 8), ao[1] - ao_r - rng.uniform(14, 20), -rng.uniform(95, 110)])
    hilum = np.array([-0.3 * Ain + rng.uniform(-6, 6), ivc_mid[1] - rng.uniform(22, 30), -rng.uniform(62, 72)])
    spl_hilum = np.array([spc[0] - spr[0] * 0.7, spc[1] - 0.1 * spr[1], spc[2] - 15])
    vessel(rng, grid, tissue, conf, spl_hilum, 4.5, 4.0, PORTAL, (VFAT,), jitter=0.06)
    vessel(rng, grid, tissue, conf + (0, -3, 0), conf + (rng.uniform(-5, 5), -15, -120), 5.5, 5.0, PORTAL, (VFAT,))
    pv_r = rng.uniform(6.5, 8.0)
    vessel(rng, grid, tissue, conf, hilum, pv_r, pv_r * 0.9, PORTAL, (VFAT,), bends=2, jitter=0.05)

    # Liver: two soft-united ellipsoids (right and left lobes), randomly warped, filling visceral fat.
    lr_c = np.array([-0.42 * Ain, 0.02 * Bpin, -55.0]) + rng.uniform(-6, 6, 3)
    ls = body["liver_scale"]
    lr_r = np.array([0.68 * Ain, 0.95 * max(Bain, Bpin), 105.0 * ls]) * rng.uniform(0.9, 1.12, 3)
    lr_r[:2] *= min(ls, 1.05)
    ll_c = np.array([0.1 * Ain, -0.5 * Bain, -35.0]) + rng.uniform(-6, 6, 3)
    ll_r = np.array([0.55 * Ain, 0.4 * Bain, 52.0]) * rng.uniform(0.88, 1.15, 3) * body["left_lobe"] * ls
    lrot = rotation(rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.05), rng.uniform(-0.15, 0.15))
    llrot = rotation(0, rng.uniform(-0.1, 0.2), rng.uniform(-0.3, 0.0))
    # Caudate lobe beside the inferior vena cava; Riedel lobe: a tongue of the right lobe reaching low.
    cd_c = np.array([ivc_mid[0] - 6, ivc_mid[1] - 18, -60.0]) + rng.uniform(-5, 5, 3)
    cd_r = np.array([18.0, 14.0, 30.0]) * rng.uniform(0.8, 1.25, 3)
    rd_c = lr_c + np.array([-0.25 * lr_r[0], 0.1 * lr_r[1], -0.85 * lr_r[2]])
    rd_r = np.array([0.3 * lr_r[0], 0.35 * lr_r[1], 0.6 * lr_r[2]]) * (1.0 if body["riedel"] else 0.0)
    lo = np.minimum(lr_c - lr_r, ll_c - ll_r) - 15
    hi = np.maximum(lr_c + lr_r, ll_c + ll_r) + 15
    if body["riedel"]:
        lo = np.minimum(lo, rd_c - rd_r - 15)
    box = grid.box(lo, hi)
    if box is None:
        raise AssertionError("liver outside the anatomy grid")
    sl, Z, Y, X = box
    shp = tuple(s.stop - s.start for s in sl)
    warp = rng.uniform(8.0, 20.0)
    wx, wy, wz = (smooth_noise(rng, shp, grid.spacing_zyx, 70.0) * warp for _ in range(3))
    Xw, Yw, Zw = X + wx, Y + wy, Z + wz * 0.7
    u, v, w = local_coords(Zw, Yw, Xw, lr_c, lrot)
    f1 = np.sqrt((u / lr_r[0]) ** 2 + (v / lr_r[1]) ** 2 + (w / lr_r[2]) ** 2)
    # The right lobe tapers inferiorly and medially: shrink its lower medial part.
    f1 = f1 + 0.35 * np.clip(-(w / lr_r[2]), 0, None) * np.clip((u / lr_r[0]) + 0.2, 0, None)
    u, v, w = local_coords(Zw, Yw, Xw, ll_c, llrot)
    f2 = np.sqrt((u / ll_r[0]) ** 2 + (v / ll_r[1]) ** 2 + (w / ll_r[2]) ** 2)
    u, v, w = local_coords(Zw, Yw, Xw, cd_c, None)
    parts = [f1, f2, np.sqrt((u / cd_r[0]) ** 2 + (v / cd_r[1]) ** 2 + (w / cd_r[2]) ** 2)]
    if body["riedel"]:
        u, v, w = local_coords(Zw, Yw, Xw, rd_c, None)
        parts.append(np.sqrt((u / rd_r[0]) ** 2 + (v / rd_r[1]) ** 2 + (w / rd_r[2]) ** 2))
    k = 6.0
    f = -np.log(sum(np.exp(-k * p) for p in parts)) / k
    del parts
    # Smooth to lobulated (cirrhotic-like nodular) contour: surface bumps of varying grain.
    f += 0.05 * smooth_noise(rng, shp, grid.spacing_zyx, 25.0)
    f += body["lobulation"] * smooth_noise(rng, shp, grid.spacing_zyx, float(rng.uniform(6.0, 14.0)))
    # No liver posterior and medial to the inferior vena cava (that is retroperitoneum).
    liver_mask = (f < 1.12) & ~((Xw > ivc_mid[0] - 2) & (Yw > ivc_mid[1] + 4))
    paint(tissue, sl, liver_mask, LIVER, (VFAT,))
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
    vessel(rng, grid, tissue, hilum, rpv_end, pv_r * 0.8, 4.0, PORTAL_INTRA, (LIVER,))
    vessel(rng, grid, tissue, hilum, lpv_end, pv_r * 0.65, 3.2, PORTAL_INTRA, (LIVER,))
    tube(grid, tissue, hilum, hilum, pv_r, pv_r, PORTAL, allowed_l)
    # Hepatic artery beside the portal vein (bright arterially: a small enhancing dot).
    vessel(rng, grid, tissue, hilum + (4, -4, 0), rpv_end + (3, -3, 2), 2.0, 1.2, HEPATIC_ARTERY, (LIVER, VFAT))
    n_branches = int(rng.integers(6, 14))
    for root in [(rpv_end, lpv_end, hilum)[i % 3] for i in range(n_branches)]:
        tgt = liver_point(root, 80.0)
        vessel(rng, grid, tissue, root, tgt, rng.uniform(2.2, 4.0), 1.5, PORTAL_INTRA, (LIVER,), bends=2)
    hv_root = ivc_top + np.array([0, 4, -22.0])
    hv_targets = [
        np.array([-0.85 * Ain, 0.1 * Bpin, -70.0]),
        np.array([-0.3 * Ain, -0.65 * Bain, -85.0]),
        np.array([0.22 * Ain, -0.6 * Bain, -40.0]),
    ]
    for tgt in hv_targets:
        tgt = tgt + rng.uniform(-10, 10, 3)
        pts = vessel(rng, grid, tissue, hv_root, tgt, rng.uniform(5.0, 6.5), 2.2, HEPATIC_VEIN, (LIVER,))
        mid = pts[len(pts) // 2]
        for _ in range(int(rng.integers(1, 4))):
            vessel(rng, grid, tissue, mid, liver_point(mid, 60.0), rng.uniform(2.0, 3.5), 1.5, HEPATIC_VEIN,
                    (LIVER,), bends=2)

    # Pancreas along the splenic vein, bowel loops below: both fill the remaining visceral fat.
    pan_a = conf + np.array([-18, -6, -8])
    pan_b = spl_hilum + np.array([-8, -6, 8])
    vessel(rng, grid, tissue, pan_a, pan_b, rng.uniform(10, 13), rng.uniform(7, 10), PANCREAS, (VFAT,), jitter=0.08)
    # Small bowel loops fill the lower abdomen; colon (hepatic and splenic flexures) and duodenum lie
    # against the liver: soft-tissue structures next to it that a segmenter must leave out.
    loops = [(np.array([rng.uniform(-0.8, 0.8) * Ain, rng.uniform(-0.9, 0.1) * Bain, rng.uniform(-260, -60)]),
              rng.uniform(9, 16)) for _ in range(int(rng.integers(12, 24)))]
    for side in (-1, 1):
        loops.append((np.array([side * rng.uniform(0.4, 0.7) * Ain, rng.uniform(-0.4, 0.2) * Bain,
                                -rng.uniform(90, 150)]), rng.uniform(16, 26)))
    loops.append((hilum + np.array([rng.uniform(5, 20), -rng.uniform(10, 25), -rng.uniform(20, 40)]), rng.uniform(9, 13)))
    for a, r in loops:
        b = a + rng.normal(0, 35, 3)
        vessel(rng, grid, tissue, a, b, r, r, BOWEL_WALL, (VFAT,), bends=2)
        vessel(rng, grid, tissue, a, b, r - 3, r - 3, GAS if rng.random() < 0.3 else BOWEL_CONTENT, (BOWEL_WALL,),
                bends=1)

    # Texture field for tissue heterogeneity (lesions get their own).
    tex = smooth_noise(rng, grid.shape, grid.spacing_zyx, float(rng.uniform(6.0, 14.0)))
    return tissue, tex, liver_sl, has_gb


def add_ascites(grid: Grid, tissue, liver_sl, thickness_mm: float) -> None:
    """Perihepatic fluid: a water shell (0-20 HU, like bile or cysts) up to ``thickness_mm`` around
    the liver where there is visceral fat, as in ascites: liver-adjacent, not liver."""
    from .contrast import LIVER_CODES

    sub = tissue[liver_sl]
    img = sitk.GetImageFromArray(np.isin(sub, LIVER_CODES).astype(np.uint8))
    img.SetSpacing(grid.spacing)
    outside = -sitk.GetArrayViewFromImage(
        sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))
    sub[(outside > 0) & (outside < thickness_mm) & (sub == VFAT)] = FLUID
