from hemocam import runlog
from hemocam.pseudomask import pseudomask_batch

runlog.start(snakemake.log[0], snakemake.threads)
pseudomask_batch(
    snakemake.params.scans,
    snakemake.params.results,
    snakemake.params.pseudomask,
    labelled=snakemake.params.labelled,
    manifest_out=snakemake.output.manifest,
    upstream=[snakemake.input.cams, *snakemake.input.slices],
)
