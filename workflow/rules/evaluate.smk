# Evaluation against ground-truth masks: CAM, pseudo-mask, segmenter, HU baseline, upper bound.


def evaluation_inputs(wildcards):
    inputs = {
        "scans": f"{R}/scans.tsv",
        "cams": manifests("cam", "gpu")(),
        "segmentation": manifests("segmentation", "gpu")(),
    }
    if trains_segmenter():
        inputs["pseudomasks"] = manifests("pseudomask", "gpu")()
    if upper_bound_active():
        inputs["upper_bound"] = manifests("segmentation_gt", "gpu")()
    return inputs


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        table=report(
            f"{R}/metrics/segmentation.tsv",
            caption="../report/segmentation_metrics.rst",
            category="Evaluation",
        ),
        summary=report(
            f"{R}/metrics/summary.tsv",
            caption="../report/segmentation_summary.rst",
            category="Evaluation",
        ),
    params:
        results=R,
        config=config,
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    script:
        "../scripts/evaluate.py"
