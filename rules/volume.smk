"""Prediction on whole patient volumes (slice folders or NIfTI): 3-D masks and tumor volumes."""


localrules:
    predict_volume,


rule predict_patient_volumes:
    """Per-slice decisions, a 3-D mask in the input's geometry and the tumor volume per patient."""
    input:
        volumes=predict_volume_inputs,
        classifiers=expand(
            results("classification/{backbone}/model.pt"), backbone=BACKBONES
        ),
        segmenters=expand(
            results(
                f"segmentation/{config['cascade']['architecture']}/fold{{fold}}/model.pt"
            ),
            fold=FOLDS,
        ),
    output:
        csv=results("predict_volume/volumes.csv"),
        patients=directory(results("predict_volume/patients")),
    log:
        results("logs/predict_volume.log"),
    benchmark:
        results("benchmarks/predict_volume.tsv")
    conda:
        "../envs/training.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        method=config["classification"]["ensemble"],
        classifier_threshold=config["classification"]["threshold"],
        segmentation_threshold=config["segmentation"]["threshold"],
        axis=config["predict"]["volume_axis"],
        tta="--tta" if config["segmentation"]["tta"] else "",
        postprocess=as_json(config["segmentation"]["postprocess"]),
        limits=as_json(config["predict"]["limits"]),
        dicom_series=as_json(config["predict"]["dicom"]["series"]),
    shell:
        "$PYTHON $SCRIPTS/predict_volume.py --inputs {input.volumes:q}"
        " --classifiers {input.classifiers} --segmenters {input.segmenters}"
        " --method {params.method} --classifier-threshold {params.classifier_threshold}"
        " --segmentation-threshold {params.segmentation_threshold} --axis {params.axis}"
        " {params.tta} --postprocess {params.postprocess:q}"
        " --csv {output.csv} --patients-dir {output.patients}"
        " --limits {params.limits:q} --dicom-series {params.dicom_series:q} > {log} 2>&1"


rule predict_volume:
    """Target: `snakemake predict_volume --config predict='{volumes: [patient_dir, scan.nii.gz]}'`."""
    input:
        results("predict_volume/volumes.csv"),
