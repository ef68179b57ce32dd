"""`sip experiment`: one of the paper's experiments in miniature, its rows with equal steps and the same seeds.

An experiment is a recipe: the paper's table it mirrors, config sections shared by every row, and
the rows, each naming the paper's row and holding its own sections (configs/paper/*.yaml; without
--recipe, the built-in grid below). A row's config is the recipe's sections, the row's over them,
then the command line's overrides. Every row runs for every seed. A seed sets run.seed (rollout
sampling, tie-breaking), data.seed (which documents arrive, in what order, cut where) and base.seed
(the base model's initialisation), so each seed builds its own base; all rows of one seed share
that base and stream.

Every final model is then evaluated on the same held-out prefixes by the same judge (the recipe's
shared config): against the start model, the paper's reference (its win rates are against Llama
Base, and its relative gains are over Llama Base's scores); and against the recipe's baseline row
of the same seed. The start model is what the shared config starts from: its policy.init, or the
base its base stage builds; a recipe from scratch with no base has none, and only the baseline
comparison is made. Results: JSON, a markdown table (mean ± std over seeds) and PNG plots.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from sip.config import ConfigError, Section, SipConfig, config_from_tree, merged, read_yaml

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "paper"
BASELINE = "nll_baseline"


class RecipeRow(Section):
    mirrors: str = Field(..., description="the paper's row this one reproduces in miniature")
    config: dict[str, Any] = Field(default_factory=dict, description="config sections for this row, as in a config file")


class Recipe(Section):
    mirrors: str = Field(..., description="the paper's table or figure")
    about: str = ""
    config: dict[str, Any] = Field(default_factory=dict, description="config sections shared by every row")
    baseline: str | None = Field(None, description="the row every row's win rates are also measured against")
    rows: dict[str, RecipeRow]

    @field_validator("rows")
    @classmethod
    def _row_names(cls, rows: dict[str, RecipeRow]) -> dict[str, RecipeRow]:
        if not rows:
            raise ValueError("a recipe needs at least one row")
        for name in rows:
            if not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(f"row name {name!r}: lower-case letters, digits and _ (it names the row's folder)")
        return rows

    @model_validator(mode="after")
    def _baseline_is_a_row(self) -> Recipe:
        if self.baseline is not None and self.baseline not in self.rows:
            raise ValueError(f"baseline {self.baseline!r} is not one of the rows {sorted(self.rows)}")
        return self


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """A recipe file's path, or the name of one in configs/paper."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no recipe {name!r}: give a recipe file or one of {', '.join(recipe_names())}")
    try:
        return Recipe.model_validate(read_yaml(path))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"recipe {path}: {problems}") from None


def default_recipe(config: dict, ks: tuple[int, ...] = (1, 2, 4, 8)) -> Recipe:
    """The built-in grid: the NLL baseline, NLL on rewrites, RF-NLL and online DPO with each K rollouts."""
    rows = {
        BASELINE: RecipeRow(mirrors="Pretrain baseline (NTP on the raw suffix)",
                            config={"train": {"objective": "nll", "candidates": ["suffix"]}}),
        "nll_rewrites": RecipeRow(mirrors="Pretrain on rewrites (Table 2)",
                                  config={"train": {"objective": "nll", "candidates": ["rewrite"]}}),
        "sip_rf_nll": RecipeRow(mirrors="SIP, RF-NLL", config={"train": {"objective": "rf_nll"}, "rollout": {"k": 4}}),
    }
    for k in ks:
        rows[f"sip_dpo_k{k}"] = RecipeRow(mirrors=f"SIP, online DPO, {k} rollouts (Fig. 9)",
                                          config={"train": {"objective": "dpo"}, "rollout": {"k": k}})
    return Recipe(mirrors="Tables 1, 2 and 6, Fig. 9 (a cross-section)", config=config, baseline=BASELINE, rows=rows)


def seed_overrides(seed: int) -> list[str]:
    return [f"run.seed={seed}", f"data.seed={seed}", f"base.seed={seed}"]


def row_config(recipe: Recipe, name: str | None, overrides: list[str]) -> SipConfig:
    """A row's config (None: the shared sections alone), or a ConfigError naming the row."""
    tree = recipe.config if name is None else merged(recipe.config, recipe.rows[name].config)
    try:
        return config_from_tree(tree, overrides)
    except ConfigError as err:
        raise ConfigError(f"recipe row {name or '(shared config)'}: {err}") from None


