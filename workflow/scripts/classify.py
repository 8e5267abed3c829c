from hemocam import runlog
from hemocam.classifier import predict_batch

runlog.start(snakemake.log[0], snakemake.threads)
predict_batch(
    snakemake.input.bundle,
    snakemake.params.scans,
    snakemake.params.results,
    manifest_out=snakemake.output.manifest,
    upstream=snakemake.input.preprocessed,
)
