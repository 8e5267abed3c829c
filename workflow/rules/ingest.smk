# Ingestion: cohort (DICOM or NIfTI) -> HU NIfTI, slice labels and masks on one grid.


if demo_active():

    checkpoint demo_cohort:
        output:
            dicom=directory(f"{config['demo']['path']}/dicom"),
            labels=f"{config['demo']['path']}/labels.csv",
            masks=directory(f"{config['demo']['path']}/masks"),
            truth=f"{config['demo']['path']}/truth.tsv",
        params:
            n_scans=config["demo"]["n_scans"],
            matrix=config["demo"]["matrix"],
            n_slices=config["demo"]["n_slices"],
            quirks=config["demo"]["quirks"],
            seed=config["seed"],
        log:
            f"{LOGS}/demo_cohort.log",
        benchmark:
            f"{BENCH}/demo_cohort.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        script:
            "../scripts/demo_cohort.py"


rule ingest_batch:
    input:
        plan=f"{R}/ingest/plan/{{batch}}.tsv",
        labels=label_inputs(),
    output:
        manifest=f"{R}/ingest/batches/{{batch}}.tsv",
    params:
        results=R,
    log:
        f"{LOGS}/ingest/{{batch}}.log",
    benchmark:
        f"{BENCH}/ingest/{{batch}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
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
    params:
        results=R,
    log:
        f"{LOGS}/scans_table.log",
    benchmark:
        f"{BENCH}/scans_table.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/scans_table.py"


rule provenance:
    output:
        f"{R}/provenance.json",
    params:
        config=config,
    log:
        f"{LOGS}/provenance.log",
    benchmark:
        f"{BENCH}/provenance.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/provenance.py"


rule ingest:
    input:
        f"{R}/scans.tsv",
