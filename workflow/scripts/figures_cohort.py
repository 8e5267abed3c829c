from hemocam import runlog
from hemocam.figures import cohort_figure

runlog.start(snakemake.log[0], snakemake.threads)
cohort_figure(snakemake.input[0], snakemake.output[0])
