"""Data: fetch the two Kaggle datasets (or local / synthetic stand-ins), preprocess, split."""


# Downloads need the network: keep them on the submitting node under a cluster executor.
localrules:
    fetch,


rule fetch:
    """One Kaggle dataset ({dataset}: its Kaggle folder name), downloaded or copied, safely extracted."""
    output:
        folder=directory(results("raw/{dataset}")),
        checksums=results("raw/{dataset}.sha256.tsv"),
    log:
        results("logs/data/fetch_{dataset}.log"),
    benchmark:
        results("benchmarks/data/fetch_{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(map(re.escape, DATASETS.values())),
    conda:
        "../envs/data.yaml"
    params:
        source=config["data"]["source"],
        local_dir=config["data"]["local_dir"] or "",
        synthetic=as_json(config["data"]["synthetic"]),
        extraction=as_json(config["data"]["extraction"]),
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/fetch_dataset.py --dataset {wildcards.dataset}"
        " --source {params.source} --local-dir={params.local_dir:q}"
        " --synthetic {params.synthetic:q} --extraction {params.extraction:q}"
        " --seed {params.seed} --out-dir {output.folder} --checksums {output.checksums}"
        " > {log} 2>&1"


rule preprocess_lgg:
    """LGG TIFFs -> 3-channel PNGs + binary mask PNGs + uint8 arrays + manifest part."""
    input:
        results(f"raw/{DATASETS['lgg']}"),
    output:
        png=directory(results("data/lgg/png")),
        images=results("data/lgg/images.npy"),
        manifest=results("data/lgg/manifest.csv"),
        masks=results("data/lgg/masks.npy"),
    log:
        results("logs/data/preprocess_lgg.log"),
    benchmark:
        results("benchmarks/data/preprocess_lgg.tsv")
    conda:
        "../envs/data.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dataset="lgg",
        array_size=config["data"]["array_size"],
        masks=lambda wildcards, output: (
            f"--masks {shlex.quote(output.masks)}" if "masks" in output.keys() else ""
        ),
    shell:
        "$PYTHON $SCRIPTS/preprocess.py {params.dataset} --raw-dir {input}"
        " --array-size {params.array_size} --png-dir {output.png} --images {output.images}"
        " {params.masks} --manifest {output.manifest} --threads {threads} > {log} 2>&1"


use rule preprocess_lgg as preprocess_btm with:
    input:
        results(f"raw/{DATASETS['btm']}"),
    output:
        png=directory(results("data/btm/png")),
        images=results("data/btm/images.npy"),
        manifest=results("data/btm/manifest.csv"),
    log:
        results("logs/data/preprocess_btm.log"),
    benchmark:
        results("benchmarks/data/preprocess_btm.tsv")
    params:
        dataset="btm",
        array_size=config["data"]["array_size"],
        masks="",


rule manifest:
    """One manifest, a row per image of both datasets."""
    input:
        lgg=results("data/lgg/manifest.csv"),
        btm=results("data/btm/manifest.csv"),
    output:
        results("data/manifest.csv"),
    log:
        results("logs/data/manifest.log"),
    benchmark:
        results("benchmarks/data/manifest.tsv")
    conda:
        "../envs/data.yaml"
    shell:
        "$PYTHON $SCRIPTS/build_manifest.py --parts {input.lgg} {input.btm}"
        " --output {output} > {log} 2>&1"


rule split:
    """Patient-level (default) or slice-level train/val/test split and segmentation folds."""
    input:
        results("data/manifest.csv"),
    output:
        splits=results("splits/splits.csv"),
        summary=results("splits/summary.tsv"),
    log:
        results("logs/data/split.log"),
    benchmark:
        results("benchmarks/data/split.tsv")
    conda:
        "../envs/data.yaml"
    params:
        level=config["split"]["level"],
        test_fraction=config["split"]["test_fraction"],
        val_fraction=config["split"]["val_fraction"],
        folds=config["split"]["folds"],
        use_second_dataset=config["classification"]["use_second_dataset"],
        seed=config["seed"],
    shell:
        "$PYTHON $SCRIPTS/make_splits.py --manifest {input} --level {params.level}"
        " --test-fraction {params.test_fraction} --val-fraction {params.val_fraction}"
        " --folds {params.folds} --seed {params.seed}"
        " --second-dataset {params.use_second_dataset}"
        " --splits {output.splits} --summary {output.summary} > {log} 2>&1"
