"""Classification: one training job per timm backbone, majority-vote ensemble, evaluation."""


localrules:
    download_weights,


rule download_weights:
    """ImageNet weights into the local cache, where the network is (never inside a GPU job)."""
    output:
        str(WEIGHTS / "{library}" / "{name}.safetensors"),
    log:
        str(WEIGHTS / "logs" / "{library}_{name}.log"),
    benchmark:
        str(WEIGHTS / "logs" / "{library}_{name}.benchmark.tsv")
    wildcard_constraints:
        library="timm|smp",
    conda:
        "../envs/training.yaml"
    shell:
        "$PYTHON $SCRIPTS/download_weights.py --library {wildcards.library}"
        " --name {wildcards.name} --output {output} > {log} 2>&1"


rule train_classifier:
    """Fine-tune one backbone; keep the best-validation-loss checkpoint; predict the test set."""
    input:
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
        lgg=results("data/lgg/images.npy"),
        btm=results("data/btm/images.npy"),
        weights=classifier_weights,
    output:
        checkpoint=results("classification/{backbone}/model.pt"),
        history=results("classification/{backbone}/history.csv"),
        predictions=results("classification/{backbone}/test_predictions.csv"),
        device=results("classification/{backbone}/device.json"),
    log:
        results("logs/classification/{backbone}.log"),
    benchmark:
        results("benchmarks/classification/{backbone}.tsv")
    conda:
        "../envs/training.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    params:
        settings=classifier_settings,
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/train.py classification --settings {params.settings:q}"
        " --manifest {input.manifest} --splits {input.splits}"
        " --images lgg={input.lgg:q} btm={input.btm:q} --weights={input.weights:q}"
        " --seed {params.seed} --threads {threads} --checkpoint {output.checkpoint}"
        " --history {output.history} --predictions {output.predictions}"
        " --device-json {output.device} > {log} 2>&1"


rule ensemble_classifiers:
    """Majority vote (or soft vote) of the backbones and the segmentation voter (brainmri/evaluation/decision.py)."""
    input:
        predictions=expand(
            results("classification/{backbone}/test_predictions.csv"),
            backbone=BACKBONES,
        ),
        voter=voter_files(),
        manifest=results("data/manifest.csv"),
    output:
        results("classification/ensemble/test_predictions.csv"),
    log:
        results("logs/classification/ensemble.log"),
    benchmark:
        results("benchmarks/classification/ensemble.tsv")
    conda:
        "../envs/evaluation.yaml"
    params:
        method=config["classification"]["ensemble"],
        threshold=config["classification"]["threshold"],
        smooth_window=config["classification"]["smooth_window"],
        voter=lambda wildcards, input: voter_arguments(input.voter),
    shell:
        "$PYTHON $SCRIPTS/ensemble_classifiers.py --method {params.method}"
        " --threshold {params.threshold} --predictions {input.predictions}"
        " {params.voter} --manifest {input.manifest}"
        " --smooth-window {params.smooth_window} --output {output} > {log} 2>&1"


rule segmentation_voter:
    """The segmentation fold ensemble as a classifier: tumor where its cleaned mask has >= k pixels."""
    input:
        probabilities=results(
            f"segmentation/{VOTER_ARCH}/ensemble/test_probabilities.npy"
        ),
        fold_slices=expand(
            results(f"segmentation/{VOTER_ARCH}/fold{{fold}}/per_slice.csv"),
            fold=FOLDS,
        ),
        manifest=results("data/manifest.csv"),
        splits=results("splits/splits.csv"),
    output:
        predictions=results("classification/segvoter/test_predictions.csv"),
        choice=results("classification/segvoter/min_pixels.json"),
    log:
        results("logs/classification/segvoter.log"),
    benchmark:
        results("benchmarks/classification/segvoter.tsv")
    conda:
        "../envs/evaluation.yaml"
    params:
        threshold=config["segmentation"]["threshold"],
        postprocess=as_json(config["segmentation"]["postprocess"]),
        min_pixels=config["classification"]["segmentation_voter"]["min_pixels"]
        or "auto",
    shell:
        "$PYTHON $SCRIPTS/segmentation_voter.py --probabilities {input.probabilities}"
        " --fold-slices {input.fold_slices} --manifest {input.manifest} --splits {input.splits}"
        " --threshold {params.threshold} --postprocess {params.postprocess:q}"
        " --min-pixels {params.min_pixels} --output {output.predictions}"
        " --choice {output.choice} > {log} 2>&1"


rule evaluate_classifier:
    """Paper Fig. 3 table, confusion matrix, ROC AUC and the error gallery (Fig. 4)."""
    input:
        predictions=results("classification/{model}/test_predictions.csv"),
        manifest=results("data/manifest.csv"),
        images=results("data/lgg/images.npy"),
        masks=results("data/lgg/masks.npy"),
    output:
        metrics=results("classification/{model}/test_metrics.json"),
        table=report(
            results("classification/{model}/classification_report.tsv"),
            category="Classification",
            subcategory="{model}",
            caption="../report/classification_report.rst",
        ),
        confusion=report(
            results("classification/{model}/confusion_matrix.png"),
            category="Classification",
            subcategory="{model}",
            caption="../report/confusion_matrix.rst",
        ),
        gallery=report(
            results("classification/{model}/errors.png"),
            category="Classification",
            subcategory="{model}",
            caption="../report/errors.rst",
        ),
    log:
        results("logs/classification/evaluate_{model}.log"),
    benchmark:
        results("benchmarks/classification/evaluate_{model}.tsv")
    conda:
        "../envs/evaluation.yaml"
    params:
        threshold=config["classification"]["threshold"],
    shell:
        "$PYTHON $SCRIPTS/evaluate_classifier.py --model {wildcards.model}"
        " --predictions {input.predictions} --threshold {params.threshold}"
        " --manifest {input.manifest} --images lgg={input.images:q} --masks lgg={input.masks:q}"
        " --metrics {output.metrics} --table {output.table}"
        " --confusion {output.confusion} --gallery {output.gallery} > {log} 2>&1"
