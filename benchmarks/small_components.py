"""What the smallest-component rule removes: the HU baseline (``evaluate.hu_baseline_min`` ..
``hu_baseline_max`` inside the brain mask) under the old rule (20 voxels, whatever their size) and
under ``evaluate.min_component_ml``. The measurement behind the ``min_component_ml`` keys (README,
"The smallest component, in millilitres").

    python benchmarks/small_components.py RESULTS

RESULTS is a workflow's results folder with `nifti/` and `brainmask/` (run the `preprocess`
target on a cohort, e.g. `../shared/data/realct` with `input.format: dicom`).
"""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hemocam.evaluate import DEFAULTS  # noqa: E402
from hemocam.io import load_nifti, voxel_spacing  # noqa: E402
from hemocam.metrics import remove_small_components  # noqa: E402
from hemocam.pseudomask import DEFAULTS as PM, bone_margin  # noqa: E402

R = Path(sys.argv[1])
LO, HI, MIN_ML = float(DEFAULTS["hu_baseline_min"]), float(DEFAULTS["hu_baseline_max"]), float(DEFAULTS["min_component_ml"])
for path in sorted((R / "brainmask").glob("*.nii.gz")):
    sid = path.name[: -len(".nii.gz")]
    hu, affine = load_nifti(R / "nifti" / f"{sid}.nii.gz")
    brain = load_nifti(path)[0] > 0
    spacing = voxel_spacing(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # noise: the SD of neighbouring voxels' difference / sqrt(2), differences of tissue only
    d = np.diff(hu.astype(np.float32), axis=0)[brain[1:] & brain[:-1]]
    noise = float(np.std(d[np.abs(d) < 100]) / np.sqrt(2))
    hyper = brain & (hu >= LO) & (hu <= HI)
    print(f"{sid}: {' x '.join(f'{s:.3f}' for s in spacing)} mm voxels ({voxel_ml * 1000:.3f} mm3), brain mask "
          f"{brain.sum() * voxel_ml:.0f} mL, noise about {noise:.1f} HU")
    print(f"  HU {LO:.0f}-{HI:.0f} inside the brain mask: {ndimage.label(hyper)[1]} components, {hyper.sum() * voxel_ml:.1f} mL")
    for name, ml in (("20 voxels", 20 * voxel_ml), (f"{MIN_ML} mL", MIN_ML)):
        kept = remove_small_components(hyper, ml, spacing)
        print(f"  components of at least {name} ({ml:.3f} mL, {ml / voxel_ml:.0f} voxels): "
              f"{ndimage.label(kept)[1]} left, {kept.sum() * voxel_ml:.1f} mL")
    near = bone_margin(hu, PM["bone_hu"], 3.0, spacing[:2])
    kept = remove_small_components(hyper, MIN_ML, spacing)
    print(f"  of what {MIN_ML} mL leaves, {(kept & near).sum() * voxel_ml:.1f} mL lie within 3 mm of bone (in-plane)")
