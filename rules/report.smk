"""The classify-then-segment cascade, the HTML report, and prediction on new images."""


localrules:
    predict,


rule cascade:
    """Classifier ensemble gates the segmentation fold ensemble on every test slice."""
    input:
        classifier=results("classification/ensemble/test_predictions.csv"),
        probabilities=results(
            f"segmentation/{config['cascade']['architecture']}/ensemble/test_probabilities.npy"
        ),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        masks=results("data/lgg/masks.npy"),
    output:
        metrics=results("cascade/metrics.json"),
        per_slice=results("cascade/per_slice.csv"),
        table=report(
            results("cascade/comparison.tsv"),
            category="Cascade",
            caption="../report/cascade.rst",
        ),
    log:
        results("logs/cascade.log"),
    benchmark:
        results("benchmarks/cascade.tsv")
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        threshold=config["segmentation"]["threshold"],
        architecture=config["cascade"]["architecture"],
        postprocess=as_json(config["segmentation"]["postprocess"]),
    shell:
        "$PYTHON $SCRIPTS/cascade.py --classifier {input.classifier}"
        " --probabilities {input.probabilities} --architecture {params.architecture}"
        " --manifest {input.manifest} --splits {input.splits} --masks {input.masks}"
        " --threshold {params.threshold} --postprocess {params.postprocess:q}"
        " --threads {threads} --metrics {output.metrics}"
        " --per-slice {output.per_slice} --table {output.table} > {log} 2>&1"


rule report:
    """One self-contained HTML report and one metrics.json with the run's headline numbers.

    Its inputs are the contract: make_report.py reads the files named here and no other.
    """
    input:
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        split_summary=results("splits/summary.tsv"),
        masks=results("data/lgg/masks.npy"),
        # The example slices' PNGs (their paths are in the manifest).
        png=results("data/lgg/png"),
        test_metrics=expand(
            results("classification/{model}/test_metrics.json"),
            model=BACKBONES + ["ensemble"],
        ),
        classification_report=expand(
            results("classification/{model}/classification_report.tsv"),
            model=BACKBONES + ["ensemble"],
        ),
        confusion_matrix=expand(
            results("classification/{model}/confusion_matrix.png"),
            model=BACKBONES + ["ensemble"],
        ),
        errors=expand(
            results("classification/{model}/errors.png"),
            model=BACKBONES + ["ensemble"],
        ),
        # Read by the degenerate-model checks (brainmri/reporting/checks.py).
        predictions=expand(
            results("classification/{backbone}/test_predictions.csv"),
            backbone=BACKBONES,
        ),
        classifier_history=expand(
            results("classification/{backbone}/history.csv"), backbone=BACKBONES
        ),
        segmentation_summary=results("segmentation/summary.json"),
        segmentation_tables=[
            results("segmentation/table1_validation.tsv"),
            results("segmentation/table2_test.tsv"),
        ],
        overlays=results("segmentation/overlays.png"),
        val_metrics=expand(
            results("segmentation/{arch}/fold{fold}/val_metrics.json"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        test_probabilities=expand(
            results("segmentation/{arch}/fold{fold}/test_probabilities.npy"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        segmenter_history=expand(
            results("segmentation/{arch}/fold{fold}/history.csv"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        # The per-test-patient tumor volume table.
        ensemble_per_slice=expand(
            results("segmentation/{arch}/ensemble/per_slice.csv"), arch=ARCHITECTURES
        ),
        cascade_metrics=results("cascade/metrics.json"),
        cascade_table=results("cascade/comparison.tsv"),
        cascade_per_slice=results("cascade/per_slice.csv"),
        # The segmentation voter's k, when it is on (the report says which detector decided).
        voter_choice=voter_choice(),
        devices=training_devices(),
        # The report's own code: editing it rebuilds the report and nothing else.
        code=[
            SCRIPTS / "make_report.py",
            PACKAGE / "reporting" / "report.py",
            PACKAGE / "reporting" / "volumes.py",
            PACKAGE / "reporting" / "checks.py",
            PACKAGE / "reporting" / "decider.py",
            PACKAGE / "reporting" / "inputs.py",
        ],
    output:
        html=report(
            results("report/report.html"),
            category="Report",
            caption="../report/report.rst",
        ),
        metrics=results("report/metrics.json"),
    log:
        results("logs/report.log"),
    benchmark:
        results("benchmarks/report.tsv")
    conda:
        "../envs/evaluation.yaml"
    params:
        files=lambda wildcards, input: report_files(input),
        config=report_config(),
    shell:
        "$PYTHON $SCRIPTS/make_report.py --files {params.files:q}"
        " --config {params.config:q} --html {output.html} --metrics {output.metrics}"
        " > {log} 2>&1"


rule predict_new_images:
    """Tumor probability, the evaluated ensemble's decision, mask and overlay for every image of a folder."""
    input:
        **prediction_models(),
        images=predict_input_dir,
    output:
        csv=results("predict/predictions.csv"),
        masks=directory(results("predict/masks")),
        overlays=directory(results("predict/overlays")),
        failures=results("predict/failures.csv"),
    log:
        results("logs/predict.log"),
    benchmark:
        results("benchmarks/predict.tsv")
    conda:
        "../envs/training.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        data_source=config["data"]["source"],
        decision=lambda wildcards, input: prediction_arguments(input),
        series="--series" if config["predict"]["series"] else "",
    shell:
        "$PYTHON $SCRIPTS/predict.py --input-dir {input.images:q}"
        " --classifiers {input.classifiers} --segmenters {input.segmenters}"
        " {params.decision} {params.series}"
        " --output {output.csv} --masks-dir {output.masks} --overlays-dir {output.overlays}"
        " --failures {output.failures} --data-source {params.data_source}"
        " --allow-skipped > {log} 2>&1"


rule predict:
    """Target: `snakemake predict --configfile config/demo.yaml --config predict='{input_dir: my_scans}'`."""
    input:
        results("predict/predictions.csv"),
