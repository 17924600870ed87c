"""The scanner: acquisition protocol drawn per case (slices, pixels, field of view, noise) and image formation.

Protocol ranges follow clinical multiphase liver CT: reconstructed slice thickness 0.625-5 mm,
in-plane pixels 0.6-0.9 mm at 512 x 512 (coarser here to keep cases small), image noise 8-30 HU
standard deviation in the liver depending on dose, patient size and kernel (e.g. the LiTS and
TriALS cases span 0.7-5 mm slices; noise in clinical abdominal CT 10-25 HU). Partial volume comes
from rendering each phase at the voxel grid and blurring it with the scanner's point spread: in
plane a Gaussian of ~0.6-1 mm, along z the slice profile (FWHM = slice thickness). Noise is white
noise low-pass filtered to a grain that varies with the reconstruction kernel, scaled to the drawn
standard deviation.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

# Slice thicknesses (mm) of the "demo" protocol and how often each is drawn.
SLICE_CHOICES = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SLICE_WEIGHTS = (0.05, 0.06, 0.09, 0.07, 0.09, 0.12, 0.14, 0.14, 0.09, 0.15)


def draw_protocol(rng: np.random.Generator, spec: dict, body_width_mm: float) -> dict:
    """Grid size (nx, ny, nz), spacing (x, y, z) mm, field of view offset, noise of one case.

    Sizes with ``"random_geometry"`` keep the voxel count near ``shape``'s product on average: thick
    slices get fewer slices, thin slices a shorter z extent and coarser pixels.
    """
    noise_v = float(rng.uniform(*spec["noise"]))
    protocol = {
        "noise_sd_venous": noise_v,
        "noise_sd_arterial": noise_v * float(rng.uniform(0.9, 1.2)),
        # Noise grain (mm): sharp kernels give fine grain, soft kernels coarse grain.
        "noise_grain_mm": float(rng.uniform(0.5, 1.6)),
        "psf_mm": float(rng.uniform(0.5, 1.0)),
    }
    nx, ny, nz = spec["shape"]
    if not spec.get("random_geometry"):
        sxy = float(round(rng.uniform(*spec["inplane"]), 4))
        sz = float(rng.choice(spec["slices"]))
        protocol.update(size=(nx, ny, nz), spacing=(sxy, sxy, sz), fov_shift_x=float(rng.uniform(-3, 3)))
        return protocol
    budget = nx * ny * nz * float(rng.uniform(0.8, 1.15))
    sz = float(rng.choice(SLICE_CHOICES, p=SLICE_WEIGHTS))
    coverage = float(rng.uniform(150.0, 240.0))  # z extent (mm), liver dome to kidneys when long enough
    nz = int(min(round(coverage / sz), rng.integers(110, 171)))
    n_xy = int(np.clip(round(math.sqrt(budget / nz) / 8) * 8, 112, 208))
    # Field of view: usually the whole body, sometimes cutting its sides (a large patient, a tight
    # reconstruction field centred on the liver).
    cut = rng.random() < 0.2
    fov = body_width_mm * (float(rng.uniform(0.85, 0.97)) if cut else float(rng.uniform(1.04, 1.3)))
    sxy = float(round(fov / n_xy, 4))
    # Field-of-view centre (mm along x) off the body's: a cut field loses either side, the liver's too.
    shift = float(rng.uniform(-40, 40)) if cut else float(rng.uniform(-10, 10))
    protocol.update(size=(n_xy, n_xy, nz), spacing=(sxy, sxy, sz), fov_shift_x=shift)
    return protocol


def scan(hu: sitk.Image, rng: np.random.Generator, noise_sd: float, grain_mm: float = 0.6, psf_mm: float = 0.0) -> sitk.Image:
    """Scanner blur (in-plane PSF, slice profile) and spatially correlated noise -> Int16 HU."""
    sx, sy, sz = hu.GetSpacing()
    # At least half a pixel in plane (anti-aliasing); the slice profile's FWHM is the slice thickness.
    var = [max(0.5 * sx, psf_mm) ** 2, max(0.5 * sy, psf_mm) ** 2, (0.42 * sz) ** 2]
    img = sitk.DiscreteGaussian(hu, variance=var, maximumKernelWidth=32, maximumError=0.01, useImageSpacing=True)
    arr = sitk.GetArrayFromImage(img)
    white = rng.standard_normal(arr.shape, dtype=np.float32)
    nimg = sitk.GetImageFromArray(white)
    nimg.SetSpacing(hu.GetSpacing())
    g = [max(grain_mm, 0.45 * sx), max(grain_mm, 0.45 * sy), 0.3 * sz]
    nimg = sitk.DiscreteGaussian(nimg, variance=[v * v for v in g], maximumKernelWidth=16, maximumError=0.01,
                                 useImageSpacing=True)
    noise = sitk.GetArrayFromImage(nimg)
    noise *= np.float32(noise_sd / max(float(noise.std()), 1e-6))
    arr += noise
    out = sitk.GetImageFromArray(np.clip(np.rint(arr), -1024, 3071).astype(np.int16))
    out.CopyInformation(hu)
    return out


def image(arr: np.ndarray, origin, spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin([float(o) for o in origin])
    img.SetSpacing([float(s) for s in spacing])
    return img
