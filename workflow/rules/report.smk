# What users see: hemorrhage volumes, per-scan overlay figures, training and evaluation plots,
# the cohort and the run's provenance, all flagged for `snakemake --report report.html`.


report: "../report/workflow.rst"


include: "report_common.smk"


rule volumes:
    input:
        scans=f"{R}/scans.tsv",
        segmentation=manifests("segmentation", "gpu"),
        slices=manifests("classifier", "classify"),
    output:
        report(
            f"{R}/volumes.tsv",
            caption="../report/volumes.rst",
            category="Volumes",
        ),
    log:
        f"{LOGS}/volumes.log",
    benchmark:
        f"{BENCH}/volumes.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        results=results_dir(0),
    script:
        "../scripts/volumes.py"


rule figures_scans:
    input:
        unpack(scan_figure_inputs),
    output:
        manifest=f"{R}/figures/batches/{{batch}}.tsv",
        figures=directory(f"{R}/figures/scans/{{batch}}"),
    log:
        f"{LOGS}/figures/{{batch}}.log",
    benchmark:
        f"{BENCH}/figures/{{batch}}.tsv"
    wildcard_constraints:
        batch=r"g\d{4}",
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=batch_runtime("gpu", "figures", 120),
    params:
        scans=batch_scans("gpu"),
        results=results_dir(2),
        n_slices=4,
    script:
        "../scripts/figures_scans.py"


rule figures_gallery:
    input:
        manifests("figures", "gpu"),
    output:
        report(
            directory(f"{R}/figures/gallery"),
            patterns=["{scan_id}.png"],
            caption="../report/figure_scan.rst",
            category="Scans",
            labels={"scan": "{scan_id}"},
        ),
    log:
        f"{LOGS}/figures_gallery.log",
    benchmark:
        f"{BENCH}/figures_gallery.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        max_scans=config.get("report", {}).get("max_scans", 60),
    script:
        "../scripts/figures_gallery.py"


rule figure_training:
    input:
        f"{R}/{{model}}/history.tsv",
    output:
        report(
            f"{R}/figures/training_{{model}}.png",
            caption="../report/figure_training.rst",
            category="Training",
            labels={"model": "{model}"},
        ),
    log:
        f"{LOGS}/figure_training_{{model}}.log",
    benchmark:
        f"{BENCH}/figure_training_{{model}}.tsv"
    wildcard_constraints:
        model="classifier|segmenter|segmenter_gt|segmenter_r[0-9]+",
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        title=lambda wildcards: training_title(wildcards.model),
    script:
        "../scripts/figures_training.py"


rule figure_evaluation:
    input:
        f"{R}/metrics/segmentation.tsv",
    output:
        dice=report(
            f"{R}/figures/evaluation_dice.png",
            caption="../report/figure_dice.rst",
            category="Evaluation",
        ),
        volume=report(
            f"{R}/figures/evaluation_volume.png",
            caption="../report/figure_volume.rst",
            category="Evaluation",
        ),
    log:
        f"{LOGS}/figure_evaluation.log",
    benchmark:
        f"{BENCH}/figure_evaluation.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/figures_evaluation.py"


rule figure_cohort:
    input:
        f"{R}/scans.tsv",
    output:
        report(
            f"{R}/figures/cohort.png",
            caption="../report/figure_cohort.rst",
            category="Cohort",
        ),
    log:
        f"{LOGS}/figure_cohort.log",
    benchmark:
        f"{BENCH}/figure_cohort.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/figures_cohort.py"


rule provenance_page:
    input:
        f"{R}/provenance.json",
    output:
        report(
            f"{R}/figures/provenance.html",
            caption="../report/provenance.rst",
            category="Provenance",
        ),
    log:
        f"{LOGS}/provenance_page.log",
    benchmark:
        f"{BENCH}/provenance_page.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../scripts/figures_provenance.py"


rule figures:
    input:
        report_targets,
