from pathlib import Path

from hemocam import runlog
from hemocam.phantom import generate_cohort

log = runlog.start(snakemake.log[0], snakemake.threads)
p = snakemake.params
truth = generate_cohort(
    Path(snakemake.output.truth).parent,
    n_scans=p.n_scans,
    matrix=p.matrix,
    n_slices=p.n_slices,
    seed=p.seed,
    quirks=p.quirks,
)
log.info("demo cohort: %d series written", len(truth))
