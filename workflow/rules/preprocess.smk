# Brain-window preprocessing: brain mask, multi-window channels and the training cache.


rule preprocess_batch:
    input:
        upstream("ingest", "cpu"),
    output:
        manifest=f"{R}/preprocess/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/preprocess/{{batch}}.log",
    benchmark:
        f"{BENCH}/preprocess/{{batch}}.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=batch_runtime("cpu", "preprocess", 60),
    params:
        scans=batch_scans("cpu"),
        results=results_dir(2),
        windows=config["preprocess"]["windows"],
        size=config["preprocess"]["size"],
    script:
        "../scripts/preprocess.py"


rule preprocess:
    input:
        manifests("preprocess", "cpu"),
