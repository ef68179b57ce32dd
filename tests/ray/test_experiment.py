"""`sip experiment` with a recipe, end to end on a local Ray cluster: every row runs for the seed, each
final model is evaluated against the start model (the base the shared config builds) and the
baseline row, and a finished experiment is reused rather than run again."""

import json

import pytest

from helpers import TINY
from sip.train.experiment import load_recipe, run_experiment

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster"), pytest.mark.filterwarnings("ignore")]

RECIPE = """
mirrors: "a test table"
config:
  judge: {weights: {quality: 1.0, safety: 1.0, factuality: 0.0}}
baseline: ntp
rows:
  ntp:
    mirrors: "the NTP row"
    config: {train: {objective: nll, candidates: [suffix]}}
  sip:
    mirrors: "the SIP row"
    config: {train: {objective: dpo, candidates: [suffix, rollout]}}
"""


def test_a_recipe_runs_its_rows_and_reports_against_the_start_model(tmp_path, monkeypatch):
    from sip.train.evaluate import ModelFolder

    generated = []  # the folder of every greedy generation the evaluation ran
    greedy_texts = ModelFolder.greedy_texts
    monkeypatch.setattr(ModelFolder, "greedy_texts",
                        lambda self, cfg, prompts, **kw: generated.append(self.model.name_or_path) or greedy_texts(self, cfg, prompts, **kw))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    overrides = [*TINY, "train.steps=2", "base.steps=3", "base.batch_size=4", f"base.cache_dir={tmp_path / 'bases'}"]
    out = tmp_path / "experiment"
    table = run_experiment(load_recipe(str(path)), overrides, [0], out)
    assert set(table) == {"ntp", "sip"}
    assert len(generated) == len(set(generated)) == 3, "the start, the baseline row and the SIP row each generate once"
    for row in table.values():
        assert 0 <= row["vs_start.quality_win_rate"]["mean"] <= 1 and "factuality_relative_to_start" in row
    assert table["ntp"]["quality_win_rate"]["mean"] == 0.5, "the baseline row against itself ties"
    assert table["ntp"]["judge_calls_per_step"]["mean"] == 0 < table["sip"]["judge_comparisons_per_step"]["mean"]
    assert table["sip"]["judge_calls_per_step"]["mean"] >= table["sip"]["judge_comparisons_per_step"]["mean"]
    assert table["sip"]["judge_comparison_share"]["mean"] == 1.0  # round robin asks every pair of distinct texts
    start = json.loads((out / "start_seed_0.json").read_text())
    assert start["prompts"] == 14 and "vs_start" not in start
    assert json.loads((out / "sip" / "seed_0" / "summary.json").read_text())["base"]["steps"] == 3
    report = (out / "results.md").read_text()
    assert "Mirrors the paper's a test table" in report and "| sip | the SIP row |" in report
    assert (out / "rollout_chosen_rate.png").exists()
    stamp = (out / "sip" / "seed_0" / "eval.json").stat().st_mtime_ns
    assert run_experiment(load_recipe(str(path)), overrides, [0], out) == table
    assert (out / "sip" / "seed_0" / "eval.json").stat().st_mtime_ns == stamp, "a finished experiment is reused"
