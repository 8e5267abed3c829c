"""One synthetic head CT: subject + lesions + scanner, rendered on a voxel grid.

``make_scan`` returns arrays on the grid dcm2niix writes for an axial head CT: axis 0 runs
from patient right to left, axis 1 posterior to anterior, axis 2 inferior to superior
(nibabel orientation codes L, A, S). The same ``Phantom`` renders onto any other grid (DICOM
slice planes, gantry-tilted planes, ground-truth mask grids) through ``render_grid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from ..labelset import LABELS, SUBTYPES
from .anatomy import F32, Anatomy, render_anatomy, sample_anatomy
from .lesions import paint_lesions, sample_lesions

P_HEMORRHAGE = 0.62  # ~38 % of scans negative, as in RSNA-like cohorts
# how often each subtype appears in a positive scan (RSNA: SDH, IPH, SAH common; EDH rare)
SUBTYPE_WEIGHTS = {"epidural": 0.07, "intraparenchymal": 0.27, "intraventricular": 0.16, "subarachnoid": 0.25, "subdural": 0.25}


@dataclass
class Scanner:
    fov_mm: float  # reconstruction diameter: pixel spacing = fov / matrix whatever the matrix
    psf_px: float  # in-plane point-spread blur (gaussian sigma, pixels)
    z_blur: float  # through-plane partial volume (gaussian sigma, slices)
    noise_hu: float  # per-scan noise level
    centre_xy: tuple  # reconstruction centre, world RAS mm


@dataclass
class Phantom:
    """Everything needed to render one scan on any grid, all fixed by the seed."""

    seed: int
    anatomy: Anatomy
    lesions: list
    scanner: Scanner
    slice_z: np.ndarray  # world z of the axial slice centres (inferior -> superior)
    slice_thickness: float

    @property
    def subtypes(self):
        return sorted({les.subtype for les in self.lesions}, key=SUBTYPES.index)


def rng_streams(seed: int):
    """Independent streams so e.g. the noise never changes the anatomy."""
    ss = np.random.SeedSequence([int(seed), 0x4E3A])
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def choose_subtypes(rng, hemorrhage=None):
    """Draw which subtypes a scan shows (empty list: negative scan)."""
    if hemorrhage is None:
        hemorrhage = rng.uniform() < P_HEMORRHAGE
    if not hemorrhage:
        return []
    n = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    w = np.array([SUBTYPE_WEIGHTS[s] for s in SUBTYPES])
    return sorted(rng.choice(SUBTYPES, size=n, replace=False, p=w / w.sum()).tolist(), key=SUBTYPES.index)


def sample_phantom(seed: int, n_slices: int = 28, slice_thickness: float = 5.0, hemorrhage=None, subtypes=None,
                   anatomy_seed=None, strict=None) -> Phantom:
    """Subject, lesions and scanner for ``seed``; independent of the matrix it is rendered on.

    ``anatomy_seed``: draw the head from another seed (a second study of the same patient:
    same anatomy, new position in the scanner, new lesions). ``strict`` (default: when
    ``subtypes`` is given): raise ValueError if a subtype cannot show on these slices, instead
    of dropping it.
    """
    if strict is None:
        strict = subtypes is not None
    r_anat, r_les, r_scan, _ = rng_streams(seed)
    if anatomy_seed is None:
        anat = sample_anatomy(r_anat)
    else:
        anat = sample_anatomy(rng_streams(anatomy_seed)[0])
        repositioned = sample_anatomy(r_anat)
        anat.centre, anat.rot = repositioned.centre, repositioned.rot
    if subtypes is None:
        subtypes = choose_subtypes(r_les, hemorrhage)
    elif hemorrhage is False and subtypes:
        raise ValueError("hemorrhage=False contradicts a non-empty subtypes list")
    unknown = set(subtypes) - set(SUBTYPES)
    if unknown:
        raise ValueError(f"unknown subtypes {sorted(unknown)}")
    subtypes = [s for s in SUBTYPES if s in set(subtypes)]
    # the scan starts just above the vertex and runs caudally (head CTs are planned that way)
    top = anat.vertex_world_z() + r_scan.uniform(-2, 6)
    slice_z = np.round(top - slice_thickness * np.arange(n_slices)[::-1], 4)
    fov = max(r_scan.uniform(220, 250), 2 * (anat.b + abs(anat.centre[1]) + 10))
    scanner = Scanner(fov_mm=float(fov), psf_px=float(r_scan.uniform(0.6, 1.0)), z_blur=float(r_scan.uniform(0.15, 0.35)),
                      noise_hu=float(r_scan.uniform(6, 12)), centre_xy=(0.0, 0.0))
    lesions = sample_lesions(r_les, anat, subtypes, slice_z, strict=strict)
    return Phantom(seed, anat, lesions, scanner, slice_z, float(slice_thickness))


def pixel_spacing(scanner: Scanner, matrix: int) -> float:
    """In-plane spacing (mm) rounded to what a DS value carries."""
    return round(scanner.fov_mm / matrix, 6)


def axial_affine(phantom: Phantom, matrix: int) -> np.ndarray:
    """Voxel -> RAS affine of the dcm2niix-style (L, A, S) grid covering the reconstruction FOV."""
    sc = phantom.scanner
    d = pixel_spacing(sc, matrix)
    # rounded like the DS strings written to DICOM, so both describe the same grid exactly
    x0 = round(sc.centre_xy[0] + (matrix - 1) * d / 2, 4)  # first column at patient right
    y0 = round(sc.centre_xy[1] - (matrix - 1) * d / 2, 4)  # first row (after dcm2niix's flip) posterior
    aff = np.diag([-d, d, phantom.slice_thickness, 1.0])
    aff[:3, 3] = [x0, y0, phantom.slice_z[0]]
    return aff


def voxel_points(affine: np.ndarray, shape, k0: int, k1: int) -> np.ndarray:
    """World coordinates of the voxel centres of slices k0..k1-1 (C order over i, j, k)."""
    i = np.arange(shape[0], dtype=F32)[:, None, None]
    j = np.arange(shape[1], dtype=F32)[None, :, None]
    k = np.arange(k0, k1, dtype=F32)[None, None, :]
    a = affine.astype(F32)
    pts = np.empty((shape[0], shape[1], k1 - k0, 3), F32)
    for c in range(3):  # separable sums: cheaper than an (N, 3) @ (3, 3) product
        pts[..., c] = (a[c, 3] + a[c, 2] * k) + (a[c, 1] * j) + (a[c, 0] * i)
    return pts.reshape(-1, 3)


def render_grid(phantom: Phantom, affine: np.ndarray, shape, chunk_voxels: int = 2_000_000):
    """Noise-free HU, subtype codes and tissue codes on an arbitrary (even sheared) grid."""
    shape = tuple(int(s) for s in shape)
    hu = np.empty(shape, F32)
    code = np.empty(shape, np.uint8)
    tissue = np.empty(shape, np.uint8)
    voxel_mm = float(np.linalg.norm(affine[:3, 0]))
    per_slice = shape[0] * shape[1]
    step = max(1, chunk_voxels // per_slice)
    for k0 in range(0, shape[2], step):
        k1 = min(shape[2], k0 + step)
        pts = voxel_points(affine, shape, k0, k1)
        scene = render_anatomy(phantom.anatomy, pts, voxel_mm)
        c = paint_lesions(phantom.anatomy, phantom.lesions, scene)
        sub = (shape[0], shape[1], k1 - k0)
        hu[:, :, k0:k1] = scene.hu.reshape(sub)
        code[:, :, k0:k1] = c.reshape(sub)
        tissue[:, :, k0:k1] = scene.tissue.reshape(sub)
    return hu, code, tissue


# a voxel whose blurred value reads above this is bone (partial volume with the skull) to any
# reader: blood there cannot be seen, so the truth does not mark it (the brain mask's strip level too)
BONE_PV_HU = 130.0


def scanner_blur(hu: np.ndarray, scanner: Scanner) -> np.ndarray:
    """Point-spread blur and slice partial volume of a noise-free HU grid."""
    return ndimage.gaussian_filter(hu, sigma=(scanner.psf_px, scanner.psf_px, scanner.z_blur), mode="nearest")


def add_noise(blurred: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Correlated quantum noise on a blurred HU grid; HU rounded like a scanner."""
    noise = rng.standard_normal(blurred.shape, dtype=F32)
    # filtered back-projection noise is spatially correlated: smooth then restore the level
    noise = ndimage.gaussian_filter(noise, sigma=(0.6, 0.6, 0), mode="wrap")
    noise *= F32(scanner.noise_hu) / (noise.std() + F32(1e-6))
    return np.clip(np.rint(blurred + noise), -1024, 3071).astype(F32)


