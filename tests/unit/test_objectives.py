import pytest

from sip.records import Candidate, JudgedSample, Sample, TrainExample
from sip.objectives import OBJECTIVES


def judged(rewards, sources=("suffix", "rewrite", "rollout", "rollout"), complete=None):
    sample = Sample("world:0:7", [1, 2], [3, 4], "a", "b")
    cands = [Candidate(src, [10 + i], f"t{i}", 0 if src == "rollout" else None) for i, src in enumerate(sources)]
    return JudgedSample(sample, cands, list(rewards), complete=complete)


def test_dpo_takes_best_and_worst():
    ex = OBJECTIVES["dpo"].select(judged([0.4, 0.9, 0.1, 0.5]), seed=0)
    assert ex.chosen_ids == [11] and ex.chosen_source == "rewrite"
    assert ex.rejected_ids == [12] and ex.rejected_source == "rollout"
    assert ex.prefix_ids == [1, 2]


def test_dpo_skips_a_full_tie():
    assert OBJECTIVES["dpo"].select(judged([0.5, 0.5, 0.5, 0.5]), seed=0) is None
    assert OBJECTIVES["dpo"].skip_reason(judged([0.5, 0.5, 0.5, 0.5])) == "tie"
    assert OBJECTIVES["rf_nll"].skip_reason(judged([0.5, 0.5, 0.5, 0.5])) is None


def test_rf_nll_trains_on_best_without_rejected():
    ex = OBJECTIVES["rf_nll"].select(judged([0.4, 0.2, 0.8, 0.5]), seed=0)
    assert ex.chosen_ids == [12] and ex.rejected_ids is None


def test_ties_break_randomly_but_repeatably():
    picks = {OBJECTIVES["rf_nll"].select(judged([1.0, 1.0, 1.0, 0.0]), seed=s).chosen_source for s in range(40)}
    assert picks == {"suffix", "rewrite", "rollout"}
    again = [OBJECTIVES["rf_nll"].select(judged([1.0, 1.0, 1.0, 0.0]), seed=s).chosen_ids for s in range(10)]
    assert again == [OBJECTIVES["rf_nll"].select(judged([1.0, 1.0, 1.0, 0.0]), seed=s).chosen_ids for s in range(10)]


def test_nll_trains_on_its_single_candidate():
    ex = OBJECTIVES["nll"].select(judged([1.0], sources=("suffix",)), seed=0)
    assert ex.chosen_source == "suffix" and ex.chosen_ids == [10]


def test_an_incomplete_candidate_with_the_highest_score_is_never_chosen():
    sample = judged([0.4, 0.9, 0.1, 0.5], complete=[True, False, True, True])
    for seed in range(30):
        dpo = OBJECTIVES["dpo"].select(sample, seed)
        assert dpo.chosen_ids == [13] and dpo.rejected_ids == [12]
        assert OBJECTIVES["rf_nll"].select(sample, seed).chosen_ids == [13]
    assert OBJECTIVES["dpo"].skip_reason(sample) is None


def test_an_incomplete_candidate_can_be_rejected():
    ex = OBJECTIVES["dpo"].select(judged([0.4, 0.9, 0.0, 0.5], complete=[True, True, False, True]), seed=0)
    assert ex.chosen_ids == [11] and ex.rejected_ids == [12]


def test_dpo_skips_when_the_best_fully_judged_candidate_is_no_better_than_the_worst():
    sample = judged([0.2, 0.9, 0.2], sources=("suffix", "rewrite", "rollout"), complete=[True, False, False])
    assert OBJECTIVES["dpo"].select(sample, seed=0) is None and OBJECTIVES["dpo"].skip_reason(sample) == "tie"
    assert OBJECTIVES["rf_nll"].select(sample, seed=0).chosen_ids == [10]


