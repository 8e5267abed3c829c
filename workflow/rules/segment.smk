# The U-Net segmenter: trained on pseudo-masks (and, as an upper bound, on ground truth),
# then applied to every scan.


rule train_segmenter:
    input:
        unpack(segmenter_training_inputs),
    output:
        bundle=f"{R}/{{model}}/model.pt",
        history=report(
            f"{R}/{{model}}/history.tsv",
            caption="../report/segmenter_history.rst",
            category="Segmenter",
        ),
    log:
        f"{LOGS}/train_{{model}}.log",
    benchmark:
        f"{BENCH}/train_{{model}}.tsv"
    wildcard_constraints:
        model="segmenter|segmenter_gt|segmenter_r[0-9]+",
    conda:
        "../../envs/hemocam.yaml"
    threads: 8
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=lambda wildcards: 720 * segmenter_members(wildcards.model),
    params:
        results=results_dir(1),
        target=lambda wildcards: segmenter_target(wildcards.model),
        members=lambda wildcards: segmenter_members(wildcards.model),
        # the output settings are the segment rule's, execution keys the script reads from the
        # config: changing them retrains nothing
        config=lambda wildcards: {
            "seed": config["seed"],
            "preprocess": config["preprocess"],
            "segmenter": segmenter_training(config["segmenter"]),
        },
    script:
        "../scripts/train_segmenter.py"


rule self_training_batch:
    input:
        unpack(self_training_inputs),
    output:
        manifest=f"{R}/pseudomask_r{{round}}/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/pseudomask_r{{round}}/{{batch}}.log",
    benchmark:
        f"{BENCH}/pseudomask_r{{round}}/{{batch}}.tsv"
    wildcard_constraints:
        round="[1-9][0-9]*",
    conda:
        "../../envs/hemocam.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=batch_runtime("gpu", "segment", 120),
    params:
        scans=batch_scans("gpu"),
        results=results_dir(2),
        # the segmenter's output settings shape the masks that become the next round's targets
        output=segmenter_output(config["segmenter"]),
        labelled=has_labels(),
        prob_threshold=config["pseudomask"]["prob_threshold"],
    script:
        "../scripts/self_training.py"


rule segment_batch:
    input:
        bundle=segmentation_bundle,
        preprocessed=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/{{seg}}/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/{{seg}}/{{batch}}.log",
    benchmark:
        f"{BENCH}/{{seg}}/{{batch}}.tsv"
    wildcard_constraints:
        seg="segmentation|segmentation_gt",
    conda:
        "../../envs/hemocam.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=batch_runtime("gpu", "segment", 120),
    params:
        scans=batch_scans("gpu"),
        results=results_dir(2),
        output=segmenter_output(config["segmenter"]),
    script:
        "../scripts/segment.py"


rule segment:
    input:
        manifests("segmentation", "gpu"),
