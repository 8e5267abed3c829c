from hemocam import distributed, runlog
from hemocam.settings import with_whole_section

runlog.start(snakemake.log[0], snakemake.threads)
# more than one GPU for the job (resources gpu > 1): DDP ranks through torchrun
distributed.train(
    "segmenter",
    dict(
        cfg=with_whole_section(snakemake.params.config, snakemake.config, "segmenter"),
        scans_tsv=snakemake.input.scans,
        results_dir=snakemake.params.results,
        target=snakemake.params.target,
        members=snakemake.params.members,
        bundle_out=snakemake.output.bundle,
        history_out=snakemake.output.history,
    ),
    gpus=getattr(snakemake.resources, "gpu", 0),
    threads=snakemake.threads,
)
