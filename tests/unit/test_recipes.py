"""The paper's experiments as recipes (configs/paper, train/experiment.py): every shipped recipe and
every row of it is a valid run, and a bad recipe is refused naming what is wrong, before anything starts."""

import subprocess
import sys

import pytest

from sip.config import ConfigError
from sip.objectives import OBJECTIVES
from sip.train.experiment import (RECIPES, aggregate, check_recipe, default_recipe, load_recipe, recipe_names,
                                  row_config)

PAPER_ROWS = {  # the list: each experiment has its recipe
    "table1_quality", "table1_factuality", "table1_safety", "table2_scratch", "table6_objectives",
    "table6_candidates", "pivots", "fig9_rollouts",
}


def test_every_paper_experiment_has_a_recipe_whose_rows_all_validate():
    assert PAPER_ROWS <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        check_recipe(recipe, [])
        assert recipe.mirrors and all(row.mirrors for row in recipe.rows.values())
        assert recipe.baseline in recipe.rows


def test_rows_lay_their_sections_over_the_shared_ones():
    recipe = load_recipe("table6_candidates")
    pivot = row_config(recipe, "suffix_as_pivot", ["train.steps=3"])
    assert pivot.judge.pairwise == "pivot" and pivot.rollout.k == 16 and pivot.train.objective == "dpo"
    assert pivot.judge.weights == {"quality": 1.0, "safety": 1.0, "factuality": 0.0} and pivot.train.steps == 3
    baseline = row_config(recipe, "ntp_baseline", [])
    assert baseline.train.objective == "nll" and baseline.train.candidates == ["suffix"]
    assert recipe.config["train"] == {"objective": "dpo"}, "a row must not write into the shared sections"


def test_the_paper_rows_run_what_they_name():
    objectives = load_recipe("table6_objectives")
    spin = row_config(objectives, "no_judge_dpo_rewrite_chosen", [])
    assert not OBJECTIVES[spin.train.objective].needs_judge and spin.train.candidates == ["rewrite", "rollout"]
    scratch = load_recipe("table2_scratch")
    assert row_config(scratch, None, []).base.steps > 0, "the shared config builds the base the rows are compared with"
    assert all(row_config(scratch, name, []).base.steps == 0 for name in scratch.rows)
    ks = [row_config(load_recipe("fig9_rollouts"), f"rollouts_{k}", []).rollout.k for k in (1, 2, 4, 8, 16)]
    assert ks == [1, 2, 4, 8, 16]


def test_the_tournament_experiment_compares_the_protocols_at_equal_k():
    recipe = load_recipe(str(RECIPES.parent / "experiments" / "tournament.yaml"))
    check_recipe(recipe, [])
    rows = {name: row_config(recipe, name, []) for name in recipe.rows}
    assert {(c.rollout.k, c.judge.pairwise) for c in rows.values()} == {
        (8, "round_robin"), (8, "tournament"), (16, "round_robin"), (16, "tournament")}
    default = row_config(recipe, None, [])
    for cfg in rows.values():  # otherwise the default run
        assert cfg.train.model_dump() == default.train.model_dump() and cfg.judge.weights == default.judge.weights


def test_a_bad_recipe_is_refused_naming_the_row_or_the_field(tmp_path):
    with pytest.raises(ConfigError, match="no recipe 'nope': give a recipe file or one of .*table1_safety"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mirrors: x\nbaseline: b\nrows:\n  a:\n    mirrors: y\n")
    with pytest.raises(ConfigError, match="baseline 'b' is not one of the rows"):
        load_recipe(str(bad))
    bad.write_text("mirrors: x\nrows:\n  a:\n    mirrors: y\n    config: {train: {objective: nll}}\n")
    with pytest.raises(ConfigError, match="(?s)recipe row a: .*objective=nll trains on one source"):
        check_recipe(load_recipe(str(bad)), [])
    bad.write_text("mirrors: x\nrows:\n  A-1:\n    mirrors: y\n")
    with pytest.raises(ConfigError, match="row name 'A-1'"):
        load_recipe(str(bad))


def test_the_cli_lists_recipes_and_refuses_a_bad_one_in_seconds(tmp_path):
    listed = subprocess.run([sys.executable, "-m", "sip.train", "experiment", "--list"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "table6_candidates: Table 6" in listed.stdout
    out = tmp_path / "out"
    bad = subprocess.run([sys.executable, "-m", "sip.train", "experiment", "--recipe", "table1_safety", "train.steps=0",
                          "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "recipe row" in bad.stdout + bad.stderr and "train.steps" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr and not out.exists()


def test_the_built_in_grid_is_a_recipe_too():
    recipe = default_recipe({"train": {"steps": 5}}, ks=(1, 8))
    assert list(recipe.rows) == ["nll_baseline", "nll_rewrites", "sip_rf_nll", "sip_dpo_k1", "sip_dpo_k8"]
    assert row_config(recipe, "sip_dpo_k8", []).rollout.k == 8 and row_config(recipe, "sip_dpo_k8", []).train.steps == 5


def test_aggregate_means_stds_and_gains_over_the_start():
    def run(fact, win, win_start, rollout):
        return {"eval": {"factuality": fact, "quality_win_rate": win, "safety": 1.0, "vs_start": {"quality_win_rate": win_start}},
                "final": {"chosen_rate": {"rollout": rollout}}, "train_seconds": 10.0, "steps": 4, "judge_calls": 40,
                "judge_comparisons": 24, "judge_round_robin_comparisons": 72}

    table = aggregate({"sip": {0: run(0.6, 0.7, 0.9, 0.5), 1: run(0.8, 0.9, 0.7, 0.7)}},
                      {0: {"factuality": 0.4, "safety": 0.5}, 1: {"factuality": 0.5, "safety": 0.5}})
    row = table["sip"]
    assert row["factuality"]["mean"] == pytest.approx(0.7) and row["factuality"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["quality_win_rate"]["mean"] == pytest.approx(0.8)
    assert row["vs_start.quality_win_rate"]["mean"] == pytest.approx(0.8)
    assert row["factuality_relative_to_start"]["mean"] == pytest.approx((0.5 + 0.6) / 2)
    assert row["safety_relative_to_start"]["mean"] == pytest.approx(1.0)
    assert row["final_rollout_chosen_rate"]["mean"] == pytest.approx(0.6)
    assert row["judge_calls_per_step"]["mean"] == 10 and row["judge_comparisons_per_step"]["mean"] == 6
    assert row["judge_comparison_share"]["mean"] == pytest.approx(1 / 3)
    assert row["train_seconds"] == {"mean": 10.0, "std": 0.0}
    assert "factuality_relative_to_start" not in aggregate({"sip": {0: run(0.6, 0.7, 0.9, 0.5)}}, {})["sip"]
