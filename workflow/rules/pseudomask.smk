# Pseudo-masks: CAM regions refined with brain mask, HU range and intensity clustering.


rule pseudomask_batch:
    input:
        cams=f"{R}/cam/batches/{{batch}}.tsv",
        slices=upstream("classifier", "classify"),
        # params read the scan plan: a cluster job must see the demo checkpoint as an input
        plan=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/pseudomask/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/pseudomask/{{batch}}.log",
    benchmark:
        f"{BENCH}/pseudomask/{{batch}}.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=batch_runtime("gpu", "pseudomask", 60),
    params:
        scans=batch_scans("gpu"),
        results=results_dir(2),
        pseudomask=config["pseudomask"],
        labelled=has_labels(),
    script:
        "../scripts/pseudomask.py"


rule pseudomasks:
    input:
        manifests("pseudomask", "gpu"),
