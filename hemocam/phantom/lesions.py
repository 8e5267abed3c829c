"""Intracranial hemorrhages with their typical shape, place and density.

Each lesion is defined in the head frame, so it renders identically on any grid. Lesions are
sampled with rejection: a candidate is rendered on a coarse probe of the real slice planes and
kept only if it shows on at least two consecutive slices (a lesion the scan cannot see would
make its slice labels lie).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..labelset import SUBTYPES
from .anatomy import BRAIN_PARENCHYMA, F32, T, Anatomy, Scene, outer_radius, render_anatomy

SUBTYPE_CODE = {name: i + 1 for i, name in enumerate(SUBTYPES)}
# painting order: lesions defined by the anatomy they fill (CSF spaces, ventricles) go first
PAINT_ORDER = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")


@dataclass
class Lesion:
    subtype: str
    centre: np.ndarray  # head frame: centre of a bounding sphere
    radius: float  # bounding sphere radius (mm)
    hu: float  # mean density of the blood
    params: dict = field(default_factory=dict)

    @property
    def code(self):
        return SUBTYPE_CODE[self.subtype]


def _unit(az_deg, el_deg):
    az, el = np.deg2rad(az_deg), np.deg2rad(el_deg)
    return np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])


def _conspicuity(rng):
    return rng.choice(["obvious", "moderate", "subtle"], p=[0.4, 0.35, 0.25])


# ----------------------------------------------------------------------------- sampling


def _sample_extra_axial(rng, anat: Anatomy, subtype):
    """Epidural lens or subdural crescent against the inner table of the convexity."""
    side = rng.choice([-1, 1])
    look = _conspicuity(rng)
    if subtype == "epidural":  # mostly temporo-parietal (middle meningeal artery)
        az = (0 if side > 0 else 180) + rng.uniform(-55, 55)
        el = rng.uniform(-15, 40)
        extent, thick, power = rng.uniform(18, 36), rng.uniform(7, 22), 1.0
        hu = {"obvious": rng.uniform(70, 90), "moderate": rng.uniform(60, 72), "subtle": rng.uniform(55, 63)}[look]
        if look == "subtle":
            thick *= 0.6
    else:  # subdural: wide, thin crescent over the fronto-parietal convexity
        az = (0 if side > 0 else 180) + rng.uniform(-75, 75)
        el = rng.uniform(-5, 50)
        extent, thick, power = rng.uniform(35, 75), rng.uniform(3, 12), 0.35
        hu = {"obvious": rng.uniform(58, 78), "moderate": rng.uniform(48, 60), "subtle": rng.uniform(35, 50)}[look]
        if look == "subtle":
            thick = rng.uniform(2.5, 6)
    u0 = _unit(az, el)
    r_out = float(outer_radius(anat, *(np.array([c], F32) for c in u0))[0])
    centre = u0 * (r_out - 14)
    return Lesion(subtype, centre, extent * 1.2 + thick + 12, hu,
                  dict(u0=u0, extent=extent, thick=thick, power=power, side=int(side), look=look))


def _sample_intraparenchymal(rng, anat: Anatomy, probe_brain):
    """Irregular hyperdense blob in the deep nuclei (hypertensive) or lobar white matter."""
    look = _conspicuity(rng)
    r0 = {"obvious": rng.uniform(10, 22), "moderate": rng.uniform(7, 14), "subtle": rng.uniform(5, 9)}[look]
    hu = {"obvious": rng.uniform(68, 85), "moderate": rng.uniform(60, 72), "subtle": rng.uniform(55, 63)}[look]
    centre = probe_brain[rng.integers(len(probe_brain))]
    axes = r0 * rng.uniform(0.7, 1.3, size=3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return Lesion("intraparenchymal", centre, float(axes.max() * 1.45 + 8), hu,
                  dict(axes=axes, rot=q, irregular=rng.uniform(0.12, 0.28), rim=rng.uniform(2, 6),
                       oedema_hu=rng.uniform(15, 25), side=int(np.sign(centre[0]) or 1), look=look,
                       tex_offset=rng.uniform(0, 200, size=3)))


def _sample_subarachnoid(rng, anat: Anatomy):
    """Blood in sulci / cisterns: convexity (trauma) or basal cisterns (aneurysm)."""
    look = _conspicuity(rng)
    hu = {"obvious": rng.uniform(58, 72), "moderate": rng.uniform(50, 60), "subtle": rng.uniform(45, 52)}[look]
    if rng.uniform() < 0.5:
        u0 = _unit(rng.uniform(0, 360), rng.uniform(5, 55))
        r_out = float(outer_radius(anat, *(np.array([c], F32) for c in u0))[0])
        centre = u0 * (r_out - 22)
        reach = rng.uniform(18, 38)
        kind = "convexity"
    else:
        centre = np.array([rng.uniform(-6, 6), rng.uniform(0, 10), anat.base_z + rng.uniform(16, 24)])
        reach = rng.uniform(22, 36)
        kind = "basal"
    return Lesion("subarachnoid", centre, reach * 1.3, hu, dict(reach=reach, kind=kind, look=look))


def _sample_intraventricular(rng, anat: Anatomy):
    """Blood layering in the dependent (posterior, patient supine) part of the lateral ventricles."""
    look = _conspicuity(rng)
    hu = {"obvious": rng.uniform(65, 80), "moderate": rng.uniform(56, 66), "subtle": rng.uniform(50, 57)}[look]
    side = int(rng.choice([-1, 1, 0]))
    x = side * 16 * anat.vent_scale
    centre = np.array([x, -28.0, anat.vent_z])
    fill = rng.uniform(-4, 9)  # fluid level relative to the atrium centre, world y
    level = float(anat.to_world([centre])[0, 1] + fill)
    return Lesion("intraventricular", centre, 45.0 if side == 0 else 30.0, hu,
                  dict(side=side, level=level, look=look))


# ----------------------------------------------------------------------------- drawing


def _draw_extra_axial(les: Lesion, scene: Scene, idx):
    pr = les.params
    q = scene.q[idx]
    rho = np.linalg.norm(q, axis=1) + F32(1e-3)
    cosang = np.clip(q @ pr["u0"].astype(F32) / rho, -1, 1)
    s = rho * np.arccos(cosang)
    profile = np.clip(1 - (s / F32(pr["extent"])) ** 2, 0, 1) ** F32(pr["power"])
    thickness = F32(pr["thick"]) * profile
    # the falx stops a convexity collection at the midline
    same_side = scene.shifted_x[idx] * F32(pr["side"]) > F32(1.0)
    m = (scene.depth_in[idx] < thickness) & (thickness > 0.3) & same_side
    return m, None


def _draw_intraparenchymal(les: Lesion, scene: Scene, idx, anat: Anatomy):
    pr = les.params
    rel = (scene.q[idx] - les.centre.astype(F32)) @ pr["rot"].astype(F32)
    d = np.sqrt(((rel / pr["axes"].astype(F32)) ** 2).sum(axis=1))
    bumpy = d * (1 + F32(pr["irregular"]) * anat.coarse(rel * F32(2.5) + F32(pr["tex_offset"])))
    allowed = np.isin(scene.tissue[idx], BRAIN_PARENCHYMA + (T["csf"], T["oedema"]))
    m = (bumpy < 1) & allowed
    rim = F32(pr["rim"] / pr["axes"].mean())
    oedema = (bumpy >= 1) & (bumpy < 1 + rim) & np.isin(scene.tissue[idx], BRAIN_PARENCHYMA)
    return m, oedema


def _draw_subarachnoid(les: Lesion, scene: Scene, idx, anat: Anatomy):
    rel = scene.q[idx] - les.centre.astype(F32)
    d = np.linalg.norm(rel, axis=1) / F32(les.params["reach"])
    d = d * (1 + F32(0.25) * anat.coarse(scene.q[idx] * F32(1.7)))
    return (d < 1) & (scene.tissue[idx] == T["csf"]), None


def _draw_intraventricular(les: Lesion, scene: Scene, idx):
    pr = les.params
    lateral = (np.abs(scene.shifted_x[idx]) > 3) & (scene.q[idx, 2] > F32(les.centre[2] - 18))
    m = (scene.tissue[idx] == T["ventricle"]) & (scene.p[idx, 1] < pr["level"]) & lateral
    if pr["side"] != 0:
        m &= np.sign(scene.shifted_x[idx]) == pr["side"]
    return m, None


def paint_lesions(anat: Anatomy, lesions, scene: Scene, texture_rng_offset=0.0):
    """Paint lesions into ``scene`` (tissue -> blood, HU) and return uint8 subtype codes."""
    code = np.zeros(len(scene.q), np.uint8)
    for les in sorted(lesions, key=lambda l: PAINT_ORDER.index(l.subtype)):
        rel = scene.q - les.centre.astype(F32)
        near = np.flatnonzero(scene.cavity & (np.einsum("ij,ij->i", rel, rel) < F32(les.radius**2)))
        if len(near) == 0:
            continue
        if les.subtype in ("epidural", "subdural"):
            m, oedema = _draw_extra_axial(les, scene, near)
        elif les.subtype == "intraparenchymal":
            m, oedema = _draw_intraparenchymal(les, scene, near, anat)
        elif les.subtype == "subarachnoid":
            m, oedema = _draw_subarachnoid(les, scene, near, anat)
        else:
            m, oedema = _draw_intraventricular(les, scene, near)
        if oedema is not None:
            o = near[oedema & ~m & (code[near] == 0)]
            scene.tissue[o] = T["oedema"]
            scene.hu[o] = F32(les.params["oedema_hu"])
        hit = near[m]
        # clots are not uniform: mild heterogeneity (swirl of unclotted blood in big EDH/SDH)
        swirl = anat.coarse(scene.q[hit] * F32(4)) * F32(5 if les.params.get("look") != "subtle" else 2)
        scene.tissue[hit] = T["blood"]
        scene.hu[hit] = F32(les.hu) + swirl
        code[hit] = les.code
    return code


# ----------------------------------------------------------------------------- rejection sampling


def _probe_points(anat: Anatomy, centre_h, radius, slice_z, step=2.0):
    """World points on the real slice planes within the lesion's bounding box."""
    c = anat.to_world([centre_h])[0]
    r = radius
    ax = np.arange(-r, r + step, step)
    zs = [z for z in slice_z if abs(z - c[2]) <= r]
    if not zs:
        return None, None
    gx, gy = np.meshgrid(c[0] + ax, c[1] + ax, indexing="ij")
    pts = [np.column_stack([gx.ravel(), gy.ravel(), np.full(gx.size, z)]) for z in zs]
    which = np.concatenate([np.full(gx.size, i) for i in range(len(zs))])
    return np.concatenate(pts), which


