"""Classification: one training job per timm backbone, majority-vote ensemble, evaluation."""


localrules:
    download_weights,


rule download_weights:
    """ImageNet weights into the local cache, where the network is (never inside a GPU job)."""
    output:
        str(WEIGHTS / "{library}" / "{name}.safetensors"),
    log:
        str(WEIGHTS / "logs" / "{library}_{name}.log"),
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
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/train_classifier.py --backbone {wildcards.backbone}"
        " --settings {params.settings:q} --manifest {input.manifest} --splits {input.splits}"
        " --data-dir {params.data_dir} --weights={input.weights:q} --seed {params.seed}"
        " --threads {threads} --checkpoint {output.checkpoint} --history {output.history}"
        " --predictions {output.predictions} > {log} 2>&1"


rule ensemble_classifiers:
    """Majority vote (or soft vote) of the backbones' test predictions."""
    input:
        expand(
            results("classification/{backbone}/test_predictions.csv"),
            backbone=BACKBONES,
        ),
    output:
        results("classification/ensemble/test_predictions.csv"),
    log:
        results("logs/classification/ensemble.log"),
    conda:
        "../envs/evaluation.yaml"
    params:
        method=config["classification"]["ensemble"],
    shell:
        "$PYTHON $SCRIPTS/ensemble_classifiers.py --method {params.method}"
        " --predictions {input} --output {output} > {log} 2>&1"


rule evaluate_classifier:
    """Paper Fig. 3 table, confusion matrix, ROC AUC and the error gallery (Fig. 4)."""
    input:
        predictions=results("classification/{model}/test_predictions.csv"),
        manifest=results("data/manifest.csv"),
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
    conda:
        "../envs/evaluation.yaml"
    params:
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
    shell:
        "$PYTHON $SCRIPTS/evaluate_classifier.py --model {wildcards.model}"
        " --predictions {input.predictions} --manifest {input.manifest}"
        " --data-dir {params.data_dir} --metrics {output.metrics} --table {output.table}"
        " --confusion {output.confusion} --gallery {output.gallery} > {log} 2>&1"
