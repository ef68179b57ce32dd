"""Training curves as PNG: loss, DPO reward margin, chosen rate and judge score per candidate source."""

from __future__ import annotations

import json
from pathlib import Path

from sip.records import SOURCES


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so early points are not pulled toward later ones."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(metrics_path: Path, out_path: Path, window: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)

    def curve(ax, key, label):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, alpha=0.3, color="tab:blue")
            ax.plot(xs, smooth(list(ys), window), color="tab:blue", label=label)
        ax.set_title(label)
        ax.set_xlabel("step")

    curve(axes[0][0], "loss", "loss")
    curve(axes[0][1], "reward_margin", "DPO reward margin")
    for source in SOURCES:
        axes[1][0].plot(steps, smooth([r["chosen_rate"][source] for r in rows], window), label=source)
        scored = [(r["step"], r["judge_score"][source]) for r in rows if source in r["judge_score"]]
        if scored:
            xs, ys = zip(*scored)
            axes[1][1].plot(xs, smooth(list(ys), window), label=source)
    axes[1][0].set_title(f"chosen rate per source ({window}-step mean)")
    axes[1][1].set_title(f"mean judge score per source ({window}-step mean)")
    for ax in axes[1]:
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
