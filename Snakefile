# hemocam: weakly supervised intracranial hemorrhage segmentation from slice labels.
# Stages (arXiv 2309.16627): ingest -> preprocess -> classifier -> CAM -> pseudo-mask
# -> segmenter -> evaluate -> report. Each stage is one file in workflow/rules/.
from pathlib import Path


# The shipped defaults load from the repository whatever the working directory
# (-d WORKDIR); --configfile and --config are merged on top.
configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/cam.smk"
include: "workflow/rules/pseudomask.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets,
        report_targets,
