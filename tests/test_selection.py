from sip.train.records import Candidate, JudgedSample, Sample
from sip.train.selection import select, skip_reason


def judged(rewards, sources=("suffix", "rewrite", "rollout", "rollout"), complete=None):
    sample = Sample("world:0:7", [1, 2], [3, 4], "a", "b")
    cands = [Candidate(src, [10 + i], f"t{i}", 0 if src == "rollout" else None) for i, src in enumerate(sources)]
    return JudgedSample(sample, cands, list(rewards), complete=complete)


def test_dpo_takes_best_and_worst():
    ex = select(judged([0.4, 0.9, 0.1, 0.5]), "dpo", seed=0)
    assert ex.chosen_ids == [11] and ex.chosen_source == "rewrite"
    assert ex.rejected_ids == [12] and ex.rejected_source == "rollout"
    assert ex.prefix_ids == [1, 2]


def test_dpo_skips_a_full_tie():
    assert select(judged([0.5, 0.5, 0.5, 0.5]), "dpo", seed=0) is None
    assert skip_reason(judged([0.5, 0.5, 0.5, 0.5]), "dpo") == "tie"
    assert skip_reason(judged([0.5, 0.5, 0.5, 0.5]), "rf_nll") is None


def test_rf_nll_trains_on_best_without_rejected():
    ex = select(judged([0.4, 0.2, 0.8, 0.5]), "rf_nll", seed=0)
    assert ex.chosen_ids == [12] and ex.rejected_ids is None


def test_ties_break_randomly_but_repeatably():
    picks = {select(judged([1.0, 1.0, 1.0, 0.0]), "rf_nll", seed=s).chosen_source for s in range(40)}
    assert picks == {"suffix", "rewrite", "rollout"}
    again = [select(judged([1.0, 1.0, 1.0, 0.0]), "rf_nll", seed=s).chosen_ids for s in range(10)]
    assert again == [select(judged([1.0, 1.0, 1.0, 0.0]), "rf_nll", seed=s).chosen_ids for s in range(10)]


def test_nll_trains_on_its_single_candidate():
    ex = select(judged([1.0], sources=("suffix",)), "nll", seed=0)
    assert ex.chosen_source == "suffix" and ex.chosen_ids == [10]


def test_an_incomplete_candidate_with_the_highest_score_is_never_chosen():
    sample = judged([0.4, 0.9, 0.1, 0.5], complete=[True, False, True, True])
    for seed in range(30):
        dpo = select(sample, "dpo", seed)
        assert dpo.chosen_ids == [13] and dpo.rejected_ids == [12]
        assert select(sample, "rf_nll", seed).chosen_ids == [13]
    assert skip_reason(sample, "dpo") is None


def test_an_incomplete_candidate_can_be_rejected():
    ex = select(judged([0.4, 0.9, 0.0, 0.5], complete=[True, True, False, True]), "dpo", seed=0)
    assert ex.chosen_ids == [11] and ex.rejected_ids == [12]


def test_dpo_skips_when_the_best_fully_judged_candidate_is_no_better_than_the_worst():
    sample = judged([0.2, 0.9, 0.2], sources=("suffix", "rewrite", "rollout"), complete=[True, False, False])
    assert select(sample, "dpo", seed=0) is None and skip_reason(sample, "dpo") == "tie"
    assert select(sample, "rf_nll", seed=0).chosen_ids == [10]


def test_no_fully_judged_candidate_skips_the_sample_as_judge_failed():
    sample = judged([0.4, 0.9, 0.1, 0.5], complete=[False] * 4)
    for objective in ("dpo", "rf_nll"):
        assert select(sample, objective, seed=0) is None and skip_reason(sample, objective) == "judge_failed"


def test_nll_ignores_the_judge_and_an_empty_sample_has_no_candidate():
    assert select(judged([0.0], sources=("suffix",), complete=[False]), "nll", seed=0).chosen_ids == [10]
    empty = judged([], sources=())
    for objective in ("dpo", "rf_nll", "nll"):
        assert select(empty, objective, seed=0) is None and skip_reason(empty, objective) == "no_candidate"
