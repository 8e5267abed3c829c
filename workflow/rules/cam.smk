# Grad-CAM through the LSTM: where the classifier sees a bleed, per slice, on the NIfTI grid.


rule cam_batch:
    input:
        bundle=CLASSIFIER,
        preprocessed=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/cam/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/cam/{{batch}}.log",
    benchmark:
        f"{BENCH}/cam/{{batch}}.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=batch_runtime("gpu", "cam", 120),
    params:
        scans=batch_scans("gpu"),
        results=results_dir(2),
        cam=config["cam"],
    script:
        "../scripts/cam.py"


rule cams:
    input:
        manifests("cam", "gpu"),
