from pathlib import Path

from hemocam import runlog
from hemocam.segmenter import self_training_batch

runlog.start(snakemake.log[0], snakemake.threads)
self_training_batch(
    snakemake.input.bundle,
    snakemake.params.scans,
    snakemake.params.results,
    out_dir=str(Path(snakemake.output.manifest).parent.parent),
    manifest_out=snakemake.output.manifest,
    labelled=snakemake.params.labelled,
    prob_threshold=snakemake.params.prob_threshold,
    upstream=[snakemake.input.targets],
    output=snakemake.params.output,
)
