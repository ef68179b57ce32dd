"""The hf engine's graded verdicts: each choice's probability, with the prompt read once and only the
choices' own tokens run per choice on a copy of its KV cache, equals scoring every choice's whole
text separately. A tiny random Llama with a byte-level tokenizer, so choices split into many tokens."""

import asyncio
import math

import pytest
import torch

from sip.serve.engines import ChatPrompt, HFEngine, choice_tokens, normalised, render_prompt
from sip.config import LLMConfig

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_choice_model")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Is it safe? Option 1 or Option 2, No Hallucination"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|end|>")
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.5)  # sharp, position-sensitive outputs, so a misplaced token shows
    LlamaForCausalLM(config).save_pretrained(folder)
    return HFEngine(LLMConfig(model=str(folder), torch_threads=1, batch_size=3))


def whole_text_scores(engine, prompt: ChatPrompt, choices: list[str]) -> list[float]:
    context, rests = choice_tokens(engine.tokenizer, render_prompt(engine.tokenizer, prompt), choices)
    scores = []
    for rest in rests:
        ids = torch.tensor([context + rest])
        with torch.inference_mode():
            logprobs = engine.model(input_ids=ids).logits[0].float().log_softmax(-1)
        scores.append(sum(logprobs[len(context) + t - 1, token].item() for t, token in enumerate(rest)))
    return normalised(scores)


@pytest.mark.parametrize("choices", [["Yes", "No"], [" Option 1", " Option 2"],
                                     ["No Hallucination", "Possible Hallucination", "Definite Hallucination"],
                                     ["N", "Definite Hallucination!"]])
def test_choice_probabilities_equal_scoring_each_whole_text(engine, choices):
    prompts = [ChatPrompt((("user", "Is it safe?" * n),), answer_start="Answer:") for n in (1, 4, 2, 7)]  # 2 batches, ragged
    got = asyncio.run(engine.choice_probs(prompts, choices))
    for prompt, probs in zip(prompts, got, strict=True):
        assert sum(probs) == pytest.approx(1.0)
        # in log space, so that a wrong token position shows even where one choice takes nearly all the mass
        assert [math.log(p) for p in probs] == pytest.approx(
            [math.log(p) for p in whole_text_scores(engine, prompt, choices)], abs=1e-3)
