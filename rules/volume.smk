"""Prediction on whole patient volumes (slice folders or NIfTI): 3-D masks and tumor volumes."""


localrules:
    predict_volume,


rule predict_patient_volumes:
    """Per-slice decisions of the evaluated ensemble, a 3-D mask in the input's geometry and the tumor volume per patient; bad patients in failures.csv."""
    input:
        **prediction_models(),
        volumes=predict_volume_inputs,
    output:
        csv=results("predict_volume/volumes.csv"),
        patients=directory(results("predict_volume/patients")),
        failures=results("predict_volume/failures.csv"),
    log:
        results("logs/predict_volume.log"),
    benchmark:
        results("benchmarks/predict_volume.tsv")
    conda:
        "../envs/training.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=volume_memory_mb(Limits(**config["predict"]["limits"])),
        runtime=60,
    params:
        axis=config["predict"]["volume_axis"],
        decision=lambda wildcards, input: prediction_arguments(input),
        limits=as_json(config["predict"]["limits"]),
        dicom_series=as_json(config["predict"]["dicom"]["series"]),
    shell:
        "$PYTHON $SCRIPTS/predict_volume.py --inputs {input.volumes:q}"
        " --classifiers {input.classifiers} --segmenters {input.segmenters}"
        " {params.decision} --axis {params.axis}"
        " --csv {output.csv} --patients-dir {output.patients}"
        " --failures {output.failures} --allow-skipped"
        " --limits {params.limits:q} --dicom-series {params.dicom_series:q} > {log} 2>&1"


rule predict_volume:
    """Target: `snakemake predict_volume --config predict='{volumes: [patient_dir, scan.nii.gz]}'`."""
    input:
        results("predict_volume/volumes.csv"),
