"""`sip experiment`: the paper's comparisons in miniature, with equal steps and the same seeds.

Variants (Table 1 / Table 6 / Fig. 9 of the paper): the NLL pretraining baseline, NLL on rewrites,
SIP with RF-NLL, SIP with online DPO, and online DPO with K ∈ {1, 2, 4, 8} rollouts. Each runs for
every seed. A seed sets run.seed (rollout sampling, tie-breaking), data.seed (which documents
arrive, in what order, cut where) and base.seed (the base model's initialisation), so each seed
builds its own base; all variants of one seed share that base and stream. Every final model is
then evaluated, on the same held-out prefixes, against the NLL baseline of its seed. The results are written as JSON, a markdown table (mean ± std over seeds, relative
improvement over the base model as the paper computes it) and PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean, stdev

from sip.config import SipConfig, load_config

BASELINE = "nll_baseline"


def variants(ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, list[str]]:
    grid = {
        BASELINE: ["train.objective=nll", "train.candidates=[suffix]"],
        "nll_rewrites": ["train.objective=nll", "train.candidates=[rewrite]"],
        "sip_rf_nll": ["train.objective=rf_nll", "rollout.k=4"],
    }
    for k in ks:
        grid[f"sip_dpo_k{k}"] = ["train.objective=dpo", f"rollout.k={k}"]
    return grid


def seed_overrides(seed: int) -> list[str]:
    return [f"run.seed={seed}", f"data.seed={seed}", f"base.seed={seed}"]


METRICS = {
    "quality_win_rate": "quality win rate vs NLL baseline",
    "coherence_win_rate": "coherence win rate vs NLL baseline",
    "factuality": "factuality",
    "factuality_contested": "factuality, contested facts",
    "safety_on_unsafe_prefixes": "safety, unsafe-inviting prefixes",
    "safety": "safety, all prefixes",
}
RELATIVE = ("factuality", "safety")


def run_experiment(config: Path | None, overrides: list[str], seeds: list[int], out: Path,
                   ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Runs every variant for every seed (a finished run is reused), then evaluates and reports."""
    from sip.train.evaluate import evaluate_folders
    from sip.train.cluster import init_ray
    from sip.train.pipeline import run_training

    grid = variants(ks)
    results: dict[str, dict[int, dict]] = {name: {} for name in grid}
    base_evals: dict[int, dict] = {}
    cfg = load_config(config, overrides)
    started = init_ray(cfg)
    try:
        for seed in seeds:
            for name, extra in grid.items():
                run_dir = out / name / f"seed_{seed}"
                summary_path = run_dir / "summary.json"
                if not summary_path.exists():
                    run_overrides = [*overrides, *extra, *seed_overrides(seed), f"run.output_dir={run_dir}", "run.progress=false"]
                    run_training(load_config(config, run_overrides))
                results[name][seed] = json.loads(summary_path.read_text())
            base_evals[seed] = results[BASELINE][seed]["eval_initial"]
            baseline_model = results[BASELINE][seed]["checkpoint"]
            for name in grid:
                eval_path = out / name / f"seed_{seed}" / "eval_vs_baseline.json"
                if not eval_path.exists():
                    run_cfg = load_config(config, [*overrides, *grid[name]])
                    summary, _ = evaluate_folders(run_cfg, results[name][seed]["checkpoint"], baseline_model)
                    eval_path.write_text(json.dumps(summary, indent=2))
                results[name][seed]["eval_vs_baseline"] = json.loads(eval_path.read_text())
    finally:
        if started:
            import ray

            ray.shutdown()
    table = aggregate(results, base_evals)
    (out / "results.json").write_text(json.dumps(table, indent=2))
    (out / "results.md").write_text(markdown_table(table, seeds, cfg))
    plot_curves(results, out / "rollout_chosen_rate.png", out / "judge_score_per_source.png")
    return table


