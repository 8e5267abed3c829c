# Evaluation against ground-truth masks: CAM, pseudo-mask, self-training targets, segmenter, HU
# baseline, upper bound.


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
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        results=results_dir(1),
        config={"evaluate": config["evaluate"]},
        self_training_target=evaluated_self_training_target(),
    script:
        "../scripts/evaluate.py"
