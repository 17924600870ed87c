"""Tissue codes of the phantom's anatomy map and the Hounsfield units each case draws for them.

Every case draws its own contrast timing and dose, then derives each tissue's (arterial, venous) HU
from them, so that the phases stay consistent (a late arterial phase has an enhancing portal vein and
a brighter liver; an early portal-venous phase still has unopacified hepatic veins). Ranges follow
published abdominal CT values:

- Liver: unenhanced 55-65 HU, below 40 HU in steatosis (Kodama et al., AJR 2007;188:1307-1312;
  Hamer et al., RadioGraphics 2006;26:1637-1653); late arterial 60-90 HU; portal venous 100-130 HU,
  i.e. about 50 HU of enhancement, less with a low dose or a large patient (Bae, Radiology
  2010;256:32-61).
- Aorta 200-380 HU in the late arterial phase, 130-200 HU portal venous; portal vein 150-220 HU
  portal venous and from barely enhanced to 180 HU arterial depending on timing; hepatic veins
  unopacified (40-70 HU) in the arterial phase and in some early portal-venous phases (Bae 2010).
- Spleen: heterogeneous (arciform) in the arterial phase, homogeneous ~100-130 HU portal venous
  (Glazer et al., Radiology 1981;138:405-410). Kidneys: corticomedullary differentiation arterial,
  nephrographic portal venous (Yuh & Cohan, AJR 1999;173:747-755). Pancreas peaks in the late
  arterial ("pancreatic") phase at 100-150 HU.
- Water: cysts, bile, fluid 0-20 HU (Mortele & Ros, RadioGraphics 2001;21:895-910). Fat -120 to
  -80 HU; muscle 40-65 HU. Oral positive contrast in bowel and stomach 150-400 HU in some cases.

Lesion patterns (``lesion_hu``, ``mimic_hu``): HCC arterial-phase hyperenhancement, venous washout
and an enhancing capsule (LI-RADS v2018 CT/MRI core); metastases hypoattenuating in the portal
venous phase with an enhancing rim (Sica et al., AJR 2000;174:691-698); hemangioma peripheral
nodular discontinuous enhancement, blood-pool-like, filling in centripetally (Klotz et al., Diagn
Interv Imaging 2013;94:849-859); transient hepatic attenuation differences (wedge-shaped, arterial
only; Colagrande et al., AJR 2007;188:154-159); focal fat and focal sparing (Hamer 2006).
"""

from __future__ import annotations

import numpy as np

# Tissue codes of the anatomy map.
AIR, FAT, MUSCLE, VFAT, LUNG, CORTEX, CANCELLOUS, DISC, CSF = 0, 1, 2, 3, 4, 5, 6, 7, 8
BLOOD_HEART, MYOCARDIUM, AORTA, IVC, PORTAL, PORTAL_INTRA, HEPATIC_VEIN, LIVER = 9, 10, 11, 12, 13, 14, 15, 16
SPLEEN, KID_CORTEX, KID_MEDULLA, KID_SINUS, STOMACH_WALL, FLUID, GAS, BOWEL_WALL = 17, 18, 19, 20, 21, 22, 23, 24
PANCREAS, GALLBLADDER, BOWEL_CONTENT, RIB, HEPATIC_ARTERY = 25, 26, 27, 28, 29
# Liver-labelled look-alikes (mimics) use MIMIC_BASE + 3 * index + part; tumors TUMOR_BASE + 3 * index + part.
MIMIC_BASE, MAX_MIMICS = 40, 20
TUMOR_BASE, MAX_TUMORS = 110, 8
LIVER_CODES = (LIVER, PORTAL_INTRA, HEPATIC_VEIN, HEPATIC_ARTERY) + tuple(range(MIMIC_BASE, MIMIC_BASE + 3 * MAX_MIMICS))


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def draw_timing(rng: np.random.Generator) -> dict:
    """The case's contrast story: unenhanced liver, dose, arterial and venous timing, oral contrast."""
    steatosis = rng.random() < 0.15
    return {
        "liver_unenhanced_hu": _u(rng, 18, 45) if steatosis else _u(rng, 52, 66),
        "steatosis": bool(steatosis),
        # Iodine delivered per kg and cardiac output: scales every enhancement (Bae 2010).
        "dose": _u(rng, 0.65, 1.3),
        # 0 = early arterial (portal vein barely enhanced), 1 = late arterial (portal vein enhancing).
        "arterial_timing": _u(rng, 0.0, 1.0),
        # 0 = early portal venous (hepatic veins not yet opacified), 1 = late portal venous.
        "venous_timing": _u(rng, 0.0, 1.0),
        # Lesion-to-liver contrast factor: a quarter of the cases have weakly conspicuous lesions.
        "conspicuity": _u(rng, 0.45, 0.8) if rng.random() < 0.25 else _u(rng, 0.85, 1.2),
        "oral_contrast": bool(rng.random() < 0.25),
    }