def _visible(anat, lesion, slice_z, min_slices=2, min_px=3):
    pts, which = _probe_points(anat, lesion.centre, lesion.radius, slice_z)
    if pts is None:
        return False
    scene = render_anatomy(anat, pts, voxel_mm=2.0)
    code = paint_lesions(anat, [lesion], scene)
    per_slice = np.bincount(which[code > 0], minlength=which.max() + 1)
    shown = per_slice >= min_px
    # consecutive run of visible slices
    best = run = 0
    for s in shown:
        run = run + 1 if s else 0
        best = max(best, run)
    return best >= min_slices


def _brain_probe(anat: Anatomy, slice_z, deep: bool):
    """Head-frame points in parenchyma on the scanned slices (candidate IPH centres)."""
    ax = np.arange(-80, 81, 4.0)
    zs = np.asarray(slice_z)[1:-1] if len(slice_z) > 4 else np.asarray(slice_z)
    gx, gy, gz = np.meshgrid(ax + anat.centre[0], ax + anat.centre[1], zs, indexing="ij")
    pts = np.column_stack([gx.ravel(), gy.ravel(), gz.ravel()])
    scene = render_anatomy(anat, pts, voxel_mm=4.0)
    ok = np.isin(scene.tissue, BRAIN_PARENCHYMA) & (scene.depth_in > (12 if deep else 8))
    if deep:
        ok &= scene.tissue == T["deep_grey"]
    cand = scene.q[ok]
    if len(cand) == 0:
        cand = scene.q[np.isin(scene.tissue, BRAIN_PARENCHYMA)]
    return cand


