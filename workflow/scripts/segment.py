from pathlib import Path

from hemocam import runlog
from hemocam.segmenter import segment_batch

runlog.start(snakemake.log[0], snakemake.threads)
segment_batch(
    snakemake.input.bundle,
    snakemake.params.scans,
    snakemake.params.results,
    out_dir=str(Path(snakemake.output.manifest).parent.parent),
    manifest_out=snakemake.output.manifest,
    upstream=snakemake.input.preprocessed,
    output=snakemake.params.output,
)