def apply_scanner(hu: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Point-spread blur, slice partial volume and correlated quantum noise; HU rounded."""
    return add_noise(scanner_blur(hu, scanner), scanner, rng)


def visible_code(code: np.ndarray, blurred: np.ndarray) -> np.ndarray:
    """The truth as a reader can mark it: blood voxels that the scanner's blur merges into the
    skull (thin extra-axial collections on a coarse grid) read as bone and are left unmarked,
    so masks and slice labels only claim blood the image shows."""
    return np.where(blurred <= F32(BONE_PV_HU), code, 0).astype(np.uint8)


def slice_labels_from_mask(code: np.ndarray) -> pd.DataFrame:
    """Per-slice 0/1 labels (axis 2) for ``any`` and each subtype from a subtype-code mask."""
    n = code.shape[2]
    rows = {"slice": np.arange(n)}
    flat = code.reshape(-1, n)
    for i, name in enumerate(SUBTYPES):
        rows[name] = (flat == i + 1).any(axis=0).astype(int)
    rows["any"] = (flat > 0).any(axis=0).astype(int)
    return pd.DataFrame(rows)[["slice", *LABELS]]


def render_scan(phantom: Phantom, matrix: int) -> dict:
    """Render ``phantom`` on its axial grid with scanner effects; see ``make_scan``."""
    _, _, _, r_noise = rng_streams(phantom.seed)
    shape = (matrix, matrix, len(phantom.slice_z))
    affine = axial_affine(phantom, matrix)
    clean, code, tissue = render_grid(phantom, affine, shape)
    blurred = scanner_blur(clean, phantom.scanner)
    hu = add_noise(blurred, phantom.scanner, r_noise)
    code = visible_code(code, blurred)
    d = pixel_spacing(phantom.scanner, matrix)
    return {
        "hu": hu,
        "mask": code,
        "tissue": tissue,
        "slice_labels": slice_labels_from_mask(code),
        "spacing": (d, d, phantom.slice_thickness),
        "affine": affine,
        "subtypes": [s for s in SUBTYPES if (code == SUBTYPES.index(s) + 1).any()],
        "phantom": phantom,
    }


def make_scan(seed: int, matrix: int = 128, n_slices: int = 28, slice_thickness=5.0, hemorrhage=None, subtypes=None,
              strict=None) -> dict:
    """One synthetic head CT.

    Returns a dict: ``hu`` float32 (X, Y, Z) in HU (rounded like a scanner); ``mask`` uint8
    subtype codes (1..5 in ``SUBTYPES`` order, 0 none); ``slice_labels`` DataFrame (slice +
    LABELS, 0/1); ``spacing`` (sx, sy, sz) mm; ``affine`` voxel -> RAS (L, A, S axes);
    extras: ``tissue`` (codes of ``anatomy.TISSUES``), ``subtypes`` shown, ``phantom``.
    ``hemorrhage`` None draws (~62 % positive); ``subtypes`` forces which subtypes appear
    (ValueError if one cannot show on these slices, unless ``strict=False``: then it is dropped
    and ``subtypes`` in the result says what is there).
    """
    phantom = sample_phantom(seed, n_slices, slice_thickness, hemorrhage, subtypes, strict=strict)
    return render_scan(phantom, matrix)
