"""Analytic adult head anatomy in Hounsfield units, evaluated at arbitrary world points.

The head lives in its own frame ``q`` (mm; x = right, y = anterior, z = superior, origin at the
widest part of the skull) placed in the scanner by a rotation and a centre, so the same subject
can be rendered on any grid: the NIfTI grid, the DICOM slice planes, a gantry-tilted series.

Layers are found by a radial depth below a perturbed ellipsoidal scalp surface (skin, fat,
temporalis muscle, outer table, diploe, inner table), then the intracranial cavity above a
skull-base floor is filled with CSF, cortex (band-pass-noise gyri), white matter, deep grey
nuclei, ventricles, falx, calcifications, posterior-fossa structures; below the floor sit the
sinuses, orbits, petrous and mastoid bone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fields import Texture

TISSUES = (
    "air", "skin", "fat", "muscle", "cortical_bone", "diploe", "csf", "ventricle", "grey_matter",
    "white_matter", "deep_grey", "falx", "calcification", "cerebellum", "brainstem", "sinus_air",
    "globe", "orbital_fat", "holder", "oedema", "blood",
)
T = {name: code for code, name in enumerate(TISSUES)}
# everything a brain mask should contain (inside the inner table, above the skull base)
INTRACRANIAL = tuple(T[n] for n in (
    "csf", "ventricle", "grey_matter", "white_matter", "deep_grey", "falx", "calcification",
    "cerebellum", "brainstem", "oedema", "blood"))
BRAIN_PARENCHYMA = tuple(T[n] for n in ("grey_matter", "white_matter", "deep_grey", "cerebellum", "brainstem"))

F32 = np.float32


def _rotation(yaw, pitch, roll):
    """Head-to-world rotation from angles in degrees (yaw about z, pitch about x, roll about y)."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@dataclass
