# Pseudo-masks: CAM regions refined with brain mask, HU range and intensity clustering.


rule pseudomask_batch:
    input:
        cams=f"{R}/cam/batches/{{batch}}.tsv",
        slices=f"{R}/classifier/batches/{{batch}}.tsv",
    output:
        manifest=f"{R}/pseudomask/batches/{{batch}}.tsv",
    params:
        scans=batch_scans("gpu"),
        results=R,
        pseudomask=config["pseudomask"],
        labelled=has_labels(),
    log:
        f"{LOGS}/pseudomask/{{batch}}.log",
    benchmark:
        f"{BENCH}/pseudomask/{{batch}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    script:
        "../scripts/pseudomask.py"


rule pseudomasks:
    input:
        manifests("pseudomask", "gpu"),
