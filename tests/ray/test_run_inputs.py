"""Inputs a run checks before it starts anything: a resume checkpoint that is whole and ours, an output
folder that holds no other run, and a cluster that can hold the run. Each is a clear message within
seconds through the real CLI, never a traceback."""

import pytest

from sip.checkpoint import step_dir
from helpers import EXAMPLES, TINY, assert_refused, make_cfg, one_rank, sip, step

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_missing_resume_checkpoint_is_refused_before_anything_starts(tmp_path):
    done, seconds = sip("train", f"run.resume_from={tmp_path / 'nope'}", f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, "no such checkpoint folder")


def test_resume_latest_with_no_checkpoint_is_refused(tmp_path):
    done, seconds = sip("train", "run.resume_from=latest", f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, "no complete checkpoint")


def test_a_policy_folder_that_is_not_a_model_is_refused(tmp_path):
    done, seconds = sip("train", f"policy.init={tmp_path}", f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, f"policy.init={tmp_path} is not a model transformers can load")


PROBABILITY_JUDGE = ["judge.backend=hf", "judge.llm.model=/nonexistent/judge", "judge.llm.verdict=probability",
                     "judge.llm.prompts={quality: quality_short_v1, safety: safety_short_v1, factuality: factuality_short_v1}"]


@pytest.mark.parametrize("command", ["train", "serve", "eval"])
def test_a_prompt_the_judge_replica_would_refuse_is_refused_before_anything_starts(tmp_path, tokenizer_dir, command):
    """Probability verdicts need every judge prompt to prefill its answer start; coherence left at its
    default (coherence_v1) does not. A replica refuses it at start, where Serve shows only 'failed to
    deploy'; the driver says which prompt and what to use, before Ray or any model starts."""
    from helpers import tiny_llama

    if command == "eval":  # a real model folder to evaluate, so that only the prompt is wrong
        tiny_llama(tokenizer_dir, hidden=32, layers=1, seed=0)[0].save_pretrained(tmp_path / "model")
    args = {"train": [f"--output-dir={tmp_path / 'run'}"], "serve": [], "eval": [f"--model={tmp_path / 'model'}"]}[command]
    done, seconds = sip(command, *PROBABILITY_JUDGE, *args)
    assert_refused(done, seconds, "coherence prompt coherence_v1 prefills no answer start", "coherence_direct_v1")
    assert "Started a local Ray instance" not in done.stderr


def test_a_judge_replica_that_cannot_start_is_named_with_its_reason(tmp_path):
    """What only the replica can find (here its model folder; on a cluster it may live on another node)
    comes back from Serve's deployment status as the replica's own error, not just 'failed to deploy'."""
    done, seconds = sip("train", "judge.backend=hf", "judge.llm.model=/nonexistent/judge", "train.steps=1",
                        f"--output-dir={tmp_path / 'run'}", timeout=300)
    assert_refused(done, seconds, "failed to deploy", "no Hugging Face model folder at /nonexistent/judge", within=240)


def test_a_policy_path_under_home_is_expanded():
    from pathlib import Path

    from sip.config import load_config

    assert load_config(None, ["policy.init=~/models/m"]).policy.init == str(Path.home() / "models" / "m")
    assert load_config(None, []).policy.init == "scratch"


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    """A real checkpoint of a one-rank learner with the tiny test policy (written in this process)."""
    root = tmp_path_factory.mktemp("ckpt")
    final = step_dir(root / "run", 1)
    with one_rank(make_cfg("nll"), tokenizer_dir) as learner:
        step(learner, EXAMPLES)
        learner.save(str(root / "partial"), str(final), {})
    return final


def test_a_half_written_checkpoint_is_refused(checkpoint, tmp_path):
    import shutil

    half = tmp_path / "half"
    shutil.copytree(checkpoint, half)
    (half / "COMPLETE").unlink()
    done, seconds = sip("train", f"run.resume_from={half}", f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, "incomplete")


def test_a_checkpoint_of_another_model_or_objective_is_refused_naming_what_differs(checkpoint, tmp_path):
    done, seconds = sip("train", f"run.resume_from={checkpoint}", "policy.hidden_size=48", "train.objective=dpo",
                        f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, "written by a different run", "policy", "objective")


def test_an_output_folder_holding_another_run_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train: {steps: 3}\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    done, seconds = sip("train", f"--output-dir={out}")
    assert_refused(done, seconds, "already holds a run", "run.resume_from=latest", "run.overwrite=true")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n', "nothing of the old run was touched"


@pytest.mark.ray
def test_gpus_the_cluster_lacks_are_refused_instead_of_waiting_forever(tmp_path):
    done, seconds = sip("train", *TINY, "judge.num_gpus=1", f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, "needs 1 GPUs", "the cluster has 0", within=60)


def test_a_data_file_in_another_encoding_is_refused_naming_the_setting(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\n".join(b'{"text": "Caf\xe9 %d pr\xe8s de la rivi\xe8re et des for\xeats."}' % i for i in range(30)))
    done, seconds = sip("train", "data.source=hf", "data.hf.path=json", f"data.hf.data_files={path}",
                        f"--output-dir={tmp_path / 'run'}")
    assert_refused(done, seconds, f"{path} is not UTF-8", "data.hf.encoding=latin-1", within=10)
