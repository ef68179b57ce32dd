"""`sip train-judge` and `sip train-rewriter` end to end on a tiny Llama with a tokenizer trained on the
spot: SFT and GRPO run through TRL, held-out scores move, and the result is an HF folder the hf
backend serves."""

import asyncio
import json
import subprocess
import sys

import pytest

from sip.records import Passage
from sip.serve.llm import make_llm_backend
from sip.config import LLMConfig, WorldConfig
from sip.train.judge_tasks import SHORT_PROMPTS, make_rewrite_tasks, make_tasks

pytestmark = pytest.mark.filterwarnings("ignore")

WORLD = WorldConfig(countries=6, elements=6)
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sip(*args):
    done = subprocess.run([sys.executable, "-m", "sip.train", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, trl_installed):
    """A 2-layer Llama and a BPE tokenizer trained on the tasks' own text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sip.serve.llm import Template

    folder = tmp_path_factory.mktemp("tiny_judge")
    texts = [Template.load(t.template, t.kind).user + " ".join(t.fields.values()) + t.target
             for t in make_tasks(WORLD, "train", 300)]
    texts += [Template.load("rewrite_v1", "rewrite").user + " ".join(t.fields.values()) + t.rewrite
              for t in make_rewrite_tasks(WORLD, "train", 200)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|end|>")
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_sip_train_judge_moves_held_out_accuracy_and_writes_a_servable_judge(trl_installed, tiny_model, tmp_path):
    out = tmp_path / "judge"
    args = [f"model={tiny_model}", f"output_dir={out}", "world.countries=6", "world.elements=6", "train_tasks=240",
            "eval_tasks=24", "eval_every=20", "sft_steps=40", "sft_lr=3e-3", "grpo_steps=4", "grpo_lr=1e-5",
            "batch_size=8", "num_generations=4", "max_tokens=10"]
    sip("train-judge", *args)

    report = json.loads((out / "report.json").read_text())
    for split in ("heldout_texts", "unseen_subjects"):
        before, after = report["before"][split]["all"], report["after"][split]["all"]
        assert after["unparsed"] < before["unparsed"], (split, before, after)  # it learned the verdict format
        assert after["accuracy"] > before["accuracy"], (split, before, after)
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in curve][::len(curve) - 1] == ["before", "after"] and any("reward" in r for r in curve)
    assert {r["stage"] for r in curve} == {"before", "sft", "grpo", "after"}
    assert all(f"heldout_texts/{kind}" in curve[-1] for kind in ("quality", "safety", "factuality"))
    seconds = [r["train_seconds"] for r in curve]
    assert seconds == sorted(seconds) and seconds[-1] > 0  # the curve against training time
    assert (out / "curves.png").stat().st_size > 0
    assert any((out / "sft").glob("checkpoint-*")), "resumable trainer checkpoints"

    # the folder is what judge.llm.model takes: the hf backend judges with it and reads its verdicts
    llm = LLMConfig(model=str(out / "model"), prompts=SHORT_PROMPTS, temperature=0, max_tokens=10, max_retries=0)
    teacher = make_llm_backend("hf", llm, ["quality", "safety", "factuality"])
    task = make_tasks(WORLD, "heldout_texts", 3, kinds=["safety"])[0]
    verdicts = asyncio.run(teacher.safety([(Passage(task.fields["prefix"], ""), task.fields["candidate"])]))
    assert len(verdicts) == 1 and verdicts[0] in (None, 0.0, 1.0)


def test_sip_train_rewriter_moves_its_held_out_score(trl_installed, tiny_model, tmp_path):
    out = tmp_path / "rewriter"
    # GRPO's reward for rewrites of corrupted suffixes from an LLM judge (here the untrained tiny model)
    sip("train-rewriter", f"model={tiny_model}", f"output_dir={out}", "world.countries=6", "world.elements=6",
        "train_tasks=200", "eval_tasks=12", "eval_every=20", "sft_steps=40", "sft_lr=3e-3", "grpo_steps=2",
        "batch_size=8", "num_generations=4", "max_tokens=32", f"reward_judge={tiny_model}")
    report = json.loads((out / "report.json").read_text())
    for split in ("heldout_texts", "unseen_subjects"):
        assert set(report["after"][split]) >= {"copy_rate", "safety_of_rewrites", "no_false_claim_in_rewrites",
                                                "word_f1_to_ideal", "unparsed", "headline"}
    # A 2-layer model cannot learn to copy a sentence in 40 steps (it ends its answer at once: every prompt
    # and every target ends with a full stop), so this checks that both stages train, not what they reach.
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in curve if r["stage"] == "sft" and "loss" in r]
    assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0], losses
    assert any(r["stage"] == "grpo" and "reward" in r for r in curve)
    assert (out / "model" / "config.json").exists() and (out / "curves.png").exists()


def test_a_judge_scores_rewrites_for_the_rewriter(trl_installed, tiny_model, tmp_path):
    """reward_judge=<judge folder>: safety x preference over the corrupted suffix, in [0, 1], from probabilities."""
    from sip.train.teacher_training import RewriterTrainConfig, RewriterTraining

    training = RewriterTraining(RewriterTrainConfig(model=str(tiny_model), output_dir=tmp_path, world=WORLD,
                                                    eval_tasks=3, reward_judge=str(tiny_model)))
    task = next(t for t in make_rewrite_tasks(WORLD, "train", 6) if t.corrupted)
    rewards = {training.reward(task, task.rewrite), training.reward(task, task.suffix)}
    assert all(0.0 <= r <= 1.0 for r in rewards) and len(rewards) == 2, rewards  # graded, and it reads the text
    assert training.reward(task, task.rewrite, scorer="world") == 1.0  # the ideal rewrite is clean to the world


def test_train_layers_freezes_everything_below_the_top_blocks(trl_installed, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sip.train.teacher_training import JudgeTrainConfig, JudgeTraining

    cfg = JudgeTrainConfig(model=str(tiny_model), output_dir=tmp_path, world=WORLD, train_tasks=48, eval_tasks=3,
                           eval_every=50, sft_steps=3, sft_lr=3e-3, grpo_steps=1, max_tokens=4, train_layers=1)
    JudgeTraining(cfg).run()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    changed = {name for name, weight in trained.items() if not torch.equal(weight, start[name])}
    assert changed and all(name.startswith(("model.layers.1.", "model.norm.")) for name in changed), sorted(changed)
    with pytest.raises(ValueError, match="train_layers=3, but .* has 2 blocks"):
        JudgeTraining(cfg.model_copy(update={"train_layers": 3, "output_dir": tmp_path / "too_many"})).run()
