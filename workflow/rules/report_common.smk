# Planning for workflow/rules/report.smk: which report outputs a run has, and their inputs.


def report_targets(wildcards=None):
    """Everything of this file that `all` should build, for the outputs the run produces."""
    targets = [f"{R}/figures/cohort.png", f"{R}/figures/provenance.html"]
    if not any_ok_scans():
        return targets
    targets += [f"{R}/volumes.tsv", f"{R}/figures/gallery"]
    if trains_classifier() and has_labels():
        targets.append(f"{R}/figures/training_classifier.png")
    if trains_segmenter():
        targets.append(f"{R}/figures/training_segmenter.png")
    if upper_bound_active():
        targets.append(f"{R}/figures/training_segmenter_gt.png")
    if has_masks():
        targets += [
            f"{R}/figures/evaluation_dice.png",
            f"{R}/figures/evaluation_volume.png",
        ]
    return targets


def scan_figure_inputs(wildcards):
    """The batch's outputs a figure draws: segmentation, CAM and (when trained) pseudo-masks."""
    inputs = {
        "segmentation": f"{R}/segmentation/batches/{wildcards.batch}.tsv",
        "cams": f"{R}/cam/batches/{wildcards.batch}.tsv",
        # params read the scan plan: a cluster job must see the demo checkpoint as an input
        "plan": upstream("preprocess", "cpu")(wildcards),
    }
    if trains_segmenter():
        inputs["pseudomasks"] = f"{R}/pseudomask/batches/{wildcards.batch}.tsv"
    return inputs
