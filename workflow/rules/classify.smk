# The ResNet-LSTM slice classifier: training (one GPU job) and slice probabilities per scan.


if trains_classifier():

    rule train_classifier:
        input:
            scans=labelled_scans_table,
            preprocessed=manifests("preprocess", "cpu"),
        output:
            bundle=f"{R}/classifier/model.pt",
            history=report(
                f"{R}/classifier/history.tsv",
                caption="../report/classifier_history.rst",
                category="Classifier",
            ),
            metrics=report(
                f"{R}/classifier/metrics.tsv",
                caption="../report/classifier_metrics.rst",
                category="Classifier",
            ),
        log:
            f"{LOGS}/train_classifier.log",
        benchmark:
            f"{BENCH}/train_classifier.tsv"
        conda:
            "../../envs/hemocam.yaml"
        threads: 8
        resources:
            gpu=1,
            mem_mb=32000,
            runtime=720,
        params:
            results=results_dir(1),
            config=lambda wildcards: {
                k: config[k] for k in ("seed", "preprocess", "classifier")
            },
        script:
            "../scripts/train_classifier.py"


rule classify_batch:
    input:
        bundle=CLASSIFIER,
        preprocessed=upstream("preprocess", "cpu"),
    output:
        manifest=f"{R}/classifier/batches/{{batch}}.tsv",
    log:
        f"{LOGS}/classify/{{batch}}.log",
    benchmark:
        f"{BENCH}/classify/{{batch}}.tsv"
    conda:
        "../../envs/hemocam.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=batch_runtime("classify", "classify", 120),
    params:
        scans=batch_scans("classify"),
        results=results_dir(2),
    script:
        "../scripts/classify.py"


rule classify:
    input:
        manifests("classifier", "classify"),
