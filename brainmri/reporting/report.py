"""The run's self-contained HTML report and its headline metrics.json.

Only the files the report rule declares are read (:class:`ReportFiles`); images are embedded
as base64 data URIs; text from file names or config (ids, paths, values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.io import read_json
from brainmri.reporting.checks import checks_html, paper_note_html, run_checks
from brainmri.reporting.decider import decided_by, decided_by_html
from brainmri.reporting.inputs import ReportFiles
from brainmri.reporting.volumes import patient_volumes, volume_rows

PAPER = {
    "classification": {"ensemble_accuracy": 0.96, "tumor_f1": 0.94, "test_slices": 786},
    "segmentation_test_dice": {"Unet": 0.81, "DeepLabV3Plus": 0.83},
    "buda_volume_dice": 0.82,
}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1100px;margin:auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{border-bottom:2px solid #e3e6ea;padding-bottom:4px;
margin-top:36px}h3{margin:22px 0 8px;font-size:17px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13.5px}
th,td{border:1px solid #dde1e6;padding:4px 9px;text-align:right}
th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}
.note{color:#5b6472;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:14px}
img{max-width:100%;border:1px solid #e3e6ea}.toc a{margin-right:14px}
.good{color:#127a3a;font-weight:600}.bad{color:#b3261e;font-weight:600}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    return esc(value)


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(v, digits)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_html(path: Path, alt: str, width: int | None = None) -> str:
    if not path.is_file():
        return f"<p class=note>missing figure: {esc(path.name)}</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="width:{width}px"' if width else ""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}"{style}>'


def figure_html(figure: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _read(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: missing result file (run the workflow up to this step)")
    return read_json(path)


class RunResults:
    """The run's headline results, read from the given files."""

    def __init__(self, files: ReportFiles, config: dict[str, Any]) -> None:
        self.config = config
        cls = config["classification"]
        self.backbones = [b if isinstance(b, str) else b["name"] for b in cls["backbones"]]
        seg = config["segmentation"]
        self.architectures = {a["name"]: a for a in seg["architectures"]}
        self.folds = config["split"]["folds"]
        self.classification = {
            m: _read(files.path("test_metrics", m)) for m in [*self.backbones, "ensemble"]
        }
        self.segmentation = _read(files.path("segmentation_summary"))
        self.cascade = _read(files.path("cascade_metrics"))

    def headline(self) -> dict[str, Any]:
        """The numbers of report/metrics.json."""
        classification = {
            model: {
                "accuracy": m["accuracy"],
                "tumor_precision": m["classes"]["tumor"]["precision"],
                "tumor_recall": m["classes"]["tumor"]["recall"],
                "tumor_f1": m["classes"]["tumor"]["f1-score"],
                "roc_auc": m["roc_auc"],
                "test_slices": m["n"],
            }
            for model, m in self.classification.items()
        }
        segmentation = {}
        for arch, s in self.segmentation["architectures"].items():
            segmentation[arch] = {
                "arch": self.architectures[arch]["arch"],
                "encoder": self.architectures[arch]["encoder"],
                "validation": {
                    k: s["validation"]["tumor_slices"][k] for k in ("dice", "jaccard", "hd", "assd")
                }
                | {"volume_dice": s["validation"]["volume_dice"]},
                "test": {k: s["test"]["tumor_slices"][k] for k in ("dice", "jaccard", "hd", "assd")}
                | {"volume_dice": s["test"]["volume_dice"]},
            }
            # One model on the test set: the fold ensemble, the all-patients model if trained.
            for key in ("test_fold_ensemble", "test_final_model"):
                if key in s:
                    segmentation[arch][key] = {
                        "dice": s[key]["tumor_slices"]["dice"]["mean"],
                        "volume_dice": s[key]["volume_dice"]["mean"],
                    }
        cascade = {
            key: {
                k: self.cascade[key][k]
                for k in ("dice_all_slices", "dice_tumor_slices", "volume_dice")
            }
            | {
                k: self.cascade[key]["detection"][k]
                for k in ("sensitivity", "specificity", "false_positive_slices")
            }
            for key in ("segmentation_only", "cascade")
        }
        cascade["architecture"] = self.cascade["architecture"]
        cascade["gate"] = self.cascade["cascade"]["gate"]
        return {
            "classification": classification,
            "segmentation": segmentation,
            "cascade": cascade,
            "paper": PAPER,
            "recipe": self.config.get("recipe", "custom"),
            "split_level": self.config["split"]["level"],
            "seed": self.config["seed"],
            "data_source": self.config["data"]["source"],
            "config": self.config,
        }


def _history_curves(paths: dict[str, Path], metric: str, title: str) -> str:
    from brainmri.reporting.plotting import curves_figure

    histories = {name: pd.read_csv(p) for name, p in paths.items() if p.is_file()}
    if not histories:
        return "<p class=note>no training histories</p>"
    return figure_html(curves_figure(histories, metric, title), title)


