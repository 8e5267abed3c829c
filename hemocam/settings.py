"""Which settings shape trained weights and which only what is written from them.

Read by the workflow while it parses (no torch here): a setting that only shapes the output of a
trained model must not retrain it, neither through Snakemake's rule params nor through the
training's checkpoint key (:func:`hemocam.train.run_key`).
"""

from __future__ import annotations

# applied to the segmenter's probabilities when a scan is segmented: the segment rule's params
SEGMENTER_OUTPUT_KEYS = ("min_component_voxels", "hu_min", "hu_max", "tta_flip", "infer_batch")
# ``threshold`` is not one of them: validation Dice, and so the kept epoch, depend on it

# the classifier's test-time flip shapes its test metrics and slice probabilities, not its weights
CLASSIFIER_EVALUATION_KEYS = ("tta",)


def segmenter_training(cfg_seg: dict) -> dict:
    """The ``segmenter`` section without the keys that only shape its output."""
    return {k: v for k, v in (cfg_seg or {}).items() if k not in SEGMENTER_OUTPUT_KEYS}


def segmenter_output(cfg_seg: dict) -> dict:
    """The ``segmenter`` keys that only shape its output (those the section sets)."""
    return {k: v for k, v in (cfg_seg or {}).items() if k in SEGMENTER_OUTPUT_KEYS}
