from hemocam import runlog
from hemocam.figures import figures_batch

runlog.start(snakemake.log[0], snakemake.threads)
figures_batch(
    snakemake.params.scans,
    snakemake.params.results,
    snakemake.output.figures,
    manifest_out=snakemake.output.manifest,
    upstream=[snakemake.input.segmentation],
    n_slices=snakemake.params.n_slices,
)
