# Ingestion: cohort (DICOM or NIfTI) -> HU NIfTI, slice labels and masks on one grid.


if demo_active():

    checkpoint demo_cohort:
        output:
            dicom=directory(f"{config['demo']['path']}/dicom"),
            labels=f"{config['demo']['path']}/labels.csv",
            masks=directory(f"{config['demo']['path']}/masks"),
            truth=f"{config['demo']['path']}/truth.tsv",
        log:
            f"{LOGS}/demo_cohort.log",
        benchmark:
            f"{BENCH}/demo_cohort.tsv"
        conda:
            "../../envs/hemocam.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            n_scans=config["demo"]["n_scans"],
            matrix=config["demo"]["matrix"],
            n_slices=config["demo"]["n_slices"],
            quirks=config["demo"]["quirks"],
            seed=config["seed"],
        script:
            "../scripts/demo_cohort.py"


rule ingest_batch:
    input:
        plan=batch_plan,
        labels=label_inputs(),
    output:
        manifest=f"{R}/ingest/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/ingest/{{batch}}.log",
    benchmark:
        f"{BENCH}/ingest/{{batch}}.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=batch_runtime("cpu", "ingest", 60),
    params:
        results=results_dir(2),
    script:
        "../scripts/ingest.py"


rule scans_table:
    input:
        manifests("ingest", "cpu"),
    output:
        report(
            f"{R}/scans.tsv",
            caption="../report/scans.rst",
            category="Cohort",
        ),
    log:
        f"{LOGS}/scans_table.log",
    benchmark:
        f"{BENCH}/scans_table.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        results=results_dir(0),
    script:
        "../scripts/scans_table.py"


rule provenance:
    input:
        # bundles given for inference: their settings are not in the config, so they are recorded
        **{role: path for role, path in config["model"].items() if path},
    output:
        f"{R}/provenance.json",
    log:
        f"{LOGS}/provenance.log",
    benchmark:
        f"{BENCH}/provenance.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        config=public_config(),
    script:
        "../scripts/provenance.py"


rule ingest:
    input:
        f"{R}/scans.tsv",