def aggregate(results: dict[str, dict[int, dict]], base_evals: dict[int, dict]) -> dict:
    """Mean and std over seeds of each metric, and the relative improvement over the base model."""
    table: dict[str, dict] = {}
    for name, by_seed in results.items():
        row: dict[str, dict] = {}
        for key in METRICS:
            values = [s["eval_vs_baseline"][key] for s in by_seed.values() if s["eval_vs_baseline"].get(key) is not None]
            if values:
                row[key] = {**_mean_std(values), "n": len(values)}
        for key in RELATIVE:
            gains = [
                relative
                for seed, s in by_seed.items()
                if (relative := _relative(s["eval_vs_baseline"].get(key), base_evals[seed].get(key))) is not None
            ]
            if gains:
                row[f"{key}_relative_to_base"] = _mean_std(gains)
        row["final_rollout_chosen_rate"] = _mean_std([s["final"]["chosen_rate"]["rollout"] for s in by_seed.values()])
        table[name] = row
    return table


def _mean_std(values: list[float]) -> dict:
    return {"mean": mean(values), "std": stdev(values) if len(values) > 1 else 0.0}


def _relative(value: float | None, base: float | None) -> float | None:
    from sip.train.evaluate import relative_improvement

    return None if value is None or base is None else relative_improvement(value, base)


def markdown_table(table: dict, seeds: list[int], cfg: SipConfig) -> str:
    def cell(row, key, percent=False):
        if key not in row:
            return "–"
        m, s = row[key]["mean"], row[key]["std"]
        return f"{100 * m:+.1f}% ± {100 * s:.1f}" if percent else f"{m:.3f} ± {s:.3f}"

    head = ["variant", *METRICS.values(), "factuality vs base", "safety vs base", "final rollout chosen rate"]
    lines = [
        f"Seeds {seeds} (each sets run.seed, data.seed and base.seed); {cfg.train.steps} steps of {cfg.train.batch_size} prefixes each; N = {cfg.data.suffix_tokens}.",
        "Mean ± std over seeds. Win rates: pairwise against the NLL baseline of the same seed, both orders, ties ½.",
        "Relative improvement over the base model: (value − base) / base, as the paper reports it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in table.items():
        cells = [name, *(cell(row, k) for k in METRICS), cell(row, "factuality_relative_to_base", True),
                 cell(row, "safety_relative_to_base", True), cell(row, "final_rollout_chosen_rate")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict[int, dict]], chosen_png: Path, scores_png: Path, window: int = 10) -> None:
    """The rollout chosen rate over training per SIP variant (the paper's Fig. 8), and the mean judge
    score per candidate source for each SIP variant, both averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sip.train.plots import smooth
    from sip.records import SOURCES

    sip_variants = [n for n in results if n.startswith("sip_")]
    metrics = {  # each run's metrics.jsonl rows, read once
        name: [[json.loads(line) for line in (Path(s["checkpoint"]).parents[1] / "metrics.jsonl").read_text().splitlines()]
               for s in results[name].values()]
        for name in sip_variants
    }

    def mean_curve(name: str, value) -> tuple[list[int], list[float]]:
        runs = metrics[name]
        length = min(len(r) for r in runs)
        steps = [runs[0][i]["step"] for i in range(length)]
        return steps, smooth([mean(value(r[i]) for r in runs) for i in range(length)], window)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name in sip_variants:
        ax.plot(*mean_curve(name, lambda r: r["chosen_rate"]["rollout"]), label=name)
    ax.set(title=f"rollout chosen rate ({window}-step mean, averaged over seeds)", xlabel="step", ylim=(0, 1))
    ax.legend()
    fig.savefig(chosen_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(sip_variants), figsize=(4 * len(sip_variants), 3.8), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], sip_variants):
        for source in SOURCES:
            try:
                ax.plot(*mean_curve(name, lambda r, s=source: r["judge_score"][s]), label=source)
            except KeyError:  # this variant has no candidates of that source
                continue
        ax.set(title=name, xlabel="step", ylim=(0, 1))
        ax.legend()
    fig.suptitle("mean judge score per candidate source")
    fig.savefig(scores_png, dpi=110)
    plt.close(fig)
