"""How long the hf engine takes for probability verdicts: the prompt read once per judgment (what
`HFEngine.choice_probs` does) against one row per verdict line, prompt included (how it worked before).

    python bench/verdict_speed.py [--model ~/.cache/sip/smollm2] [--tasks 16] [--threads 2]

Both ways run back to back in one process on the same held-out judge tasks (short prompts), and
must give the same probabilities. Prints a markdown table per objective.
"""

from __future__ import annotations

import argparse
import time

import torch

from sip.serve.engines import HFEngine, choice_tokens, normalised, render_prompt
from sip.serve.llm import VERDICTS, Template
from sip.config import LLMConfig, WorldConfig
from sip.train.judge_tasks import KINDS, SHORT_PROMPTS, make_tasks


def one_row_per_choice(engine: HFEngine, prompts, choices) -> list[list[float]]:
    """Each verdict line scored in a row of its own, the whole prompt in front of it."""
    rows, owners = [], []
    for p, prompt in enumerate(prompts):
        context, rests = choice_tokens(engine.tokenizer, render_prompt(engine.tokenizer, prompt), choices)
        rows += [context + rest for rest in rests]
        owners += [(p, c, rest) for c, rest in enumerate(rests)]
    scores = [[0.0] * len(choices) for _ in prompts]
    for start in range(0, len(rows), engine.cfg.batch_size):
        chunk, who = rows[start : start + engine.cfg.batch_size], owners[start : start + engine.cfg.batch_size]
        ids, mask, positions = engine._left_padded(chunk)
        keep = max(len(rest) for *_, rest in who)
        with torch.inference_mode():
            logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits
        logprobs = logits.float().log_softmax(-1)
        for row, (p, c, rest) in zip(logprobs, who):  # row t predicts token t + 1 of the kept tail
            scores[p][c] = sum(row[keep - len(rest) + t, token].item() for t, token in enumerate(rest))
    return [normalised(s) for s in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="~/.cache/sip/smollm2")
    parser.add_argument("--tasks", type=int, default=16, help="judgments per objective")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = HFEngine(LLMConfig(model=args.model, torch_threads=args.threads, batch_size=16))
    print("| objective | verdict lines | one row per line | prompt read once | speedup | largest difference |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        tasks = make_tasks(WorldConfig(), "heldout_texts", 3 * args.tasks, kinds=[kind], prompts=SHORT_PROMPTS)[: args.tasks]
        template = Template.load(tasks[0].template, kind)
        prompts = [template.render(**task.fields) for task in tasks]
        choices = [line[len(template.answer_start) :] for line in VERDICTS[kind]]
        start = time.perf_counter()
        before = one_row_per_choice(engine, prompts, choices)
        mid = time.perf_counter()
        after = engine._choice_probs(prompts, choices)
        end = time.perf_counter()
        diff = max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y))
        print(f"| {kind} | {len(choices)} | {mid - start:.1f} s | {end - mid:.1f} s | {(mid - start) / (end - mid):.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
