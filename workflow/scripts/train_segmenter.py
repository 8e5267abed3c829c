from hemocam import runlog
from hemocam.segmenter import train_segmenter

runlog.start(snakemake.log[0], snakemake.threads)
train_segmenter(
    snakemake.params.config,
    snakemake.input.scans,
    snakemake.params.results,
    target=snakemake.params.target,
    bundle_out=snakemake.output.bundle,
    history_out=snakemake.output.history,
)
