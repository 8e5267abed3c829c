# The U-Net segmenter: trained on pseudo-masks (and, as an upper bound, on ground truth),
# then applied to every scan.

SEGMENTER_TARGETS = {"segmenter": "pseudomask", "segmenter_gt": "groundtruth"}


def segmenter_training_inputs(wildcards):
    inputs = {
        "scans": f"{R}/scans.tsv",
        "preprocessed": manifests("preprocess", "cpu")(),
    }
    if wildcards.model == "segmenter":
        inputs["pseudomasks"] = manifests("pseudomask", "gpu")()
    return inputs


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
    wildcard_constraints:
        model="segmenter|segmenter_gt",
    params:
        results=R,
        target=lambda wildcards: SEGMENTER_TARGETS[wildcards.model],
        config=lambda wildcards: {
            k: config[k] for k in ("seed", "preprocess", "segmenter")
        },
    log:
        f"{LOGS}/train_{{model}}.log",
    benchmark:
        f"{BENCH}/train_{{model}}.tsv"
    threads: 8
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=720,
    script:
        "../scripts/train_segmenter.py"


def segmentation_bundle(wildcards):
    if wildcards.seg == "segmentation":
        return SEGMENTER
    return f"{R}/segmenter_gt/model.pt"


rule segment_batch:
    input:
        bundle=segmentation_bundle,
        preprocessed=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/{{seg}}/batches/{{batch}}.tsv",
    wildcard_constraints:
        seg="segmentation|segmentation_gt",
    params:
        scans=batch_scans("gpu"),
        results=R,
    log:
        f"{LOGS}/{{seg}}/{{batch}}.log",
    benchmark:
        f"{BENCH}/{{seg}}/{{batch}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/segment.py"


rule segment:
    input:
        manifests("segmentation", "gpu"),
