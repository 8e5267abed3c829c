from hemocam import runlog
from hemocam.ingest import plan_cohort, write_scans_table

log = runlog.start(snakemake.log[0], snakemake.threads)
plan = plan_cohort(snakemake.config, cache_dir=f"{snakemake.params.results}/ingest")
write_scans_table(plan, snakemake.input, snakemake.output[0])
