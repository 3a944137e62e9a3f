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
    """One self-contained HTML report and one metrics.json with the run's headline numbers."""
    input:
        data_targets(),
        classification_targets(),
        segmentation_targets(),
        results("cascade/metrics.json"),
        # Every other file the report shows (figures, tables, example slices).
        shown=expand(
            results("classification/{model}/{file}"),
            model=BACKBONES + ["ensemble"],
            file=["classification_report.tsv", "confusion_matrix.png", "errors.png"],
        )
        + [
            results(f"segmentation/{file}")
            for file in ("table1_validation.tsv", "table2_test.tsv", "overlays.png")
        ]
        + [results("cascade/comparison.tsv"), results("data/lgg/png")],
        # The report's own code: editing it rebuilds the report and nothing else.
        code=[
            SCRIPTS / "make_report.py",
            PACKAGE / "reporting" / "report.py",
            PACKAGE / "reporting" / "volumes.py",
            PACKAGE / "reporting" / "checks.py",
        ],
        # The per-test-patient tumor volume table.
        volumes=expand(
            results("segmentation/{arch}/ensemble/per_slice.csv"), arch=ARCHITECTURES
        )
        + [results("cascade/per_slice.csv")],
        # Read by the degenerate-model checks (brainmri/reporting/checks.py).
        predictions=expand(
            results("classification/{backbone}/test_predictions.csv"),
            backbone=BACKBONES,
        ),
        fold_results=expand(
            results("segmentation/{arch}/fold{fold}/{name}"),
            arch=ARCHITECTURES,
            fold=FOLDS,
            name=["val_metrics.json", "test_probabilities.npy"],
        ),
        masks=results("data/lgg/masks.npy"),
        histories=expand(
            results("classification/{backbone}/history.csv"), backbone=BACKBONES
        )
        + expand(
            results("segmentation/{arch}/fold{fold}/history.csv"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        devices=training_devices(),
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
        results_dir=lambda wildcards, output: str(Path(output.metrics).parents[1]),
        config=as_json(config),
    shell:
        "$PYTHON $SCRIPTS/make_report.py --results-dir {params.results_dir}"
        " --config {params.config:q} --devices {input.devices}"
        " --html {output.html} --metrics {output.metrics}"
        " > {log} 2>&1"


rule predict_new_images:
    """Tumor probability, ensemble decision, mask and overlay for every image of a folder."""
    input:
        images=predict_input_dir,
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
        method=config["classification"]["ensemble"],
        classifier_threshold=config["classification"]["threshold"],
        segmentation_threshold=config["segmentation"]["threshold"],
        data_source=config["data"]["source"],
        tta="--tta" if config["segmentation"]["tta"] else "",
    shell:
        "$PYTHON $SCRIPTS/predict.py --input-dir {input.images:q}"
        " --classifiers {input.classifiers} --segmenters {input.segmenters}"
        " --method {params.method} --classifier-threshold {params.classifier_threshold}"
        " --segmentation-threshold {params.segmentation_threshold} {params.tta}"
        " --output {output.csv} --masks-dir {output.masks} --overlays-dir {output.overlays}"
        " --failures {output.failures} --data-source {params.data_source} > {log} 2>&1"


rule predict:
    """Target: `snakemake predict --configfile config/demo.yaml --config predict='{input_dir: my_scans}'`."""
    input:
        results("predict/predictions.csv"),
