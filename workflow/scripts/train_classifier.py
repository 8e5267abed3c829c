from hemocam import runlog
from hemocam.classifier import train_classifier

runlog.start(snakemake.log[0], snakemake.threads)
train_classifier(
    snakemake.params.config,
    snakemake.input.scans,
    snakemake.params.results,
    bundle_out=snakemake.output.bundle,
    history_out=snakemake.output.history,
    metrics_out=snakemake.output.metrics,
)
