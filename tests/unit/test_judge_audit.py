"""The judge audit against the world teacher: a judge that agrees with it scores 1, one that ranks
every pair backwards scores 0, and one the policy fooled shows its rollout reward above the reference's."""

from sip.config import load_config
from sip.train.judge_audit import JudgeAudit
from sip.train.judge_tasks import make_tasks
from sip.records import Candidate, JudgedBatch, JudgedSample, Sample

CFG = load_config(None, ["judge.audit_every=2", "judge.audit_samples=12", "data.world.countries=6", "data.world.elements=6"])


def batch(reward_of) -> JudgedBatch:
    """Twelve samples: the clean continuation as the suffix, a corrupted one as a rollout."""
    judged = []
    for task in make_tasks(CFG.data.world, "train", 12, kinds=["quality"]):
        f = task.fields
        clean, bad = (f["option_1"], f["option_2"]) if task.label == 1.0 else (f["option_2"], f["option_1"])
        sample = Sample(task.subject, [], [], f["prefix"], clean, {"subject": task.subject})
        candidates = [Candidate("suffix", [], clean), Candidate("rollout", [], bad, version=0)]
        judged.append(JudgedSample(sample, candidates, reward_of(task, clean, bad)))
    return JudgedBatch(0, judged)


def test_a_judge_that_agrees_with_the_reference_scores_one_and_a_backwards_one_zero():
    audit = JudgeAudit(CFG)
    assert audit.due(4) and not audit.due(3)
    agreeing = audit.measure(batch(lambda task, clean, bad: [0.9, 0.1]))
    assert agreeing["samples"] == 12 and agreeing["pair_agreement"] >= 0.9 and agreeing["best_agreement"] >= 0.9
    fooled = audit.measure(batch(lambda task, clean, bad: [0.1, 0.9]))
    assert fooled["pair_agreement"] <= 0.1 and fooled["best_agreement"] <= 0.2
    assert fooled["judge_rollout_reward"] == 0.9 > fooled["reference_rollout_reward"]


def test_the_audit_needs_the_world_as_reference():
    from sip.config import ConfigError

    try:
        load_config("configs/jsonl.yaml", ["judge.audit_every=5"])
    except ConfigError as err:
        assert "judge.audit_every needs the world teacher" in str(err)
    else:
        raise AssertionError("an audit without a reference was accepted")
