from hemocam import runlog
from hemocam.preprocess import preprocess_batch

runlog.start(snakemake.log[0], snakemake.threads)
preprocess_batch(
    snakemake.params.scans,
    snakemake.params.results,
    snakemake.params.windows,
    snakemake.params.size,
    manifest_out=snakemake.output.manifest,
    upstream=snakemake.input,
)