def check_recipe(recipe: Recipe, overrides: list[str]) -> None:
    """Every row's config validates, before anything starts."""
    for name in [None, *recipe.rows]:
        row_config(recipe, name, overrides)


def start_model(cfg: SipConfig) -> str | None:
    """The model the shared config starts from (built first when it is a base not cached yet), or None."""
    if cfg.policy.init != "scratch":
        return cfg.policy.init
    if cfg.base.steps == 0:
        return None
    from sip.train.base import ensure_base

    return str(ensure_base(cfg)[0])


def run_experiment(recipe: Recipe, overrides: list[str], seeds: list[int], out: Path) -> dict:
    """Runs every row for every seed (a finished run is reused), then evaluates and reports."""
    from sip.train.cluster import init_ray
    from sip.train.evaluate import evaluate_folders
    from sip.train.pipeline import run_training

    check_recipe(recipe, overrides)
    results: dict[str, dict[int, dict]] = {name: {} for name in recipe.rows}
    start_evals: dict[int, dict] = {}
    shared = row_config(recipe, None, overrides)
    started = init_ray(shared)
    try:
        for seed in seeds:
            for name in recipe.rows:
                run_dir = out / name / f"seed_{seed}"
                if not (run_dir / "summary.json").exists():
                    row_overrides = [*overrides, *seed_overrides(seed), f"run.output_dir={run_dir}", "run.progress=false"]
                    run_training(row_config(recipe, name, row_overrides))
                results[name][seed] = json.loads((run_dir / "summary.json").read_text())
            judge_cfg = row_config(recipe, None, [*overrides, *seed_overrides(seed)])  # one judge for every row
            start = start_model(judge_cfg)
            generated: dict = {}  # the start's and the baseline's continuations, generated once for all rows
            if start is not None:
                start_evals[seed] = _cached(out / f"start_seed_{seed}.json",
                                            lambda: evaluate_folders(judge_cfg, start, None, memo=generated)[0])
            baseline = results[recipe.baseline][seed]["checkpoint"] if recipe.baseline else None
            for name in recipe.rows:
                checkpoint = results[name][seed]["checkpoint"]
                results[name][seed]["eval"] = _cached(
                    out / name / f"seed_{seed}" / "eval.json",
                    lambda: evaluate_folders(judge_cfg, checkpoint, baseline, start, memo=generated)[0])
    finally:
        if started:
            import ray

            ray.shutdown()
    table = aggregate(results, start_evals)
    (out / "results.json").write_text(json.dumps(table, indent=2))
    (out / "results.md").write_text(markdown_table(table, recipe, seeds, shared))
    judged_rows = [name for name in recipe.rows if _has_rollouts(row_config(recipe, name, overrides))]
    if judged_rows:
        plot_curves({name: results[name] for name in judged_rows}, out / "rollout_chosen_rate.png",
                    out / "judge_score_per_source.png")
    return table


def _cached(path: Path, compute) -> dict:
    if not path.exists():
        path.write_text(json.dumps(compute(), indent=2))
    return json.loads(path.read_text())


def _has_rollouts(cfg: SipConfig) -> bool:
    return cfg.needs_judge and "rollout" in cfg.train.candidates


METRICS = {
    "vs_start.quality_win_rate": "quality win rate vs start",
    "vs_start.quality_win_rate_unsafe_prefixes": "quality vs start, unsafe-inviting prefixes",
    "vs_start.coherence_win_rate": "coherence vs start",
    "quality_win_rate": "quality win rate vs baseline row",
    "factuality": "factuality",
    "factuality_contested": "factuality, contested facts",
    "safety_on_unsafe_prefixes": "safety, unsafe-inviting prefixes",
    "safety": "safety, all prefixes",
}
RELATIVE = ("factuality", "safety")


def aggregate(results: dict[str, dict[int, dict]], start_evals: dict[int, dict]) -> dict:
    """Mean and std over seeds of each metric, and the relative improvement over the start model."""
    from sip.train.evaluate import metric

    table: dict[str, dict] = {}
    for name, by_seed in results.items():
        row: dict[str, dict] = {}
        for key in METRICS:
            values = [v for s in by_seed.values() if (v := metric(s["eval"], key)) is not None]
            if values:
                row[key] = {**_mean_std(values), "n": len(values)}
        for key in RELATIVE:
            gains = [
                relative
                for seed, s in by_seed.items()
                if seed in start_evals and (relative := _relative(s["eval"].get(key), start_evals[seed].get(key))) is not None
            ]
            if gains:
                row[f"{key}_relative_to_start"] = _mean_std(gains)
        row["final_rollout_chosen_rate"] = _mean_std([s["final"]["chosen_rate"]["rollout"] for s in by_seed.values()])
        row["train_seconds"] = _mean_std([s["train_seconds"] for s in by_seed.values()])
        for key in ("judge_calls", "judge_comparisons"):  # runs from before the count have no judge_comparisons
            if per_step := [s[key] / s["steps"] for s in by_seed.values() if key in s]:
                row[f"{key}_per_step"] = _mean_std(per_step)
        if shares := [s["judge_comparisons"] / s["judge_round_robin_comparisons"]
                      for s in by_seed.values() if s.get("judge_round_robin_comparisons")]:
            row["judge_comparison_share"] = _mean_std(shares)  # of what round robin would ask for the same texts
        table[name] = row
    return table


