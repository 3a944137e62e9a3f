"""Segmentation: one training job per architecture x fold, evaluation, fold ensemble, tables."""


rule train_segmenter:
    """Train one architecture on the training folds except {fold}; keep the best-validation checkpoint."""
    input:
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        images=results("data/lgg/images.npy"),
        masks=results("data/lgg/masks.npy"),
        weights=segmenter_weights,
    output:
        checkpoint=results("segmentation/{arch}/fold{fold}/model.pt"),
        history=results("segmentation/{arch}/fold{fold}/history.csv"),
    log:
        results("logs/segmentation/{arch}_fold{fold}.log"),
    benchmark:
        results("benchmarks/segmentation/{arch}_fold{fold}.tsv")
    conda:
        "../envs/training.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=180,
    params:
        settings=segmenter_settings,
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/train_segmenter.py --arch {wildcards.arch} --fold {wildcards.fold}"
        " --settings {params.settings:q} --manifest {input.manifest} --splits {input.splits}"
        " --data-dir {params.data_dir} --weights={input.weights:q} --seed {params.seed}"
        " --threads {threads} --checkpoint {output.checkpoint} --history {output.history}"
        " > {log} 2>&1"


rule evaluate_segmenter:
    """Dice, Jaccard, Hausdorff and ASSD (medpy) of one fold model on its validation fold and the test set."""
    input:
        checkpoint=results("segmentation/{arch}/fold{fold}/model.pt"),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        images=results("data/lgg/images.npy"),
        masks=results("data/lgg/masks.npy"),
    output:
        val=results("segmentation/{arch}/fold{fold}/val_metrics.json"),
        test=results("segmentation/{arch}/fold{fold}/test_metrics.json"),
        per_slice=results("segmentation/{arch}/fold{fold}/per_slice.csv"),
        test_probs=results("segmentation/{arch}/fold{fold}/test_probabilities.npy"),
    log:
        results("logs/segmentation/evaluate_{arch}_fold{fold}.log"),
    benchmark:
        results("benchmarks/segmentation/evaluate_{arch}_fold{fold}.tsv")
    conda:
        "../envs/training.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        threshold=config["segmentation"]["threshold"],
    shell:
        "$PYTHON $SCRIPTS/evaluate_segmenter.py --checkpoint {input.checkpoint}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " --data-dir {params.data_dir} --threshold {params.threshold} --threads {threads}"
        " --val-metrics {output.val} --test-metrics {output.test}"
        " --per-slice {output.per_slice} --test-probabilities {output.test_probs}"
        " > {log} 2>&1"


rule segmentation_fold_ensemble:
    """Mean of the fold models' probabilities on the test set, thresholded and scored."""
    input:
        probabilities=expand(
            results("segmentation/{{arch}}/fold{fold}/test_probabilities.npy"),
            fold=FOLDS,
        ),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        masks=results("data/lgg/masks.npy"),
    output:
        metrics=results("segmentation/{arch}/ensemble/test_metrics.json"),
        per_slice=results("segmentation/{arch}/ensemble/per_slice.csv"),
        probabilities=results("segmentation/{arch}/ensemble/test_probabilities.npy"),
    log:
        results("logs/segmentation/ensemble_{arch}.log"),
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        threshold=config["segmentation"]["threshold"],
    shell:
        "$PYTHON $SCRIPTS/segmentation_ensemble.py --probabilities {input.probabilities}"
        " --manifest {input.manifest} --splits {input.splits} --masks {input.masks}"
        " --threshold {params.threshold} --threads {threads} --metrics {output.metrics}"
        " --per-slice {output.per_slice} --output-probabilities {output.probabilities}"
        " > {log} 2>&1"


rule summarize_segmentation:
    """Paper Tables 1 (validation) and 2 (test) as mean +- std over folds, the summary, overlays."""
    input:
        fold_metrics=expand(
            results("segmentation/{arch}/fold{fold}/{split}_metrics.json"),
            arch=ARCHITECTURES,
            fold=FOLDS,
            split=["val", "test"],
        ),
        fold_slices=expand(
            results("segmentation/{arch}/fold{fold}/per_slice.csv"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        ensembles=expand(
            results("segmentation/{arch}/ensemble/test_metrics.json"),
            arch=ARCHITECTURES,
        ),
        ensemble_probs=expand(
            results("segmentation/{arch}/ensemble/test_probabilities.npy"),
            arch=ARCHITECTURES,
        ),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        images=results("data/lgg/images.npy"),
        masks=results("data/lgg/masks.npy"),
    output:
        summary=results("segmentation/summary.json"),
        table1=report(
            results("segmentation/table1_validation.tsv"),
            category="Segmentation",
            caption="../report/table1.rst",
        ),
        table2=report(
            results("segmentation/table2_test.tsv"),
            category="Segmentation",
            caption="../report/table2.rst",
        ),
        per_slice=results("segmentation/per_slice.csv"),
        overlays=report(
            results("segmentation/overlays.png"),
            category="Segmentation",
            caption="../report/overlays.rst",
        ),
    log:
        results("logs/segmentation/summary.log"),
    conda:
        "../envs/evaluation.yaml"
    params:
        results_dir=lambda wildcards, output: str(Path(output.summary).parents[1]),
        architectures=ARCHITECTURES,
        folds=len(FOLDS),
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/summarize_segmentation.py --results-dir {params.results_dir}"
        " --architectures {params.architectures} --folds {params.folds} --seed {params.seed}"
        " --summary {output.summary} --table1 {output.table1} --table2 {output.table2}"
        " --per-slice {output.per_slice} --overlays {output.overlays} > {log} 2>&1"
