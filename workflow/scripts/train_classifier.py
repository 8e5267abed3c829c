from hemocam import distributed, runlog

runlog.start(snakemake.log[0], snakemake.threads)
# more than one GPU for the job (resources gpu > 1): DDP ranks through torchrun
distributed.train(
    "classifier",
    dict(
        cfg=snakemake.params.config,
        scans_tsv=snakemake.input.scans,
        results_dir=snakemake.params.results,
        bundle_out=snakemake.output.bundle,
        history_out=snakemake.output.history,
        metrics_out=snakemake.output.metrics,
    ),
    gpus=getattr(snakemake.resources, "gpu", 0),
    threads=snakemake.threads,
)
