from sip.train.records import Candidate, JudgedSample, Sample
from sip.train.selection import select


def judged(rewards, sources=("suffix", "rewrite", "rollout", "rollout")):
    sample = Sample("world:0:7", [1, 2], [3, 4], "a", "b")
    cands = [Candidate(src, [10 + i], f"t{i}", 0 if src == "rollout" else None) for i, src in enumerate(sources)]
    return JudgedSample(sample, cands, list(rewards))


def test_dpo_takes_best_and_worst():
    ex = select(judged([0.4, 0.9, 0.1, 0.5]), "dpo", seed=0)
    assert ex.chosen_ids == [11] and ex.chosen_source == "rewrite"
    assert ex.rejected_ids == [12] and ex.rejected_source == "rollout"
    assert ex.prefix_ids == [1, 2]


def test_dpo_skips_a_full_tie():
    assert select(judged([0.5, 0.5, 0.5, 0.5]), "dpo", seed=0) is None


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
