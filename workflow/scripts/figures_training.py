from hemocam import runlog
from hemocam.figures import training_figure

runlog.start(snakemake.log[0], snakemake.threads)
training_figure(snakemake.input[0], snakemake.output[0], title=snakemake.params.title)
