from hemocam import runlog
from hemocam.provenance import write_provenance

runlog.start(snakemake.log[0], snakemake.threads)
write_provenance(snakemake.params.config, snakemake.output[0], dict(snakemake.input.items()))
