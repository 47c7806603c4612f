"""`seer report RUN_DIR`: plots and a markdown summary of a pretraining run, from its metrics.jsonl and config.yaml.

Writes into RUN_DIR: loss.png (loss, ln K, learning rate), throughput.png, prototypes.png (when the run logged
prototype usage), knn.png (when it logged online kNN) and report.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from engine.config import prototype_heads
from engine.training.metrics import plot_loss, plot_series, run_records, uniform_loss


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and RUN_DIR/report.md; returns the path of report.md."""
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    for path in (metrics_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: RUN_DIR must be a pretraining output folder (train.output_dir)")
    records = run_records(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no training records yet (one is written every train.log_every steps)")
    config = yaml.safe_load(config_path.read_text())
    heads = prototype_heads(config["model"]["num_prototypes"])
    k = heads[0]  # usage fields without a _head suffix are the one head's
    steps = [r["step"] for r in records]

    def series(key: str) -> tuple[list[int], list[float]]:
        kept = [r for r in records if key in r]
        return [r["step"] for r in kept], [r[key] for r in kept]

    plots = {"loss and learning rate": plot_loss(records, run_dir / "loss.png", heads),
             "throughput": plot_series(run_dir / "throughput.png", {"images/s": series("img_per_s")}, "images / s")}
    if "proto_used" in records[-1]:
        used_steps, entropies = series("proto_entropy")
        plots["prototype usage"] = plot_series(
            run_dir / "prototypes.png",
            {"prototypes assigned at least once": series("proto_used"),
             "effective number, exp(entropy)": (used_steps, [math.exp(h) for h in entropies])},
            "prototypes (nearest of an assigned crop)", reference=(k, f"K = {k}"))
    knn_steps, knn = series("knn_top1")
    if knn:
        plots["online kNN top-1"] = plot_series(run_dir / "knn.png", {"online kNN top-1": (knn_steps, knn)}, "top-1")

    first, last = records[0], records[-1]
    ln_k = uniform_loss(heads)
    # Overall images/s: each window's time is its steps / its rate (up to the global batch, which cancels).
    windows = [step - previous for previous, step in zip([0, *steps[:-1]], steps)]
    mean_rate = sum(windows) / sum(w / r["img_per_s"] for w, r in zip(windows, records))
    if "images_seen" in last:
        images = f"{last['images_seen']:,}"
    else:  # runs logged before images_seen existed: one rank assumed
        images = f"{last['step'] * config['train']['batch_size']:,} (step x train.batch_size: one rank assumed)"
    rows = [
        ("steps logged", f"{steps[0]} - {steps[-1]} ({len(records)} records; {config['train']['steps']} planned)"),
        (f"loss at step {first['step']}", f"{first['loss']:.4f} ({first['loss'] / ln_k:.3f} ln K)"),
        (f"loss at step {last['step']}", f"{last['loss']:.4f} ({last['loss'] / ln_k:.3f} ln K)"),
        ("ln K", f"{ln_k:.4f} (K = {heads} prototypes: the loss of uniform predictions)"),
        ("images seen", images),
        ("throughput over the run", f"{mean_rate:,.0f} images/s"),
    ]
    if "data_time_share" in last:
        rows.append(("time waiting for data", f"{sum(r['data_time_share'] for r in records) / len(records):.1%}"))
    if "proto_used" in last:
        rows.append((f"prototype usage at step {last['step']}",
                     f"{last['proto_used']} of {k} assigned, effectively {math.exp(last['proto_entropy']):.1f}"))
    if knn:
        best = max(range(len(knn)), key=knn.__getitem__)
        rows.append(("online kNN top-1", f"{knn[-1]:.2%} at step {knn_steps[-1]} (best {knn[best]:.2%} at step "
                                         f"{knn_steps[best]})"))
    flagged = [r for r in records if r.get("collapse")]
    if "collapse" in last:
        rows.append(("collapse", "not flagged" if not flagged else
                     f"flagged in {len(flagged)} of {len(records)} windows, first at step {flagged[0]['step']}"))

    model = config["model"]
    lines = [f"# Pretraining report: {run_dir}", "",
             f"{model['backbone']} backbone, {k} prototypes, {config['train']['batch_size']} images per rank per step, "
             f"commit {config.get('git_commit') or 'unknown'}.", "",
             "| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows), ""]
    if flagged:
        at = flagged[0]
        lines += [f"**Warning: training looks collapsed** from step {at['step']}: loss {at['loss']:.3f} = "
                  f"{at['loss_over_ln_k']:.3f} ln K, crops effectively on {math.exp(at['proto_entropy']):.1f} of {k} "
                  f"prototypes (thresholds: the monitor section of the config).", ""]
    lines += [f"![{title}]({path.name})" for title, path in plots.items()]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