def _mass_effect(les: Lesion):
    """Midline shift (mm toward +x) caused by a large lesion, or 0."""
    pr = les.params
    if les.subtype in ("epidural", "subdural"):
        size = pr["thick"] * (1.0 if les.subtype == "epidural" else 1.3)
    elif les.subtype == "intraparenchymal":
        size = pr["axes"].mean() * 0.7
    else:
        return 0.0
    return -pr["side"] * float(np.clip(0.5 * (size - 6), 0, 10))


FALLBACK_SUBTYPES = ("subdural", "subarachnoid", "intraparenchymal")


def _place(rng, anat, subtype, slice_z, max_tries):
    for _ in range(max_tries):
        if subtype in ("epidural", "subdural"):
            les = _sample_extra_axial(rng, anat, subtype)
        elif subtype == "intraparenchymal":
            les = _sample_intraparenchymal(rng, anat, _brain_probe(anat, slice_z, deep=rng.uniform() < 0.5))
        elif subtype == "subarachnoid":
            les = _sample_subarachnoid(rng, anat)
        else:
            les = _sample_intraventricular(rng, anat)
        if _visible(anat, les, slice_z):
            return les
    return None


def sample_lesions(rng: np.random.Generator, anat: Anatomy, subtypes, slice_z, strict=True, max_tries=40):
    """One visible lesion per requested subtype; sets ``anat.shift`` for space-occupying ones.

    A subtype whose territory the slices do not cover (e.g. ventricles in a short vertex scan)
    raises ValueError when ``strict``; otherwise it is dropped, and a positive scan left without
    any lesion gets a convexity subdural / subarachnoid / parenchymal one instead.
    """
    lesions = []
    order = sorted(subtypes, key=lambda s: ("epidural", "subdural", "intraparenchymal", "subarachnoid", "intraventricular").index(s))
    for subtype in order:
        les = _place(rng, anat, subtype, slice_z, max_tries)
        if les is None:
            if strict:
                raise ValueError(f"cannot place a visible {subtype} lesion on these {len(slice_z)} slices")
            continue
        lesions.append(les)
        _update_shift(anat, les)
    if subtypes and not lesions:
        for subtype in FALLBACK_SUBTYPES:
            les = _place(rng, anat, subtype, slice_z, max_tries)
            if les is not None:
                lesions.append(les)
                _update_shift(anat, les)
                break
        else:
            raise ValueError(f"cannot place any visible lesion on these {len(slice_z)} slices")
    return lesions


def _update_shift(anat: Anatomy, les: Lesion):
    shift = _mass_effect(les)
    if abs(shift) > abs(anat.shift[0]):
        anat.shift = (shift, float(les.centre[1]) * 0.5, float(les.centre[2]), 70.0, 40.0)
