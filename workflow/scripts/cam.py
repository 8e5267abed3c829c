from hemocam import runlog
from hemocam.cam import cam_batch

runlog.start(snakemake.log[0], snakemake.threads)
cam_batch(
    snakemake.input.bundle,
    snakemake.params.scans,
    snakemake.params.results,
    snakemake.params.cam,
    manifest_out=snakemake.output.manifest,
    upstream=snakemake.input.preprocessed,
)
