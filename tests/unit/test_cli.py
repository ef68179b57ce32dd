"""The `sip` command line as a user runs it (a real subprocess): every message shows the user's
text verbatim, in colour where the terminal takes it, with a clean exit code and no traceback."""

import os
import subprocess
import sys

import pytest


def sip(*args, color=False):
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    if color:
        env["FORCE_COLOR"] = "1"
    return subprocess.run([sys.executable, "-m", "sip.train", *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_nll_message_shows_the_bracketed_candidate_lists():
    done = sip("train", "train.objective=nll")
    assert done.returncode == 2
    assert "set train.candidates to [suffix] or [rewrite]" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["config", ":smile:[/red].x=1"], ":smile:[/red]: Extra inputs are not permitted"),
        (["train", "--config", "missing[/red][bold].yaml"], "cannot read config file missing[/red][bold].yaml"),
        (["config", "run.name=[/red]x"], "cannot parse value '[/red]x'"),
        (["eval", "--model", "no[/red]where"], "no[/red]where is not a Hugging Face model folder"),
        (["train", "--bo[/red]gus"], "No such option: --bo[/red]gus"),  # typer's own usage errors
    ],
)
def test_an_error_holding_markup_prints_it_and_exits_2(args, shown):
    done = sip(*args)
    assert done.returncode == 2, done.stderr
    assert shown in done.stderr
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr


def test_errors_keep_their_colour():
    done = sip("train", "train.objective=nll", color=True)
    assert done.returncode == 2
    assert "\x1b[31m" in done.stderr and "[suffix] or [rewrite]" in done.stderr


def test_sip_config_prints_markup_like_values_verbatim():
    done = sip("config", 'run.name="[bold]x[/bold] :smile:"')
    assert done.returncode == 0, done.stderr
    assert "name: '[bold]x[/bold] :smile:'" in done.stdout
