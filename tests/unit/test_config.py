import subprocess
import sys
from pathlib import Path

import pytest

from sip.config import ConfigError, load_config


def test_defaults_validate_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nrollout:\n  k: 2\n")
    cfg = load_config(path, ["train.objective=rf_nll", "judge.weights={quality: 1, safety: 0}", "run.output_dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.rollout.k == 2 and cfg.train.objective == "rf_nll"
    assert cfg.judge.weights == {"quality": 1, "safety": 0}
    assert str(cfg.run.output_dir) == "/tmp/x"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.steps=0", "train.steps"),
        ("train.objective=ppo", "train.objective"),
        ("train.stepz=3", "train.stepz"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("data.world.unsafe_rate=0.9", "data.world"),
        ("judge.autoscaling={min_replicas: 0, max_replicas: 2}", "judge"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="objective=nll"):
        load_config(None, ["train.objective=nll"])
    with pytest.raises(ConfigError, match="rollout.k is 0"):
        load_config(None, ["rollout.k=0"])
    load_config(None, ["train.objective=nll", "train.candidates=[suffix]"])
    with pytest.raises(ConfigError, match="weight_sync=nccl"):
        load_config(None, ["rollout.backend=vllm", "rollout.weight_sync=nccl", "rollout.num_gpus=1"])  # learner on CPU
    load_config(None, ["rollout.backend=vllm", "rollout.weight_sync=nccl", "rollout.num_gpus=1", "train.num_gpus=1"])


def test_a_pivot_that_is_not_a_candidate_is_refused_not_swapped_for_round_robin():
    with pytest.raises(ConfigError, match=r"judge.pairwise=pivot compares every candidate with the rewrite, which "
                                          r"train.candidates \['suffix', 'rollout'\] leaves out"):
        load_config(None, ["judge.pairwise=pivot", "judge.pivot=rewrite", "train.candidates=[suffix, rollout]"])
    with pytest.raises(ConfigError, match="with the suffix"):
        load_config(None, ["judge.pairwise=pivot", "train.candidates=[rewrite, rollout]"])
    load_config(None, ["judge.pairwise=pivot", "judge.pivot=rewrite", "train.candidates=[rewrite, rollout]"])
    # no quality judged: the pivot is never asked for
    load_config(None, ["judge.pairwise=pivot", "train.candidates=[rewrite, rollout]", "judge.weights={safety: 1}"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_cli_rejects_bad_config_before_starting_anything(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sip.train", "train", "train.batch_size=-1", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr
    assert not out.exists()


def test_a_negative_judge_weight_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"judge.weights: .*safety=-0.5: a weight is positive, or 0"):
        load_config(None, ["judge.weights={quality: 1, safety: -0.5}"])


CONFIGS = Path(__file__).parents[2] / "configs"


def request_budget(cfg) -> float:
    """The longest a batch's judge and rewriter requests take with every try (actors/generator.py)."""
    p = cfg.pipeline
    stages = cfg.needs_rewriter + cfg.needs_judge  # the judge is asked after the rewriter answered
    return stages * ((p.request_retries + 1) * p.request_timeout_s + p.retry_backoff_s * (2**p.request_retries - 1))


@pytest.mark.parametrize("path, overrides", [
    *[(path, []) for path in sorted(CONFIGS.glob("*.yaml"))],  # configs/paper holds recipes: test_recipes.py
    (None, []),
    (None, ["pipeline.timeout_s=120"]),  # the test suite's runs (test_e2e, test_faults, ...)
    (None, ["pipeline.timeout_s=600"]),
    (None, ["pipeline.request_retries=6", "pipeline.retry_backoff_s=0.5"]),
    (None, ["pipeline.request_timeout_s=3", "pipeline.request_retries=4", "pipeline.retry_backoff_s=0.5"]),
    (CONFIGS / "smollm2_judge.yaml", ["pipeline.timeout_s=600", "judge.weights={quality: 1}"]),
], ids=str)
def test_shipped_and_tested_configs_give_requests_the_time_to_retry(path, overrides):
    cfg = load_config(path, overrides)
    assert 0 < request_budget(cfg) <= cfg.pipeline.timeout_s


@pytest.mark.parametrize("candidates", ["[suffix, rewrite, rollout]", "[suffix, rollout]"])
def test_request_timeout_left_unset_fits_every_try_in_the_driver_wait(candidates):
    for timeout in (120, 300, 3600):
        cfg = load_config(None, [f"pipeline.timeout_s={timeout}", f"train.candidates={candidates}"])
        assert request_budget(cfg) == pytest.approx(0.8 * timeout)


def test_request_retries_longer_than_the_driver_wait_are_refused_with_the_numbers():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["pipeline.request_timeout_s=120"])
    for text in ("974s", "2 x 487s", "pipeline.request_timeout_s=120", "4 tries (pipeline.request_retries=3)",
                 "7s backoff (pipeline.retry_backoff_s=1", "pipeline.timeout_s=300: raise it to at least 974"):
        assert text in str(err.value)
    no_rewriter = ["pipeline.request_timeout_s=120", "train.candidates=[suffix, rollout]"]
    with pytest.raises(ConfigError, match="one batch's judge requests may take 487s"):
        load_config(None, no_rewriter)
    load_config(None, [*no_rewriter, "pipeline.timeout_s=487"])
    asks_neither = ["train.objective=nll", "train.candidates=[suffix]"]
    load_config(None, ["pipeline.request_timeout_s=1000", *asks_neither])
    with pytest.raises(ConfigError, match="request_retries=10 retries .* alone takes 1023s"):
        load_config(None, ["pipeline.request_retries=10"])


def test_the_weight_transport_says_whether_a_dead_worker_can_be_replaced():
    from sip.actors.weight_sync import make_weight_sync

    assert make_weight_sync(load_config(None, [])).replaceable_workers
    nccl = ["rollout.backend=vllm", "rollout.weight_sync=nccl", "rollout.num_gpus=1", "train.num_gpus=1"]
    assert not make_weight_sync(load_config(None, nccl)).replaceable_workers
