from hemocam import runlog
from hemocam.evaluate import evaluate

runlog.start(snakemake.log[0], snakemake.threads)
evaluate(
    snakemake.input.scans,
    snakemake.params.results,
    snakemake.params.config,
    out_tsv=snakemake.output.table,
    summary_tsv=snakemake.output.summary,
    self_training_target=snakemake.params.self_training_target,
)