def tissue_hu(rng: np.random.Generator, timing: dict) -> dict[int, tuple[tuple[float, float], tuple[float, float]]]:
    """(arterial, venous) HU and (arterial, venous) texture amplitude of every tissue code."""
    U = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731
    g, fa, fv = timing["dose"], timing["arterial_timing"], timing["venous_timing"]
    l0 = timing["liver_unenhanced_hu"]
    blood0 = U(35, 50)  # unenhanced blood
    aorta_a = float(np.clip(blood0 + g * U(170, 300) * (1.1 - 0.25 * fa), 180, 450))
    aorta_v = float(np.clip(blood0 + g * U(95, 150), 120, 230))
    portal_a = blood0 + g * (U(15, 40) + fa * U(60, 120))
    portal_v = float(np.clip(blood0 + g * U(110, 170), 130, 240))
    liver_a = l0 + g * (U(3, 12) + fa * U(5, 20))
    liver_v = l0 + g * U(38, 68)
    hv_a = blood0 + g * fa * U(0, 30)
    # Early portal venous: hepatic veins still darker than the liver (they mimic hypodense lesions).
    hv_v = liver_v + g * (-U(10, 45) + fv * U(30, 90))
    spleen_a = l0 + g * U(35, 85)
    spleen_v = liver_v + g * U(-5, 20)
    fluid = U(0, 18)
    oral = timing["oral_contrast"]
    content = U(150, 400) if oral else U(5, 30)  # positive oral contrast or water/chyme
    bowel_content = (content, content + U(-10, 10))
    hu = {
        AIR: ((-1000, -1000), (0, 0)),
        FAT: ((U(-120, -95),) * 2, (8, 8)),
        MUSCLE: ((U(40, 55), U(45, 65)), (6, 6)),
        VFAT: ((U(-110, -85),) * 2, (10, 10)),
        LUNG: ((U(-880, -820),) * 2, (35, 35)),
        CORTEX: ((U(700, 1000),) * 2, (60, 60)),
        CANCELLOUS: ((U(180, 300),) * 2, (40, 40)),
        DISC: ((U(75, 100),) * 2, (6, 6)),
        CSF: ((U(5, 20),) * 2, (3, 3)),
        BLOOD_HEART: ((aorta_a * U(0.6, 0.95), aorta_v * U(0.95, 1.1)), (25, 8)),
        MYOCARDIUM: ((U(100, 150), U(90, 120)), (8, 6)),
        AORTA: ((aorta_a, aorta_v), (8, 5)),
        IVC: ((U(60, 140), aorta_v * U(0.8, 1.05)), (25, 10)),
        PORTAL: ((portal_a, portal_v), (8, 6)),
        PORTAL_INTRA: ((portal_a * U(0.85, 1.0), portal_v * U(0.85, 1.0)), (8, 6)),
        HEPATIC_VEIN: ((hv_a, hv_v), (6, 8)),
        HEPATIC_ARTERY: ((aorta_a * U(0.6, 0.9), aorta_v * U(0.8, 1.0)), (8, 5)),
        LIVER: ((liver_a, liver_v), (U(3, 8), U(3, 8))),
        SPLEEN: ((spleen_a, spleen_v), (U(12, 40), U(3, 7))),
        KID_CORTEX: ((l0 + g * U(90, 180), l0 + g * U(80, 140)), (10, 6)),
        KID_MEDULLA: ((l0 + g * U(10, 50), l0 + g * U(70, 140)), (8, 6)),
        KID_SINUS: ((U(-70, -30),) * 2, (25, 25)),
        STOMACH_WALL: ((U(70, 120), U(80, 110)), (6, 6)),
        FLUID: ((fluid, fluid + U(0, 4)) if not oral or rng.random() < 0.5 else ((U(150, 350),) * 2), (3, 3)),
        GAS: ((-990, -990), (5, 5)),
        BOWEL_WALL: ((U(70, 130), U(75, 115)), (6, 6)),
        PANCREAS: ((U(95, 150), U(80, 115)), (8, 6)),
        GALLBLADDER: ((U(0, 22),) * 2, (2, 2)),
        BOWEL_CONTENT: (bowel_content, (10, 10)),
        RIB: ((U(300, 550),) * 2, (40, 40)),
    }
    return hu


TUMOR_KINDS = (
    "hypervascular",  # HCC-like: bright in arterial, washout in venous, enhancing capsule
    "hypovascular",  # metastasis-like: dark, clearest in venous, rim enhancement
    "arterial_only",  # small hypervascular lesion, isodense in venous
    "venous_only",  # hypovascular lesion isodense in arterial
    "cyst",  # cystic lesion (water, no enhancement): only when asked for; random cases draw cysts as mimics
    "necrotic",  # enhancing rim around a necrotic (fluid) core
    "heterogeneous",  # mosaic interior with necrotic patches
)
KIND_WEIGHTS = (0.28, 0.3, 0.1, 0.1, 0.0, 0.11, 0.11)