class Anatomy:
    """One subject's head: shape, layer thicknesses, HU of each tissue, textures."""

    centre: np.ndarray  # world RAS mm of the head-frame origin
    rot: np.ndarray  # 3x3 head -> world
    a: float  # half width (left-right) at the widest level
    b: float  # half length (anterior-posterior)
    c_up: float  # origin -> vertex
    c_down: float  # origin -> chin direction (elongated: the head stays wide at the skull base)
    shape_terms: list  # (coef, ex, ey, ez): smooth bumps on the ellipsoid as monomials of direction
    skin_mm: float
    fat_mm: float
    temporalis_mm: float
    skull_mm: float
    table_mm: float
    csf_gap_mm: float
    sulcus_half_mm: float
    sulcus_depth_mm: float
    cortex_mm: float
    base_z: float  # middle cranial fossa floor, head frame
    vent_z: float  # level of the lateral ventricle bodies' floor
    vent_scale: float
    fissure_half_mm: float
    falx_mm: float
    hu: dict
    choroid_calc: tuple  # (left, right)
    pineal_calc: bool
    beam_hardening: float
    sulci: Texture = field(repr=False)
    coarse: Texture = field(repr=False)
    fine: Texture = field(repr=False)
    folia: Texture = field(repr=False)
    # mass effect: (shift_mm toward +x, y0, z0, sigma_y, sigma_z); set by large lesions
    shift: tuple = (0.0, 0.0, 0.0, 1.0, 1.0)

    def to_head(self, p):
        """World (N, 3) -> head frame, float32; column arithmetic (a (N,3)@(3,3) matmul is slow)."""
        p = np.asarray(p)
        d = [p[:, a].astype(F32) - F32(self.centre[a]) for a in range(3)]
        r = self.rot.astype(F32)
        return np.stack([d[0] * r[0, c] + d[1] * r[1, c] + d[2] * r[2, c] for c in range(3)], axis=1)

    def to_world(self, q):
        return np.asarray(q, np.float64) @ self.rot.T + self.centre

    def vertex_world_z(self):
        return float(self.to_world([[0.0, 0.0, self.c_up]])[0, 2])


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one adult head; ranges follow typical adult CT appearance."""
    u = rng.uniform
    atrophy = u(0, 1)  # older brains: wider sulci and ventricles
    hu = {
        "air": -1000.0,
        "skin": u(45, 68),  # blood-like HU outside the skull: a real confounder
        "fat": u(-105, -75),
        "muscle": u(42, 58),
        "cortical_bone": u(1350, 1750),
        "diploe": u(700, 1050),
        "csf": u(2, 9),
        "grey_matter": u(35, 40),
        "white_matter": u(25, 30),
        "falx": u(60, 80),
        "calcification": u(120, 300),
        "globe": u(6, 14),
        "orbital_fat": u(-100, -80),
        "sinus_air": u(-990, -920),
        "holder": u(80, 160),
        "skull_base": u(900, 1200),
    }
    hu["deep_grey"] = hu["grey_matter"] - u(0, 2.5)
    hu["cerebellum"] = hu["grey_matter"] - u(1, 4)
    hu["brainstem"] = hu["white_matter"] + u(1, 4)
    terms = [(u(-0.035, 0.035), *e) for e in ((0, 1, 0), (0, 3, 0), (2, 1, 0), (0, 1, 1), (2, 0, 1), (0, 2, 1), (1, 0, 0))]
    terms.append((u(-0.05, -0.02), 0, 0, 2))  # flatter vertex
    return Anatomy(
        centre=np.array([u(-6, 6), u(-14, 8), 0.0]),
        rot=_rotation(u(-7, 7), u(-10, 10), u(-4, 4)),
        a=u(68, 78), b=u(86, 98), c_up=u(80, 92), c_down=u(115, 135),
        shape_terms=terms,
        skin_mm=u(1.5, 2.5), fat_mm=u(1.5, 4.0), temporalis_mm=u(4, 9),
        skull_mm=u(5.0, 8.0), table_mm=u(1.3, 2.0),
        csf_gap_mm=1.0 + 2.0 * atrophy + u(0, 0.5), sulcus_half_mm=0.5 + 1.2 * atrophy,
        sulcus_depth_mm=u(12, 18), cortex_mm=u(2.5, 3.5),
        base_z=u(-40, -32), vent_z=u(4, 12), vent_scale=0.8 + 0.7 * atrophy + u(-0.1, 0.1),
        fissure_half_mm=1.0 + 1.5 * atrophy, falx_mm=u(1.0, 2.0), hu=hu,
        choroid_calc=(bool(u() < 0.65), bool(u() < 0.65)), pineal_calc=bool(u() < 0.6),
        beam_hardening=u(2, 5),
        sulci=Texture(rng, n=32, period_mm=128, wavelength_mm=u(20, 26), rel_bandwidth=0.25),
        coarse=Texture(rng, n=24, period_mm=120, wavelength_mm=30, rel_bandwidth=0.8),
        fine=Texture(rng, n=32, period_mm=40, wavelength_mm=4.0, rel_bandwidth=0.7),
        folia=Texture(rng, n=32, period_mm=48, wavelength_mm=5.0, rel_bandwidth=0.2),
    )


@dataclass
class Scene:
    """Per-point arrays produced by rendering: what lesions need to place themselves."""

    p: np.ndarray  # world RAS (N, 3)
    q: np.ndarray  # head frame (N, 3)
    tissue: np.ndarray  # uint8 codes from TISSUES
    hu: np.ndarray  # float32
    depth_in: np.ndarray  # mm below the inner table (negative outside the skull interior)
    cavity: np.ndarray  # bool: intracranial
    shifted_x: np.ndarray  # head-frame x after midline shift (midline structures use it)


def _ellipsoid(x, y, z, centre, semi, yaw_deg=0.0):
    dx, dy, dz = x - F32(centre[0]), y - F32(centre[1]), z - F32(centre[2])
    if yaw_deg:
        c, s = F32(np.cos(np.deg2rad(yaw_deg))), F32(np.sin(np.deg2rad(yaw_deg)))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / F32(semi[0])) ** 2 + (dy / F32(semi[1])) ** 2 + (dz / F32(semi[2])) ** 2 < 1


def _smoothstep(x, x0, width):
    """0 below x0 - width/2, 1 above x0 + width/2, smooth in between."""
    t = np.clip((x - x0) / width + 0.5, 0, 1)
    return t * t * (3 - 2 * t)


def outer_radius(anat: Anatomy, ux, uy, uz):
    """Scalp surface distance from the origin along unit direction u."""
    c = np.where(uz > 0, F32(anat.c_up), F32(anat.c_down))
    r = 1.0 / np.sqrt((ux / F32(anat.a)) ** 2 + (uy / F32(anat.b)) ** 2 + (uz / c) ** 2)
    powers = {}

    def pw(u, name, e):  # cached small integer powers of the direction cosines
        if e == 0:
            return F32(1)
        key = (name, e)
        if key not in powers:
            powers[key] = u if e == 1 else u * pw(u, name, e - 1)
        return powers[key]

    bump = F32(1)
    for coef, ex, ey, ez in anat.shape_terms:
        bump = bump + F32(coef) * pw(ux, "x", ex) * pw(uy, "y", ey) * pw(uz, "z", ez)
    return r * bump


def temporal_weight(ux, uy, uz):
    """Where the temporalis muscle sits and the squamous temporal bone thins (0..1)."""
    return _smoothstep(np.abs(ux), 0.72, 0.2) * _smoothstep(uy, -0.35, 0.3) * (1 - _smoothstep(uz, 0.35, 0.3)) * _smoothstep(uz, -0.55, 0.3)


def petrous_line(x):
    """Antero-posterior position of the petrous ridge: runs from medial-anterior to lateral-posterior."""
    return F32(-6) - F32(0.7) * np.maximum(np.abs(x) - 14, 0)


def posterior_fossa_weight(x, y):
    """1 behind the petrous ridges / clivus (posterior fossa), 0 in front."""
    return 1 - _smoothstep(y - petrous_line(x), 0, 6)


def floor_z(anat: Anatomy, x, y):
    """Skull-base floor: orbital roofs high, temporal fossae low, sella/petrous ridges raised, posterior fossa lowest."""
    base = F32(anat.base_z)
    ant = _smoothstep(y, 26, 12)  # anterior cranial fossa over the orbits
    post = posterior_fossa_weight(x, y)
    central = 1 - _smoothstep(np.abs(x), 15, 8)  # sphenoid body / sella in the midline
    ridge = np.exp(-(((y - petrous_line(x)) / 4) ** 2)) * _smoothstep(np.abs(x), 16, 6)
    mid = (1 - ant) * (1 - post)
    return base + ant * 22 + mid * central * 12 + post * (-32) + ridge * 14


def tentorium_z(anat: Anatomy, x, y):
    """Tentorium cerebelli: high at the incisura, sloping down to the occipital inner table."""
    return F32(anat.base_z + 24) + F32(0.22) * (y + 8) - F32(0.12) * np.abs(x)


def midline_shift(anat: Anatomy, q):
    amp, y0, z0, sy, sz = anat.shift
    if amp == 0:
        return q[:, 0]
    w = np.exp(-(((q[:, 1] - y0) / sy) ** 2) - ((q[:, 2] - z0) / sz) ** 2)
    return q[:, 0] - F32(amp) * w


def ventricle_parts(anat: Anatomy):
    """Lateral, third and fourth ventricles as (centre, semi-axes, yaw) ellipsoids, head frame."""
    v, zv, b = anat.vent_scale, anat.vent_z, anat.base_z
    parts = []
    for s in (-1, 1):
        parts += [
            ((s * 6.5 * v, 20, zv + 4), (4.2 * v, 13, 8), s * -14),  # frontal horn
            ((s * 10 * v, -4, zv + 9), (4.5 * v, 20, 5.5), s * 6),  # body
            ((s * 16 * v, -26, zv + 2), (6.5 * v, 9, 9), 0),  # atrium (trigone)
            ((s * 15 * v, -38, zv - 1), (3.8 * v, 11, 5), s * -15),  # occipital horn
            ((s * 27, 2, zv - 27), (2.8 * v, 13, 3.5), s * 12),  # temporal horn
        ]
    parts.append(((0, -4, zv - 10), (1.8 * v, 13, 9), 0))  # third ventricle
    parts.append(((0, -28, b + 2), (5.0, 3.5, 7), 0))  # fourth ventricle
    return parts


def deep_grey_parts(anat: Anatomy):
    v, zv = anat.vent_scale, anat.vent_z
    parts = []
    for s in (-1, 1):
        parts += [
            ((s * (6.5 * v + 6), 14, zv + 2), (4.5, 8, 9), 0),  # caudate head
            ((s * 22, 3, zv - 9), (6, 13, 9), s * -10),  # lentiform nucleus
            ((s * 10, -13, zv - 9), (8, 11, 9), 0),  # thalamus
        ]
    return parts


def render_anatomy(anat: Anatomy, p_world: np.ndarray, voxel_mm: float) -> Scene:
    """Tissue code and HU (before scanner blur/noise) at world points ``p_world`` (N, 3)."""
    q = anat.to_head(p_world)
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    n = len(q)
    hu = np.full(n, F32(anat.hu["air"]), F32)
    tissue = np.zeros(n, np.uint8)
    depth_in = np.full(n, F32(-1e3), F32)
    cavity = np.zeros(n, bool)
    xs = midline_shift(anat, q)
    scene = Scene(p=p_world, q=q, tissue=tissue, hu=hu, depth_in=depth_in, cavity=cavity, shifted_x=xs)

    _draw_head_holder(anat, scene)
    rho = np.sqrt(x * x + y * y + z * z) + F32(1e-3)
    # only points that can be inside the scalp need the direction-dependent surface
    c = np.where(z > 0, F32(1.2 * anat.c_up), F32(1.2 * anat.c_down))
    near = np.flatnonzero((x / F32(1.2 * anat.a)) ** 2 + (y / F32(1.2 * anat.b)) ** 2 + (z / c) ** 2 < 1)
    rn = rho[near]
    ux, uy, uz = x[near] / rn, y[near] / rn, z[near] / rn
    d_out = outer_radius(anat, ux, uy, uz) - rn
    inside = d_out >= 0
    head = near[inside]
    if len(head) == 0:
        return scene
    ux, uy, uz, d_out = ux[inside], uy[inside], uz[inside], d_out[inside]
    sub = _HeadPoints(q[head], xs[head], d_out, ux, uy, uz)
    t_sub, hu_sub, din_sub = _draw_layers(anat, sub)
    cav = _draw_cavity(anat, sub, t_sub, hu_sub, din_sub, voxel_mm)
    _draw_skull_base(anat, sub, t_sub, hu_sub, din_sub, cav)
    _draw_orbits(anat, sub, t_sub, hu_sub, cav)
    tissue[head], hu[head], depth_in[head], cavity[head] = t_sub, hu_sub, din_sub, cav
    return scene


@dataclass
class _HeadPoints:
    q: np.ndarray
    xs: np.ndarray
    d_out: np.ndarray
    ux: np.ndarray
    uy: np.ndarray
    uz: np.ndarray

    @property
    def x(self):
        return self.q[:, 0]

    @property
    def y(self):
        return self.q[:, 1]

    @property
    def z(self):
        return self.q[:, 2]


def _draw_head_holder(anat, scene):
    """Curved plastic head rest behind the occiput (world frame: it does not rotate with the head)."""
    dx, dy, dz = (scene.p[:, a] - F32(anat.centre[a]) for a in range(3))
    ex, ey = dx / F32(anat.a + 16), dy / F32(anat.b + 12)
    radius = F32((anat.a + anat.b) / 2 + 14)
    r = np.sqrt(ex * ex + ey * ey) * radius
    shell = (np.abs(r - radius) < 1.5) & (dy < -0.55 * anat.b) & (dz < 0.5 * anat.c_up)
    scene.tissue[shell] = T["holder"]
    scene.hu[shell] = anat.hu["holder"]


def _draw_layers(anat, s: _HeadPoints):
    """Scalp (skin, fat, temporalis), skull tables and diploe; returns depth below inner table."""
    h = anat.hu
    n = len(s.q)
    tissue = np.full(n, T["muscle"], np.uint8)  # galea / muscle by default
    hu = np.full(n, F32(h["muscle"]), F32)
    tw = temporal_weight(s.ux, s.uy, s.uz)
    scalp = F32(anat.skin_mm + anat.fat_mm + 1.0) + F32(anat.temporalis_mm) * tw
    skull = F32(anat.skull_mm) * (1 + F32(0.25) * s.uy**2 - F32(0.5) * tw) + F32(0.5) * anat.coarse(s.q * F32(2))
    sinus_w = frontal_sinus_weight(anat, s)
    skull = np.maximum(skull, F32(2.5)) + F32(9) * sinus_w  # the frontal bone bulges around its sinus
    d = s.d_out
    skin = d < anat.skin_mm
    fat = ~skin & (d < anat.skin_mm + anat.fat_mm)
    tissue[skin], hu[skin] = T["skin"], h["skin"]
    tissue[fat], hu[fat] = T["fat"], h["fat"]
    bone = (d >= scalp) & (d < scalp + skull)
    bd = d[bone] - scalp[bone]  # depth into bone
    tex = anat.fine(s.q[bone])
    table = F32(anat.table_mm)
    cortical = (bd < table) | (bd > skull[bone] - table)
    bone_hu = np.where(cortical, F32(h["cortical_bone"]) + 110 * tex, F32(h["diploe"]) + 200 * tex)
    tissue[bone] = np.where(cortical, T["cortical_bone"], T["diploe"])
    hu[bone] = bone_hu
    sinus = bone & ~cortical_full(bd, skull, bone, table) & (sinus_w > 0.35)
    tissue[sinus], hu[sinus] = T["sinus_air"], h["sinus_air"]
    depth_in = d - scalp - skull
    return tissue, hu, depth_in


def frontal_sinus_weight(anat, s):
    """0..1: where the frontal sinus sits in the frontal bone above the orbits."""
    r2 = (s.x / F32(16)) ** 2 + ((s.z - F32(anat.base_z + 32)) / F32(11)) ** 2
    return np.clip(1 - r2, 0, 1) * _smoothstep(s.uy, 0.85, 0.1)


def cortical_full(bd, skull, bone, table):
    """Outer/inner table mask over all head points, from depth into bone of the bone points."""
    out = np.zeros(len(bone), bool)
    out[bone] = (bd < table) | (bd > skull[bone] - table)
    return out


def _draw_cavity(anat, s: _HeadPoints, tissue, hu, depth_in, voxel_mm):
    """Fill the intracranial cavity; returns the cavity mask of the head points."""
    h = anat.hu
    x, y, z = s.x, s.y, s.z
    cav = (depth_in >= 0) & (z > floor_z(anat, x, y))
    idx = np.flatnonzero(cav)
    if len(idx) == 0:
        return cav
    q = s.q[idx]
    cx, cy, cz = q[:, 0], q[:, 1], q[:, 2]
    cxs = s.xs[idx]
    din = depth_in[idx]
    t = np.full(len(idx), T["white_matter"], np.uint8)
    v = np.full(len(idx), F32(h["white_matter"]), F32)
    infra = (cz < tentorium_z(anat, cx, cy)) & (posterior_fossa_weight(cx, cy) > 0.5)

    # supratentorial cortex: labyrinth of sulci = zero set of band-pass noise
    dist = np.abs(anat.sulci(q)) / F32(anat.sulci.grad_per_mm)
    depth_lim = F32(anat.sulcus_depth_mm) * (F32(0.8) + F32(0.25) * anat.coarse(q))
    grey = (din < anat.csf_gap_mm + anat.cortex_mm) | ((dist < anat.sulcus_half_mm + anat.cortex_mm) & (din < depth_lim + anat.cortex_mm))
    t[grey], v[grey] = T["grey_matter"], h["grey_matter"]
    # CSF fraction within a voxel keeps thin sulci visible at coarse matrices (partial volume)
    half_vox = F32(voxel_mm / 2)
    frac_sulcus = np.clip((F32(anat.sulcus_half_mm) + half_vox - dist) / F32(voxel_mm), 0, 1) * (din < depth_lim)
    frac_gap = np.clip((F32(anat.csf_gap_mm) + half_vox - din) / F32(voxel_mm), 0, 1)
    frac = np.maximum(frac_sulcus, frac_gap)
    v = v * (1 - frac) + F32(h["csf"]) * frac
    t[frac >= 0.5] = T["csf"]
    _draw_sylvian_and_cisterns(anat, cx, cy, cz, t, v)
    _draw_fissure_and_falx(anat, cxs, cy, cz, din, t, v, voxel_mm)
    for centre, semi, yaw in deep_grey_parts(anat):
        m = _ellipsoid(cxs, cy, cz, centre, semi, yaw) & (din > 6)
        t[m], v[m] = T["deep_grey"], h["deep_grey"]
    for centre, semi, yaw in ventricle_parts(anat)[:-1]:
        m = _ellipsoid(cxs, cy, cz, centre, semi, yaw) & (din > 4)
        t[m], v[m] = T["ventricle"], h["csf"]
    _draw_posterior_fossa(anat, q, din, infra, t, v)
    _draw_calcifications(anat, cxs, cy, cz, t, v)
    # gentle cupping from beam hardening: brain next to the skull reads a few HU higher
    v += F32(anat.beam_hardening) * np.exp(-din / F32(6)) * (t != T["csf"])
    brain = np.isin(t, BRAIN_PARENCHYMA)
    v[brain] += F32(1.2) * anat.coarse(q[brain] * F32(3))
    tissue[idx], hu[idx] = t, v
    return cav


def _draw_sylvian_and_cisterns(anat, x, y, z, t, v):
    zb, csf = anat.base_z, anat.hu["csf"]
    ax = np.abs(x)
    ys = 10 - 0.25 * (ax - 30)
    sylvian = (ax > 24) & (np.abs(y - ys) < 1.5 + 0.6 * anat.vent_scale) & (z > zb + 6) & (z < zb + 32)
    insula = (ax > 22) & (ax < 40) & (np.abs(y - ys) < 5) & (z > zb + 6) & (z < zb + 34) & ~sylvian
    t[insula], v[insula] = T["grey_matter"], anat.hu["grey_matter"]
    suprasellar = ((x / 12) ** 2 + ((y - 12) / 9) ** 2 < 1) & (z > zb + 12) & (z < zb + 20)
    ring = (x / 13) ** 2 + ((y + 8) / 12) ** 2
    ambient = (ring > 1) & (ring < 1.4) & (z > zb + 16) & (z < zb + 32)
    midbrain = (ring <= 1) & (z > zb + 16) & (z < zb + 34)
    t[midbrain], v[midbrain] = T["brainstem"], anat.hu["brainstem"]
    for m in (sylvian, suprasellar, ambient):
        t[m], v[m] = T["csf"], csf


def _draw_fissure_and_falx(anat, xs, y, z, din, t, v, voxel_mm):
    """Interhemispheric fissure (CSF) with the falx in it; above the corpus callosum only."""
    zv = anat.vent_z
    above_callosum = (z > zv + 19) | (y > 36) | (y < -44)
    fissure = (np.abs(xs) < anat.fissure_half_mm + voxel_mm / 2) & above_callosum & (din > 0)
    t[fissure], v[fissure] = T["csf"], anat.hu["csf"]
    # falx thinner than a voxel: keep one voxel but dilute its HU by the covered fraction
    half = max(anat.falx_mm / 2, voxel_mm / 2)
    frac = anat.falx_mm / (2 * half)
    falx = fissure & (np.abs(xs) < half) & ((z > zv + 24) | (y > 40) | (y < -48))
    t[falx] = T["falx"]
    v[falx] = anat.hu["csf"] + frac * (anat.hu["falx"] - anat.hu["csf"])


def _draw_posterior_fossa(anat, q, din, infra, t, v):
    """Cerebellum with folia, brainstem and fourth ventricle below the tentorium."""
    h = anat.hu
    idx = np.flatnonzero(infra)
    if len(idx) == 0:
        return
    x, y, z = q[idx, 0], q[idx, 1], q[idx, 2]
    tt = np.full(len(idx), T["cerebellum"], np.uint8)
    folia = anat.folia(q[idx])
    vv = F32(h["cerebellum"]) + F32(3.0) * folia
    stem = ((x / 11) ** 2 + ((y + 12) / 10) ** 2 < 1)
    tt[stem], vv[stem] = T["brainstem"], h["brainstem"]
    centre, semi, yaw = ventricle_parts(anat)[-1]
    fourth = _ellipsoid(x, y, z, centre, semi, yaw)
    rim = (din[idx] < anat.csf_gap_mm) | ((np.abs(x) < 4) & (y < -50) & (z < anat.base_z - 5)) | ((folia > 1.6) & (din[idx] < 10))
    rim &= ~stem
    tt[rim], vv[rim] = T["csf"], h["csf"]
    tt[fourth], vv[fourth] = T["ventricle"], h["csf"]
    t[idx], v[idx] = tt, vv


def _draw_calcifications(anat, xs, y, z, t, v):
    """Physiological calcifications: choroid plexus in the atria, pineal gland."""
    zv, vs = anat.vent_z, anat.vent_scale
    spots = []
    for side, on in zip((-1, 1), anat.choroid_calc):
        if on:
            spots.append((side * 16 * vs, -26, zv + 1))
    if anat.pineal_calc:
        spots.append((0, -17, zv - 8))
    for c in spots:
        m = _ellipsoid(xs, y, z, c, (2.5, 3.0, 2.5))
        t[m], v[m] = T["calcification"], anat.hu["calcification"]


def _draw_skull_base(anat, s: _HeadPoints, tissue, hu, depth_in, cav):
    """Inside the skull but below the floor: sphenoid/ethmoid sinuses, petrous and mastoid bone."""
    h = anat.hu
    idx = np.flatnonzero((depth_in >= 0) & ~cav)
    if len(idx) == 0:
        return
    q = s.q[idx]
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    zb = anat.base_z
    ax = np.abs(x)
    tex = anat.fine(q)
    v = F32(h["skull_base"]) + F32(350) * tex
    t = np.where(v > 1200, T["cortical_bone"], T["diploe"]).astype(np.uint8)
    petrous = (ax > 14) & (ax < 46) & (np.abs(y - petrous_line(x)) < 9) & (z > zb - 28)
    v[petrous] = F32(h["cortical_bone"]) + 150 * tex[petrous]
    t[petrous] = T["cortical_bone"]
    sphenoid = (x / 13) ** 2 + ((y - 15) / 12) ** 2 + ((z - zb + 8) / 13) ** 2 < 1
    ethmoid = ((x / 11) ** 2 + ((y - 45) / 20) ** 2 + ((z - zb - 5) / 15) ** 2 < 1) & (tex > -0.6)
    mastoid = (ax > 38) & (y < -10) & (z > zb - 32) & (z < zb - 2) & (tex > 0.1)
    nasal = ((x / 15) ** 2 + ((y - 45) / 30) ** 2 < 1) & (z < zb - 10) & (tex > -0.2)
    air = sphenoid | ethmoid | mastoid | nasal
    t[air], v[air] = T["sinus_air"], h["sinus_air"]
    tissue[idx], hu[idx] = t, v


def _draw_orbits(anat, s: _HeadPoints, tissue, hu, cav):
    """Globes and retrobulbar fat with the optic nerve, painted over bone but under the skin."""
    zb = anat.base_z
    z_eye = zb + 8
    for side in (-1, 1):
        xe = side * 31.0
        y_surf = anat.b * np.sqrt(max(1 - (xe / anat.a) ** 2 - (z_eye / anat.c_down) ** 2, 0.05))
        eye = np.array([xe, y_surf - 14, z_eye])
        apex = np.array([side * 12.0, eye[1] - 36, zb + 4])
        rel = s.q - eye.astype(F32)
        in_globe = np.einsum("ij,ij->i", rel, rel) < 12.0**2
        axis = (apex - eye) / np.linalg.norm(apex - eye)
        tpar = rel @ axis.astype(F32) / F32(np.linalg.norm(apex - eye))
        radial = np.linalg.norm(rel - np.outer(tpar * F32(np.linalg.norm(apex - eye)), axis).astype(F32), axis=1)
        cone = (tpar > 0) & (tpar < 1) & (radial < 13 * (1 - tpar) + 3) & ~in_globe
        nerve = cone & (radial < 2.2)
        keep = ~cav & (tissue != T["skin"])
        for m, name in ((cone & ~nerve, "orbital_fat"), (nerve, "muscle"), (in_globe, "globe")):
            m = m & keep
            tissue[m], hu[m] = T[name], anat.hu[name]
