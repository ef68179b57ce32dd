"""The `sip` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sip.train.config import ConfigError, SipConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-Improving Pretraining on Ray.")
console = Console(stderr=True)


def resolve_config(config: Optional[Path], overrides: list[str], output_dir: Optional[Path]) -> SipConfig:
    if output_dir is not None:
        overrides = [*overrides, f"run.output_dir={output_dir}"]
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@app.command()
def train(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="section.field=value, e.g. train.objective=nll")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="where outputs go")] = None,
) -> None:
    """Train a policy with Self-Improving Pretraining (the built-in world by default)."""
    cfg = resolve_config(config, overrides or [], output_dir)
    from sip.train.pipeline import PipelineError, run_training

    try:
        summary = run_training(cfg)
    except PipelineError as err:
        console.print(f"[red]sip train failed: {err}[/red]")
        raise typer.Exit(1) from None
    console.print_json(json.dumps({k: summary[k] for k in ("steps", "train_seconds", "samples", "final", "eval") if k in summary}))
    console.print(f"outputs in [bold]{cfg.run.output_dir}[/bold]")


@app.command("config")
def show_config(
    overrides: Annotated[Optional[list[str]], typer.Argument()] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None,
) -> None:
    """Print the resolved config (defaults + file + overrides) without running anything."""
    from sip.train.config import dump_config

    print(dump_config(resolve_config(config, overrides or [], None)), end="")


def main() -> None:
    app()
