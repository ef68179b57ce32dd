import subprocess
import sys

import pytest

from sip.train.config import ConfigError, load_config


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
