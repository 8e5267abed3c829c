from hemocam import runlog
from hemocam.figures import provenance_html

runlog.start(snakemake.log[0], snakemake.threads)
provenance_html(snakemake.input[0], snakemake.output[0])
