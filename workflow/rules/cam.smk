# Grad-CAM through the LSTM: where the classifier sees a bleed, per slice, on the NIfTI grid.


rule cam_batch:
    input:
        bundle=CLASSIFIER,
        preprocessed=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/cam/batches/{{batch}}.tsv",
    params:
        scans=batch_scans("gpu"),
        results=R,
        cam=config["cam"],
    log:
        f"{LOGS}/cam/{{batch}}.log",
    benchmark:
        f"{BENCH}/cam/{{batch}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    script:
        "../scripts/cam.py"


rule cams:
    input:
        manifests("cam", "gpu"),
