from hemocam import runlog
from hemocam.figures import gallery

runlog.start(snakemake.log[0], snakemake.threads)
gallery(snakemake.input, snakemake.output[0], max_scans=snakemake.params.max_scans)