def _benchmarks(paths: dict[str, Path]) -> pd.DataFrame:
    """One row per job (name -> its benchmark file), in the order of the files' paths."""
    rows = []
    for job, path in sorted(paths.items(), key=lambda item: item[1]):
        if not path.is_file():  # never written (e.g. --touch) or deleted: not an input
            continue
        frame = pd.read_csv(path, sep="\t")
        if frame.empty:
            continue
        rows.append(
            {
                "job": job,
                "wall time (s)": float(frame["s"].iloc[0]),
                "max RSS (MB)": float(frame["max_rss"].iloc[0]) if "max_rss" in frame else None,
            }
        )
    return pd.DataFrame(rows, columns=["job", "wall time (s)", "max RSS (MB)"])


def training_devices(paths: list[Path]) -> list[str]:
    """The distinct devices the training jobs recorded in their ``device.json`` files."""
    devices = set()
    for path in paths:
        record = read_json(path)
        if not isinstance(record, dict) or "name" not in record:
            raise InputError(f"{path}: not a device record (expected a JSON object with 'name')")
        plan = record.get("plan") if isinstance(record.get("plan"), dict) else {}
        precision = f", {plan['precision']}" if "precision" in plan else ""
        devices.add(f"{record['name']} ({record.get('type', '?')}{precision})")
    return sorted(devices)


def _png(folder: Path, manifest: Path, relative: str) -> np.ndarray:
    """A PNG the manifest names (relative to its folder); it must lie in the declared folder."""
    from brainmri.reporting.plotting import read_png

    path = manifest.parent / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise InputError(f"{manifest}: {relative} is outside the report's input {folder}")
    return read_png(path)


def _examples(files: ReportFiles, count: int = 6) -> str:
    """A few test tumor slices with their mask contour."""
    from brainmri.reporting.plotting import error_gallery
    from brainmri.tables import read_manifest

    path, folder = files.path("manifest"), files.path("png")
    manifest = read_manifest(path)
    lgg = manifest[(manifest["source"] == "lgg") & (manifest["has_tumor"] == 1)]
    if lgg.empty:
        return ""
    picks = lgg.iloc[np.linspace(0, len(lgg) - 1, min(count, len(lgg))).astype(int)]
    items = [
        (
            row.id,
            _png(folder, path, row.image_path),
            _png(folder, path, row.mask_path) > 127,
            None,  # ground truth, not a prediction: no p(tumor)
        )
        for row in picks.itertuples()
    ]
    figure = error_gallery(
        {"LGG slices with tumor": items}, "Example slices (green contour: ground-truth mask)"
    )
    return figure_html(figure, "example slices")


