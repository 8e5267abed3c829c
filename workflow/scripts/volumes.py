from hemocam import runlog
from hemocam.volumes import volumes_table

runlog.start(snakemake.log[0], snakemake.threads)
volumes_table(
    snakemake.input.scans,
    snakemake.params.results,
    snakemake.output[0],
    manifests=snakemake.input.segmentation,
)