def test_no_fully_judged_candidate_skips_the_sample_as_judge_failed():
    sample = judged([0.4, 0.9, 0.1, 0.5], complete=[False] * 4)
    for objective in ("dpo", "rf_nll"):
        assert OBJECTIVES[objective].select(sample, seed=0) is None and OBJECTIVES[objective].skip_reason(sample) == "judge_failed"


def test_nll_ignores_the_judge_and_an_empty_sample_has_no_candidate():
    assert OBJECTIVES["nll"].select(judged([0.0], sources=("suffix",), complete=[False]), seed=0).chosen_ids == [10]
    empty = judged([], sources=())
    for objective in ("dpo", "rf_nll", "nll"):
        assert OBJECTIVES[objective].select(empty, seed=0) is None and OBJECTIVES[objective].skip_reason(empty) == "no_candidate"


def test_every_objective_is_named_once_and_the_config_asks_it():
    from typing import get_args

    from sip.config import SipConfig
    from sip.objectives import ObjectiveName

    assert set(get_args(ObjectiveName)) == set(OBJECTIVES)
    nll = SipConfig.model_validate({"train": {"objective": "nll", "candidates": ["suffix"]}})
    assert nll.objective is OBJECTIVES["nll"] and not nll.needs_judge
    assert SipConfig().objective.needs_reference and not OBJECTIVES["rf_nll"].needs_reference


def test_micro_batch_losses_add_up_to_the_whole_batch():
    """Two micro-batches give the loss and metrics of the batch in one piece, for every objective."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    reference = LlamaForCausalLM(model.config)
    examples = [TrainExample(str(i), [1, 2 + i], [3, 4, 5 + i], "rollout", [6, 7 + i], "suffix") for i in range(4)]
    totals = {"examples": 4, "chosen_tokens": 12}
    for objective in OBJECTIVES.values():
        whole, whole_sums = objective.micro_batch(model, reference, examples, totals, 0.1, 0.5, pad_id=0)
        parts = [objective.micro_batch(model, reference, examples[i : i + 2], totals, 0.1, 0.5, pad_id=0) for i in (0, 2)]
        assert sum(loss.item() for loss, _ in parts) == pytest.approx(whole.item(), rel=1e-5)
        summed = [a + b for a, b in zip(parts[0][1], parts[1][1])]
        assert summed == pytest.approx(whole_sums, rel=1e-5)
        metrics = objective.metrics(summed, totals, 0.5)
        assert metrics["loss"] == pytest.approx(whole.item(), rel=1e-5)  # the logged loss is the trained one


def test_rewrite_over_rollout_needs_no_judge_and_prefers_the_rewrite_to_a_random_rollout():
    spin = OBJECTIVES["dpo_rewrite_chosen"]
    assert not spin.needs_judge and spin.needs_reference
    sample = judged([0.0, 0.0, 0.0], sources=("rewrite", "rollout", "rollout"))
    rejected = set()
    for seed in range(30):
        ex = spin.select(sample, seed)
        assert ex.chosen_source == "rewrite" and ex.chosen_ids == [10] and ex.rejected_source == "rollout"
        rejected.add(ex.rejected_ids[0])
        assert spin.select(sample, seed).rejected_ids == ex.rejected_ids  # repeatable
    assert rejected == {11, 12}


def test_rewrite_over_rollout_skips_a_sample_whose_rewrite_came_back_empty():
    spin = OBJECTIVES["dpo_rewrite_chosen"]
    sample = judged([1.0, 1.0], sources=("rollout", "rollout"))
    assert spin.skip_reason(sample) == "no_candidate" and spin.select(sample, 0) is None


def test_rewrite_over_rollout_takes_exactly_the_rewrite_and_rollouts():
    from sip.config import ConfigError, load_config

    load_config(None, ["train.objective=dpo_rewrite_chosen", "train.candidates=[rewrite, rollout]", "rollout.k=1"])
    with pytest.raises(ConfigError, match=r"set train.candidates to \[rewrite, rollout\]"):
        load_config(None, ["train.objective=dpo_rewrite_chosen"])
