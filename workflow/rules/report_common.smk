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
        rounds = int(config["segmenter"].get("self_training", 0))
        targets += [f"{R}/figures/training_segmenter_r{k}.png" for k in range(rounds)]
        targets.append(f"{R}/figures/training_segmenter.png")
    if upper_bound_active():
        targets.append(f"{R}/figures/training_segmenter_gt.png")
    if has_masks():
        targets += [
            f"{R}/figures/evaluation_dice.png",
            f"{R}/figures/evaluation_volume.png",
        ]
    return targets


def training_title(model):
    """A training figure's title: the network, what it trains on, and its members."""
    if model == "classifier":
        return "ResNet-LSTM slice classifier"
    if model == "segmenter_gt":
        return "U-Net on ground truth (upper bound)"
    target = segmenter_target(model)
    on = (
        "the CAM pseudo-masks"
        if target == "pseudomask"
        else f"the self-training targets {target}"
    )
    name = (
        "U-Net"
        if model == "segmenter"
        else f"U-Net, self-training round {model.removeprefix('segmenter_r')}"
    )
    members = segmenter_members(model)
    return f"{name} on {on}" + (
        f" ({members} seeds, one after the other)" if members > 1 else ""
    )


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
