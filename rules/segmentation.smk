"""Segmentation: one training job per architecture x fold, evaluation, fold ensemble, tables."""


rule train_segmenter:
    """Train one architecture on the training folds except {fold}; keep the best-validation checkpoint."""
    input:
        **SEGMENTER_TRAINING_INPUTS,
    output:
        checkpoint=results("segmentation/{arch}/fold{fold}/model.pt"),
        history=results("segmentation/{arch}/fold{fold}/history.csv"),
        device=results("segmentation/{arch}/fold{fold}/device.json"),
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
        fold=lambda wildcards: wildcards.fold,
        epochs="",
        settings=segmenter_settings,
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/train.py segmentation --fold {params.fold} {params.epochs}"
        " --settings {params.settings:q} --manifest {input.manifest} --splits {input.splits}"
        " --images lgg={input.images:q} --masks lgg={input.masks:q} --weights={input.weights:q}"
        " --seed {params.seed} --threads {threads} --checkpoint {output.checkpoint}"
        " --history {output.history} --device-json {output.device} > {log} 2>&1"


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
        threshold=config["segmentation"]["threshold"],
        tta="--tta" if config["segmentation"]["tta"] else "",
    shell:
        "$PYTHON $SCRIPTS/evaluate_segmenter.py --checkpoint {input.checkpoint}"
        " --fold {wildcards.fold} --manifest {input.manifest} --splits {input.splits}"
        " --images {input.images} --masks {input.masks}"
        " --threshold {params.threshold} --threads {threads} {params.tta}"
        " --val-metrics {output.val} --test-metrics {output.test}"
        " --per-slice {output.per_slice} --test-probabilities {output.test_probs}"
        " > {log} 2>&1"


# One architecture on every non-test patient (all folds) for a fixed number of epochs, no
# validation; keeps the last epoch (segmentation.final_model). The same job as a fold's.
use rule train_segmenter as train_segmenter_final with:
    input:
        **SEGMENTER_TRAINING_INPUTS,
        # final_model.epochs null: the fold models' best epochs choose it.
        histories=final_model_histories,
    output:
        checkpoint=results("segmentation/{arch}/final/model.pt"),
        history=results("segmentation/{arch}/final/history.csv"),
        device=results("segmentation/{arch}/final/device.json"),
    log:
        results("logs/segmentation/{arch}_final.log"),
    benchmark:
        results("benchmarks/segmentation/{arch}_final.tsv")
    params:
        fold="all",
        epochs=final_model_epochs,


rule evaluate_segmenter_final:
    """The final model on the test set, with the fold ensemble's TTA and per-patient post-processing."""
    input:
        checkpoint=results("segmentation/{arch}/final/model.pt"),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        images=results("data/lgg/images.npy"),
        masks=results("data/lgg/masks.npy"),
    output:
        test=results("segmentation/{arch}/final/test_metrics.json"),
        per_slice=results("segmentation/{arch}/final/per_slice.csv"),
        test_probs=results("segmentation/{arch}/final/test_probabilities.npy"),
    log:
        results("logs/segmentation/evaluate_{arch}_final.log"),
    benchmark:
        results("benchmarks/segmentation/evaluate_{arch}_final.tsv")
    conda:
        "../envs/training.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        threshold=config["segmentation"]["threshold"],
        tta="--tta" if config["segmentation"]["tta"] else "",
        postprocess=as_json(config["segmentation"]["postprocess"]),
    shell:
        "$PYTHON $SCRIPTS/evaluate_segmenter.py --checkpoint {input.checkpoint}"
        " --fold all --manifest {input.manifest} --splits {input.splits}"
        " --images {input.images} --masks {input.masks}"
        " --threshold {params.threshold} --threads {threads} {params.tta}"
        " --postprocess {params.postprocess:q} --test-metrics {output.test}"
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
    benchmark:
        results("benchmarks/segmentation/ensemble_{arch}.tsv")
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        threshold=config["segmentation"]["threshold"],
        postprocess=as_json(config["segmentation"]["postprocess"]),
    shell:
        "$PYTHON $SCRIPTS/segmentation_ensemble.py --probabilities {input.probabilities}"
        " --manifest {input.manifest} --splits {input.splits} --masks {input.masks}"
        " --threshold {params.threshold} --postprocess {params.postprocess:q}"
        " --threads {threads} --metrics {output.metrics}"
        " --per-slice {output.per_slice} --output-probabilities {output.probabilities}"
        " > {log} 2>&1"


rule summarize_segmentation:
    """Paper Tables 1 (validation) and 2 (test) as mean +- std over folds, the summary, overlays."""
    input:
        val_metrics=expand(
            results("segmentation/{arch}/fold{fold}/val_metrics.json"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        test_metrics=expand(
            results("segmentation/{arch}/fold{fold}/test_metrics.json"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        fold_slices=expand(
            results("segmentation/{arch}/fold{fold}/per_slice.csv"),
            arch=ARCHITECTURES,
            fold=FOLDS,
        ),
        ensemble_metrics=expand(
            results("segmentation/{arch}/ensemble/test_metrics.json"),
            arch=ARCHITECTURES,
        ),
        ensemble_slices=expand(
            results("segmentation/{arch}/ensemble/per_slice.csv"),
            arch=ARCHITECTURES,
        ),
        ensemble_probabilities=expand(
            results("segmentation/{arch}/ensemble/test_probabilities.npy"),
            arch=ARCHITECTURES,
        ),
        # segmentation.final_model.enabled: each architecture's all-patients model.
        final_metrics=final_model_outputs("test_metrics.json"),
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
    benchmark:
        results("benchmarks/segmentation/summary.tsv")
    conda:
        "../envs/evaluation.yaml"
    params:
        architectures=ARCHITECTURES,
        folds=len(FOLDS),
        seed=config["seed"],
        threshold=config["segmentation"]["threshold"],
    shell:
        "$PYTHON $SCRIPTS/summarize_segmentation.py --architectures {params.architectures}"
        " --folds {params.folds} --val-metrics {input.val_metrics}"
        " --test-metrics {input.test_metrics} --fold-slices {input.fold_slices}"
        " --ensemble-metrics {input.ensemble_metrics}"
        " --ensemble-slices {input.ensemble_slices}"
        " --ensemble-probabilities {input.ensemble_probabilities}"
        " --final-metrics {input.final_metrics}"
        " --manifest {input.manifest} --splits {input.splits} --images {input.images}"
        " --masks {input.masks} --seed {params.seed} --threshold {params.threshold}"
        " --summary {output.summary} --table1 {output.table1} --table2 {output.table2}"
        " --per-slice {output.per_slice} --overlays {output.overlays} > {log} 2>&1"
