from hemocam import runlog
from hemocam.ingest import plan_cohort, write_scans_table, write_split_record

log = runlog.start(snakemake.log[0], snakemake.threads)
cache = f"{snakemake.params.results}/ingest"
plan = plan_cohort(snakemake.config, cache_dir=cache)
table = write_scans_table(plan, snakemake.input, snakemake.output[0])
write_split_record(cache, snakemake.config, table)
