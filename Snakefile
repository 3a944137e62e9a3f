"""Brain MRI: tumor classification and segmentation, reproduced from the paper and improved.

Run the paper-scale workflow with `snakemake --cores all --resources gpu=1`,
the demo with `make demo` (synthetic data, CPU). See README.md.
"""


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/classification.smk"
include: "rules/segmentation.smk"
include: "rules/report.smk"
include: "rules/volume.smk"


rule all:
    default_target: True
    input:
        all_targets(),
