"""Which settings shape trained weights and which only what is written from them.

Read by the workflow while it parses (no torch here): a setting that only shapes the output of a
trained model must not retrain it, neither through Snakemake's rule params nor through the
training's checkpoint key (:func:`hemocam.train.run_key`).
"""

from __future__ import annotations

import re

# applied to the segmenter's probabilities when a scan is segmented: the segment rule's params
SEGMENTER_OUTPUT_KEYS = ("min_component_ml", "hu_min", "hu_max", "tta_flip", "infer_batch")
# ``threshold`` is not one of them: validation Dice, and so the kept epoch, depend on it

# the classifier's test-time flip shapes its test metrics and slice probabilities, not its weights
CLASSIFIER_EVALUATION_KEYS = ("tta",)

# how a training runs, not what it computes: out of the segmenter's rule params (the classifier's
# rule keeps its whole section: dropping keys from it would rerun every finished classifier, and
# all that follows, once on upgrade)
EXECUTION_KEYS = ("num_workers",)

# whether the upper-bound segmenter is trained at all, how many self-training rounds precede the
# final one and how many U-Nets each round averages: no setting of any one model (a round's
# target and member count are its rule's own params; a member is its seed)
SEGMENTER_WORKFLOW_KEYS = ("upper_bound", "self_training", "self_training_ensemble")


# keys replaced by physical units (2026-11-30): a config that still set them would be ignored.
# (section, old key) -> (new key, what changed)
RENAMED = {
    ("pseudomask", "bone_margin"): ("bone_margin_mm", "voxels -> millimetres; 2.0 is one voxel of the demo's 1.7-1.95 mm pixels"),
    ("pseudomask", "bone_regrow"): ("bone_regrow_mm", "voxels -> millimetres; 2.0 is one voxel of the demo's 1.7-1.95 mm pixels"),
    **{(section, "min_component_voxels"): ("min_component_ml", "voxels -> millilitres; 0.35 is about 20 voxels of the demo's "
                                                               "14.8-19 mm3 voxels")
       for section in ("pseudomask", "segmenter", "evaluate")},
}


def check_renamed(config: dict | None) -> None:
    """Refuse a key that a physical-unit one replaced, naming the new key (ValueError)."""
    for (section, old), (new, why) in RENAMED.items():
        if old in ((config or {}).get(section) or {}):
            raise ValueError(f"{section}.{old} is now {section}.{new} ({why}): rename it in your config")


# the names self_training_target gives rounds k >= 1
SELF_TRAINING_TARGET = re.compile(r"pseudomask_r[1-9][0-9]*")


def self_training_target(round_: int) -> str:
    """What self-training round ``round_`` trains on: 0, the CAM pseudo-masks; k, the masks of
    round k - 1's segmenter on the pseudo-masks' slices (``results/pseudomask_r{k}``)."""
    return "pseudomask" if int(round_) == 0 else f"pseudomask_r{int(round_)}"


def segmenter_training(cfg_seg: dict) -> dict:
    """The ``segmenter`` section without the keys that do not shape its training."""
    leave = (*SEGMENTER_OUTPUT_KEYS, *EXECUTION_KEYS, *SEGMENTER_WORKFLOW_KEYS)
    return {k: v for k, v in (cfg_seg or {}).items() if k not in leave}


def with_whole_section(cfg: dict, full_config: dict, section: str) -> dict:
    """``cfg`` (a training's params) with the keys of ``section`` its params leave out, from the
    whole config: the script runs with every setting, the rule reruns only for those it lists."""
    return {**cfg, section: {**full_config.get(section, {}), **cfg.get(section, {})}}


def segmenter_output(cfg_seg: dict) -> dict:
    """The ``segmenter`` keys that only shape its output (those the section sets)."""
    return {k: v for k, v in (cfg_seg or {}).items() if k in SEGMENTER_OUTPUT_KEYS}