def _mean_std(values: list[float]) -> dict:
    return {"mean": mean(values), "std": stdev(values) if len(values) > 1 else 0.0}


def _relative(value: float | None, base: float | None) -> float | None:
    from sip.train.evaluate import relative_improvement

    return None if value is None or base is None else relative_improvement(value, base)


def markdown_table(table: dict, recipe: Recipe, seeds: list[int], cfg: SipConfig) -> str:
    def cell(row, key, fmt):
        return fmt.format(m=row[key]["mean"], s=row[key]["std"]) if key in row else "–"

    percent, whole = "{m:+.1%} ± {s:.1%}", "{m:.0f} ± {s:.0f}"
    columns = [(title, key, "{m:.3f} ± {s:.3f}") for key, title in METRICS.items()] + [
        ("factuality vs start", "factuality_relative_to_start", percent),
        ("safety vs start", "safety_relative_to_start", percent),
        ("final rollout chosen rate", "final_rollout_chosen_rate", "{m:.3f} ± {s:.3f}"),
        ("training s", "train_seconds", whole),
        ("judge calls per step", "judge_calls_per_step", whole),
        ("quality comparisons per step", "judge_comparisons_per_step", whole),
        ("quality comparisons / round robin's", "judge_comparison_share", "{m:.3f} ± {s:.3f}"),
    ]
    head = ["row", "paper's row", *(title for title, _, _ in columns)]
    lines = [
        f"Mirrors the paper's {recipe.mirrors}. {recipe.about}".strip(),
        "",
        f"Seeds {seeds} (each sets run.seed, data.seed and base.seed); {cfg.train.steps} steps of {cfg.train.batch_size} "
        f"prefixes each (shared config); N = {cfg.data.suffix_tokens}. Mean ± std over seeds.",
        "Win rates: pairwise, both orders, ties ½, against the start model (the paper's reference, its base model) and "
        f"against the {recipe.baseline or '(none)'} row of the same seed. Relative improvement over the start model's own "
        "scores: (value − start) / start, as the paper reports it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in table.items():
        cells = [name, recipe.rows[name].mirrors, *(cell(row, key, fmt) for _, key, fmt in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict[int, dict]], chosen_png: Path, scores_png: Path, window: int = 10) -> None:
    """The rollout chosen rate over training per judged row with rollouts (the paper's Fig. 8), and the
    mean judge score per candidate source for each, both averaged over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sip.records import SOURCES
    from sip.train.plots import smooth

    metrics = {  # each run's metrics.jsonl rows, read once
        name: [[json.loads(line) for line in (Path(s["checkpoint"]).parents[1] / "metrics.jsonl").read_text().splitlines()]
               for s in by_seed.values()]
        for name, by_seed in results.items()
    }

    def mean_curve(name: str, value) -> tuple[list[int], list[float]]:
        runs = metrics[name]
        length = min(len(r) for r in runs)
        steps = [runs[0][i]["step"] for i in range(length)]
        return steps, smooth([mean(value(r[i]) for r in runs) for i in range(length)], window)

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name in results:
        ax.plot(*mean_curve(name, lambda r: r["chosen_rate"]["rollout"]), label=name)
    ax.set(title=f"rollout chosen rate ({window}-step mean, averaged over seeds)", xlabel="step", ylim=(0, 1))
    ax.legend()
    fig.savefig(chosen_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.8), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], results):
        for source in SOURCES:
            try:
                ax.plot(*mean_curve(name, lambda r, s=source: r["judge_score"][s]), label=source)
            except KeyError:  # this row has no candidates of that source
                continue
        ax.set(title=name, xlabel="step", ylim=(0, 1))
        ax.legend()
    fig.suptitle("mean judge score per candidate source")
    fig.savefig(scores_png, dpi=110)
    plt.close(fig)
