from hemocam import runlog
from hemocam.figures import evaluation_figures

runlog.start(snakemake.log[0], snakemake.threads)
evaluation_figures(snakemake.input[0], snakemake.output.dice, snakemake.output.volume)