MIMIC_KINDS = (
    "cyst",  # simple cyst: 0-20 HU, sharp, never enhances
    "hemangioma",  # peripheral nodular enhancement filling in; small ones flash-fill
    "focal_fat",  # hypodense in both phases, geographic
    "perfusion",  # wedge-shaped arterial hyperenhancement, isodense in venous (THAD)
    "fat_sparing",  # in a steatotic liver: brighter than the liver in both phases
    "vessel",  # a short portal or hepatic vein segment seen in cross-section, with its own enhancement
)


def lesion_hu(rng, kind: str, liver: tuple[float, float], conspicuity: float):
    """(arterial, venous) HU and texture amplitude of a tumor's body, rim/capsule and necrosis (parts 0, 1, 2).

    Each kind keeps its defining pattern whatever the conspicuity: HCC stays >= 25 HU brighter than
    the liver arterially and >= 12 HU darker in the venous phase (LI-RADS calls smaller differences
    neither APHE nor washout), a metastasis >= 18 HU darker in the venous phase.
    """
    la, lv = liver
    U = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731
    c = conspicuity
    nec = ((U(5, 30),) * 2, (8.0, 8.0))
    if kind == "hypervascular":
        body = ((la + max(25, c * U(40, 95)), lv - max(12, c * U(15, 40))), (U(8, 15), U(5, 10)))
        rim = ((la + U(0, 15), lv + U(15, 40)), (4.0, 4.0))
    elif kind == "hypovascular":
        body = ((la - c * U(5, 35), lv - max(18, c * U(25, 70))), (U(5, 10), U(5, 10)))
        rim = ((la + U(5, 40), lv - U(0, 25)), (5.0, 5.0))
    elif kind == "arterial_only":
        body = ((la + max(25, c * U(40, 85)), lv + U(-4, 4)), (6.0, 3.0))
        rim = body
    elif kind == "venous_only":
        body = ((la + U(-4, 4), lv - max(20, c * U(30, 60))), (3.0, 5.0))
        rim = body
    elif kind == "cyst":
        hu = U(0, 15)
        body = ((hu, hu + U(0, 3)), (2.0, 2.0))
        rim = body
    elif kind == "necrotic":
        body = ((la + c * U(15, 50), lv - max(10, c * U(5, 25))), (U(8, 14), U(6, 10)))
        rim = ((la + U(30, 70), lv + U(-5, 12)), (6.0, 6.0))
    else:  # heterogeneous
        body = ((la + c * U(15, 50), lv - max(12, c * U(15, 35))), (U(20, 32), U(15, 25)))
        rim = ((la + U(20, 45), lv - U(0, 15)), (8.0, 8.0))
    return {0: body, 1: rim, 2: nec}


def mimic_hu(rng, kind: str, liver: tuple[float, float], blood: tuple[float, float], timing: dict):
    """(arterial, venous) HU and texture of a mimic's parts 0, 1, 2 (meaning per kind, see ``lesions``)."""
    la, lv = liver
    U = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731
    if kind == "cyst":
        hu = U(0, 20)
        body = ((hu, hu + U(0, 3)), (2.0, 2.0))
        return {0: body, 1: body, 2: body}
    if kind == "hemangioma":
        # 0: unenhanced centre (fills late), 1: peripheral nodules (blood pool), 2: filled-in periphery.
        ba, bv = blood
        core = ((U(35, 50), U(45, 80) if timing["venous_timing"] < 0.6 else lv + U(-10, 15)), (4.0, 4.0))
        nodules = ((ba * U(0.7, 1.0), bv * U(0.9, 1.1)), (6.0, 5.0))
        filled = ((U(40, 55), bv * U(0.85, 1.05)), (4.0, 4.0))
        return {0: core, 1: nodules, 2: filled}
    if kind == "focal_fat":
        d = U(15, 45)
        body = ((la - d, lv - d), (5.0, 5.0))
        return {0: body, 1: body, 2: body}
    if kind == "fat_sparing":
        d = U(12, 35)
        body = ((la + d * 0.8, lv + d), (4.0, 4.0))
        return {0: body, 1: body, 2: body}
    if kind == "perfusion":
        body = ((la + U(12, 40), lv + U(-5, 6)), (4.0, 4.0))
        return {0: body, 1: body, 2: body}
    # vessel: unopacified or partly opacified segment, the phase's own story.
    body = ((U(40, 70) if rng.random() < 0.6 else la + U(30, 100), lv + U(-45, 70)), (5.0, 6.0))
    return {0: body, 1: body, 2: body}