def build_report(
    files: ReportFiles, config: dict[str, Any], provenance: dict[str, Any]
) -> tuple[str, dict]:
    """The HTML text and the metrics.json dict of the run, from ``files`` only."""
    files.check()
    run = RunResults(files, config)
    metrics = run.headline()
    metrics["checks"] = run_checks(files, config, run.backbones)
    metrics["provenance"] = provenance
    metrics["decision"] = decided_by(files, config, run.backbones)
    parts: list[str] = []
    add = parts.append
    ens, paper = metrics["classification"]["ensemble"], PAPER["classification"]
    decision = decided_by_html(metrics["decision"], ens, paper)  # which detector decided
    add(
        f"<h1>Brain MRI tumor classification and segmentation</h1>"
        f"<p class=note>Recipe <b>{esc(config.get('recipe', 'custom'))}</b> · "
        f"results directory <code>{esc(Path(config['results_dir']))}</code> · data source "
        f"<b>{esc(config['data']['source'])}</b> · split level "
        f"<b>{esc(config['split']['level'])}</b>"
        f" · seed {esc(config['seed'])} · {esc(provenance['date'])}</p>"
    )
    add(
        '<p class=toc><a href="#checks">Checks</a><a href="#data">Data</a>'
        '<a href="#classification">Classification</a>'
        '<a href="#segmentation">Segmentation</a><a href="#cascade">Cascade</a>'
        '<a href="#paper">Paper vs this run</a><a href="#runtime">Run time</a>'
        '<a href="#provenance">Provenance</a></p>'
    )

    add('<h2 id="checks">Checks</h2>')
    add(checks_html(metrics["checks"]))

    # Paper comparison first: the headline.
    rows = [
        ["classification: ensemble accuracy", paper["ensemble_accuracy"], ens["accuracy"]],
        ["classification: tumor F1", paper["tumor_f1"], ens["tumor_f1"]],
        ["classification: test slices", paper["test_slices"], ens["test_slices"]],
    ]
    for arch, s in metrics["segmentation"].items():
        rows.append(
            [
                f"segmentation: {arch} test Dice (tumor slices, mean over folds)",
                PAPER["segmentation_test_dice"].get(s["arch"]),
                s["test"]["dice"]["mean"],
            ]
        )
        rows.append(
            [
                f"segmentation: {arch} per-patient volume Dice (Buda et al.)",
                PAPER["buda_volume_dice"],
                s["test"]["volume_dice"]["mean"],
            ]
        )
    add('<h2 id="paper">Paper vs this run</h2>')
    add(paper_note_html(metrics["checks"]["paper"]) + decision)
    # object dtype: counts stay integers (786, not 786.000) beside the fractions.
    add(table_html(pd.DataFrame(rows, columns=["metric", "paper", "this run"], dtype=object)))
    add(
        f"<p class=note>The paper split slices at random (slice level); this run splits at the "
        f"<b>{esc(config['split']['level'])}</b> level, so slices of one patient "
        f"{'never ' if config['split']['level'] == 'patient' else ''}cross train and test.</p>"
    )

    # Data.
    add('<h2 id="data">Data</h2>')
    summary = pd.read_csv(files.path("split_summary"), sep="\t", keep_default_na=False)
    add(table_html(summary))
    add(_examples(files))

    # Classification.
    add('<h2 id="classification">Classification (LGG test set)</h2>' + decision)
    overview = pd.DataFrame(
        [
            [m, v["accuracy"], v["tumor_precision"], v["tumor_recall"], v["tumor_f1"], v["roc_auc"]]
            for m, v in metrics["classification"].items()
        ],
        columns=["model", "accuracy", "tumor precision", "tumor recall", "tumor F1", "ROC AUC"],
    )
    add(table_html(overview))
    for model in [*run.backbones, "ensemble"]:
        add(f"<h3>{esc(model)}</h3><div class=grid><div>")
        table = files.path("classification_report", model)
        add(table_html(pd.read_csv(table, sep="\t", keep_default_na=False)))
        matrix = files.path("confusion_matrix", model)
        add("</div><div>" + image_html(matrix, f"{model} confusion matrix", 260) + "</div></div>")
        add(image_html(files.path("errors", model), f"{model} errors"))
    add("<h3>Training curves</h3>")
    histories = {b: files.path("classifier_history", b) for b in run.backbones}
    add(_history_curves(histories, "accuracy", "classifiers"))

    # Segmentation.
    add('<h2 id="segmentation">Segmentation</h2>')
    add(
        "<p class=note>Per-slice metrics on tumor-containing slices as in the paper "
        "(HD and ASSD in "
        "pixels), mean over a fold's slices, then mean ± std over the folds. Empty masks: both "
        "empty → Dice 1, HD 0; one empty → Dice 0, HD = ASSD = image diagonal.</p>"
    )
    for name, table in (
        ("Table 1: validation folds", "table1_validation"),
        ("Table 2: test set", "table2_test"),
    ):
        add(f"<h3>{name}</h3>")
        path = files.path("segmentation_tables", table)
        add(table_html(pd.read_csv(path, sep="\t", keep_default_na=False)))
    add("<h3>Overlays (test slices; worst first)</h3>")
    add(image_html(files.path("overlays"), "overlays"))
    for arch in run.architectures:
        paths = {
            f"fold{k}": files.path("segmenter_history", f"{arch}/fold{k}") for k in range(run.folds)
        }
        add(f"<h3>Training curves: {esc(arch)}</h3>")
        add(_history_curves(paths, "dice_tumor_slices", arch))

    # Cascade.
    add('<h2 id="cascade">Classify-then-segment cascade</h2>')
    add(
        f"<p>The ensemble ({esc(metrics['decision']['detector'])}) gates the "
        f"<b>{esc(run.cascade['architecture'])}</b> fold ensemble on "
        f"all {esc(run.cascade['n_slices'])} test slices (tumor and tumor-free).</p>"
    )
    add(table_html(pd.read_csv(files.path("cascade_table"), sep="\t")))
    gate = run.cascade["cascade"]["gate"]
    add(
        f"<p>The gate dropped {esc(gate['tumor_slices_dropped'])} tumor slices, "
        f"{100 * gate['tumor_area_lost_fraction']:.1f}% of the test tumor area.</p>"
    )
    add("<h3>Tumor volume per test patient (voxels at the preprocessed size)</h3>")
    ensembles = {arch: files.path("ensemble_per_slice", arch) for arch in run.architectures}
    volumes = patient_volumes(ensembles, files.path("cascade_per_slice"))
    add(table_html(volume_rows(volumes), 2))

    # Run time and provenance.
    add('<h2 id="runtime">Run time per job</h2>')
    add(table_html(_benchmarks(files.named("benchmarks")), 1))
    add('<h2 id="provenance">Provenance</h2>')
    trained_on = training_devices(files.listed("devices")) or ["unknown"]
    prov = [
        ["date", provenance["date"]],
        ["git commit", provenance["git_commit"]],
        ["training device(s)", "; ".join(trained_on)],
        ["report device", provenance["device"]],
        ["platform", provenance["platform"]],
    ]
    prov += [[k, v] for k, v in provenance["packages"].items()]
    add(table_html(pd.DataFrame(prov, columns=["", "value"])))
    add(f"<h3>Configuration</h3><pre>{esc(json.dumps(config, indent=2, sort_keys=True))}</pre>")
    body = "\n".join(parts)
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Brain MRI report"
        f"</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n"
    )
    return page, metrics
