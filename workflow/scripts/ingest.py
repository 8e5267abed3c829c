from hemocam import runlog
from hemocam.ingest import ingest_batch

runlog.start(snakemake.log[0], snakemake.threads)
ingest_batch(
    snakemake.input.plan,
    snakemake.config,
    snakemake.params.results,
    snakemake.output.manifest,
    threads=snakemake.threads,
)
