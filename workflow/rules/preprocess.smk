# Brain-window preprocessing: brain mask, multi-window channels and the training cache.


rule preprocess_batch:
    input:
        upstream("ingest", "cpu"),
    output:
        manifest=f"{R}/preprocess/batches/{{batch}}.tsv",
    params:
        scans=batch_scans("cpu"),
        results=R,
        windows=config["preprocess"]["windows"],
        size=config["preprocess"]["size"],
    log:
        f"{LOGS}/preprocess/{{batch}}.log",
    benchmark:
        f"{BENCH}/preprocess/{{batch}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    script:
        "../scripts/preprocess.py"


rule preprocess:
    input:
        manifests("preprocess", "cpu"),
