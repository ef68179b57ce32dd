"""Text-generation engines behind the prompted-LLM judge and rewriter: hf, vllm and openai.

One small protocol: `generate(requests)` takes chat prompts and returns, for each, the requested
number of sampled answers. Engines that render the chat template themselves (hf, vllm) *prefill*
the prompt's `answer_start` (the answer is forced to begin with it) and return only what the model
wrote after it; the openai engine prefills only with `llm.continue_final_message`, else the prompt
asks the model to write it. `choice_probs(prompts, choices)` reads, instead of sampling, how
likely the model finds each choice as the continuation of the prefilled answer start.

Heavy libraries (torch, transformers, vllm, aiohttp) are imported inside the engine that needs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sip.config import LLMConfig

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine could not produce an answer (server down, bad model path, ...): the message says why."""


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content), e.g. (("user", "..."),)
    answer_start: str = ""  # the answer's first words: prefilled where the engine can
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)


@dataclass(frozen=True)
class GenRequest:
    prompt: ChatPrompt
    max_tokens: int
    n: int = 1  # independent samples


class TextEngine(Protocol):
    prefills: bool  # True: answers come back without answer_start, which the model was forced to begin with

    async def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        """For each request, `n` sampled answers."""

    async def choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float] | None]:
        """For each prompt, the probability of each choice as the answer's continuation after the
        prefilled answer start, normalised over the choices; None where the engine saw none of them
        (only openai, which sees the top 20 first tokens, can)."""


def model_folder(name: str) -> Path:
    folder = Path(name).expanduser()
    if not (folder / "config.json").exists():
        hint = " (run `sip convert-smollm2` to write SmolLM2 there)" if folder.name == "smollm2" else ""
        raise EngineError(f"llm.model={name}: no Hugging Face model folder at {folder}{hint}")
    return folder


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def per_request(requests: list[GenRequest], texts: list[str]) -> list[list[str]]:
    """Answers generated as one flat list, `n` per request in order, regrouped by request."""
    answers, i = [], 0
    for r in requests:
        answers.append(texts[i : i + r.n])
        i += r.n
    return answers


def render_prompt(tokenizer, prompt: ChatPrompt) -> str:
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompt.answer_start


def normalised(logprobs: Sequence[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def choice_tokens(tokenizer, text: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The tokens of `text` + each choice, split into the part they all share and each choice's rest.

    The choices are scored from where their tokenisations part, not from the end of `text`: a token
    that joins the text's end to a choice's start is then scored as part of that choice.
    """
    seqs = [tokenizer.encode(text + choice, add_special_tokens=False) for choice in choices]
    shared = 0
    while all(len(s) > shared and s[shared] == seqs[0][shared] for s in seqs):
        shared += 1
    if any(len(s) == shared for s in seqs):
        raise EngineError(f"the choices {list(choices)} cannot be scored: one's tokens begin another's")
    return seqs[0][:shared], [s[shared:] for s in seqs]


class OneCallAtATime:
    """An engine's blocking calls, run in a worker thread one at a time. `timeout_s` limits a call's own
    run, timed from when it gets the engine, so a call queued behind a long one is not failed by the
    wait. A thread cannot be stopped: a call that times out keeps the engine until its thread ends, and
    the next call starts (and is timed) on an idle engine."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine = asyncio.Lock()

    async def run(self, fn, *args):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a lock belongs to one event loop; asyncio.run ends only when its threads have
            self._loop, self._engine = loop, asyncio.Lock()
        engine = self._engine
        await engine.acquire()
        try:
            call = loop.run_in_executor(None, fn, *args)
        except BaseException:
            engine.release()
            raise
        call.add_done_callback(lambda done: self._release(engine, done))
        return await asyncio.wait_for(asyncio.shield(call), self.timeout_s)

    @staticmethod
    def _release(engine: asyncio.Lock, call: asyncio.Future) -> None:
        engine.release()
        if not call.cancelled():
            call.exception()  # a timed-out caller is gone: its run's error is retrieved here, not logged as lost


class HFEngine:
    """transformers generation inside the replica: one generate call at a time, `batch_size` rows each."""

    prefills = True

    def __init__(self, cfg: LLMConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = model_folder(cfg.model)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.calls = OneCallAtATime(cfg.timeout_s)
        torch.manual_seed(cfg.seed)

    async def generate(
        self, requests: list[GenRequest], temperature: float | None = None, top_p: float | None = None
    ) -> list[list[str]]:
        """`temperature` / `top_p` override the config's (the local OpenAI server passes a request's own)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        top_p = self.cfg.top_p if top_p is None else top_p
        return await self.calls.run(self._generate, requests, temperature, top_p)

    def _generate(self, requests: list[GenRequest], temperature: float, top_p: float) -> list[list[str]]:
        import torch

        rows = [(r, render_prompt(self.tokenizer, r.prompt)) for r in requests for _ in range(r.n)]
        # rows generated together share their stop strings: one row's stop must not end another's answer
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, (r, _) in enumerate(rows):
            groups.setdefault(r.prompt.stop, []).append(i)
        texts = [""] * len(rows)
        sample = temperature > 0
        with torch.inference_mode():
            for stop, members in groups.items():
                for start in range(0, len(members), self.cfg.batch_size):
                    chunk = members[start : start + self.cfg.batch_size]
                    enc = self.tokenizer([rows[i][1] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=max(rows[i][0].max_tokens for i in chunk),
                        do_sample=sample,
                        temperature=temperature if sample else None,
                        top_p=top_p if sample else None,
                        top_k=None,
                        pad_token_id=self.tokenizer.pad_token_id,
                        stop_strings=list(stop) or None,
                        tokenizer=self.tokenizer if stop else None,
                    )
                    for i, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
                        text = self.tokenizer.decode(ids[: rows[i][0].max_tokens], skip_special_tokens=True)
                        texts[i] = cut_at_stop(text, stop)
        return per_request(requests, texts)

    async def choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float]]:
        return await self.calls.run(self._choice_probs, prompts, choices)

    def _choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float]]:
        """Each choice's tokens scored by teacher forcing (their log-probabilities summed), normalised.

        The prompt and the tokens the choices share are read once per prompt; only the choices' own
        tokens after the first run once per choice, on a copy of the prompt's KV cache.
        """
        parts = [choice_tokens(self.tokenizer, render_prompt(self.tokenizer, prompt), choices) for prompt in prompts]
        scores = []
        for start in range(0, len(parts), self.cfg.batch_size):
            chunk = parts[start : start + self.cfg.batch_size]
            scores += self._score_rests([context for context, _ in chunk], [rests for _, rests in chunk])
        return [normalised(s) for s in scores]

    def _score_rests(self, contexts: list[list[int]], rests: list[list[list[int]]]) -> list[list[float]]:
        import torch

        ids, mask, positions = self._left_padded(contexts)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, use_cache=True)
            first = out.logits[:, -1].float().log_softmax(-1)
            scores = [[first[b, rest[0]].item() for rest in row] for b, row in enumerate(rests)]
            longest = max(len(rest) for row in rests for rest in row)
            if longest == 1:
                return scores
            # every choice feeds its tokens but the last, right-padded, after a copy of its prompt's cache
            n, pad = len(rests[0]), self.tokenizer.pad_token_id
            fed = torch.tensor([rest[:-1] + [pad] * (longest - len(rest)) for row in rests for rest in row])
            fed_mask = torch.tensor([[1] * (len(rest) - 1) + [0] * (longest - len(rest)) for row in rests for rest in row])
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            lengths = mask.sum(-1).repeat_interleave(n)
            logits = self.model(input_ids=fed, attention_mask=torch.cat([mask.repeat_interleave(n, 0), fed_mask], -1),
                                position_ids=lengths[:, None] + torch.arange(longest - 1), past_key_values=cache).logits
            later = logits.float().log_softmax(-1)
        for b, row in enumerate(rests):
            for c, rest in enumerate(row):
                scores[b][c] += sum(later[b * n + c, t - 1, token].item() for t, token in enumerate(rest) if t > 0)
        return scores

    def _left_padded(self, rows: list[list[int]]):
        """Token ids, attention mask and positions of left-padded rows (positions counted from each row's start)."""
        import torch

        width = max(map(len, rows))
        ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _next_logprobs(self, rows: list[list[int]]):
        """Next-token log-probabilities after each row, in one forward pass."""
        import torch

        ids, mask, positions = self._left_padded(rows)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1].float().log_softmax(-1)

    async def top_tokens(self, prompts: list[ChatPrompt], k: int) -> list[list[tuple[str, float]]]:
        """The k likeliest next tokens after each prompt's answer start and their log-probabilities."""

        def run() -> list[list[tuple[str, float]]]:
            rows = [self.tokenizer.encode(render_prompt(self.tokenizer, p), add_special_tokens=False) for p in prompts]
            top = self._next_logprobs(rows).topk(k)
            return [[(self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
                    for ids, values in zip(top.indices, top.values)]

        return await self.calls.run(run)


class VLLMEngine:
    """A vLLM engine inside the replica; one call schedules all its requests together (continuous batching)."""

    prefills = True

    def __init__(self, cfg: LLMConfig):
        path_like = cfg.model.startswith(("~", "/", ".")) or Path(cfg.model).expanduser().exists()
        model = str(model_folder(cfg.model)) if path_like else cfg.model  # else a hub name (GPU clusters)
        from sip import vllm_adapter

        try:
            self.llm, self.tokenizer = vllm_adapter.text_engine(
                model, offline=path_like, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                enforce_eager=cfg.enforce_eager, gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed)
        except ImportError as err:
            raise EngineError(f"backend=vllm: {err}") from err
        self.cfg = cfg
        self.vllm = vllm_adapter
        self.calls = OneCallAtATime(cfg.timeout_s)

    async def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        return await self.calls.run(self._generate, requests)

    def _generate(self, requests: list[GenRequest]) -> list[list[str]]:
        prompts = [render_prompt(self.tokenizer, r.prompt) for r in requests]
        asked = [(r.n, r.max_tokens, list(r.prompt.stop)) for r in requests]
        return self.vllm.complete(self.llm, prompts, asked, temperature=self.cfg.temperature, top_p=self.cfg.top_p)

    async def choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float]]:
        return await self.calls.run(self._choice_probs, prompts, choices)

    def _choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float]]:
        """Each choice appended to the prompt and scored by the engine's prompt log-probabilities."""
        seqs = []
        for prompt in prompts:
            context, rests = choice_tokens(self.tokenizer, render_prompt(self.tokenizer, prompt), choices)
            seqs += [(context + rest, len(rest)) for rest in rests]
        scores = self.vllm.ending_logprobs(self.llm, seqs)
        k = len(choices)
        return [normalised(scores[i : i + k]) for i in range(0, len(scores), k)]


class OpenAIEngine:
    """Chat completions over HTTP from any OpenAI-compatible server (vLLM, a hosted API, ...).

    The API key is read from the environment variable named by `llm.api_key_env` and kept out of
    every log line, error and repr. 429 and 5xx answers and connection errors are retried with
    exponential backoff (a Retry-After header, when sent, sets the wait); other errors fail at once.
    With `llm.continue_final_message`, the answer start goes out as a final assistant message for
    the server to continue (vLLM's extension, which `sip.serve.openai_server` also speaks).
    """

    MAX_BACKOFF_S = 30.0

    def __init__(self, cfg: LLMConfig):
        if not cfg.base_url:
            raise EngineError("backend=openai needs llm.base_url")
        self.cfg = cfg
        self.prefills = cfg.continue_final_message
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key: str | None = None
        if cfg.api_key_env:
            self._key = os.environ.get(cfg.api_key_env)
            if not self._key:
                raise EngineError(f"llm.api_key_env={cfg.api_key_env}, but that environment variable is not set")
        self._session = None
        self._session_loop = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        key = f"${self.cfg.api_key_env}" if self._key else "none"
        return f"OpenAIEngine(url={self.url!r}, model={self.cfg.model!r}, key={key})"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    def _client(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop or self._session.closed:
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            self._session = aiohttp.ClientSession(headers=headers)
            self._session_loop = loop
            self._semaphore = asyncio.Semaphore(self.cfg.concurrency)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        self._client()
        jobs = [self._complete(r) for r in requests for _ in range(r.n)]
        texts = await asyncio.gather(*jobs)
        return per_request(requests, list(texts))

    async def choice_probs(self, prompts: list[ChatPrompt], choices: Sequence[str]) -> list[list[float] | None]:
        """From the top 20 first tokens of a one-token answer (so a choice of several tokens counts by
        its first): a token counts for the one choice it begins or that it begins with. A token that
        begins several choices but is none of them (the lone space of " 1" / " 2" where the tokenizer
        splits digits off, as SmolLM2's does) is followed: one more request, with the answer start
        extended by that token, splits its probability among those choices by what comes next (up to
        SHARED_DEPTH such tokens in a row; deeper ones count for none)."""
        self._client()
        return list(await asyncio.gather(*(self._choice_probs(p, choices) for p in prompts)))

    SHARED_DEPTH = 2  # bounds the requests per judgment (1 + SHARED_DEPTH where choices share one token)

    async def _choice_probs(self, prompt: ChatPrompt, choices: Sequence[str], depth: int = 0) -> list[float] | None:
        body = {**self._body(prompt), "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
        raw = await self._post(body)
        try:
            top = json.loads(raw)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            tokens = [(entry["token"], float(entry["logprob"])) for entry in top]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineError(f"{self.url} answered 200 but without top_logprobs: {self._redact(raw[:200])!r}") from None
        mass = [0.0] * len(choices)
        shared = []  # (probability, token, the choices it is a strict prefix of)
        for token, logprob in tokens:
            hits = [c for c, choice in enumerate(choices) if choice.startswith(token) or token.startswith(choice)]
            if len(hits) == 1:
                mass[hits[0]] += math.exp(logprob)
            elif len(hits) > 1 and token and all(len(choices[c]) > len(token) for c in hits):
                shared.append((math.exp(logprob), token, hits))
        if shared and self.prefills and depth < self.SHARED_DEPTH:  # the answer start can only grow where it is prefilled
            nexts = await asyncio.gather(*(
                self._choice_probs(ChatPrompt(prompt.messages, prompt.answer_start + token, prompt.stop),
                                   [choices[c][len(token) :] for c in hits], depth + 1)
                for _, token, hits in shared
            ))
            for (p, _, hits), after in zip(shared, nexts, strict=True):
                if after is not None:
                    for c, q in zip(hits, after, strict=True):
                        mass[c] += p * q
        total = sum(mass)
        return [m / total for m in mass] if total else None

    def _body(self, prompt: ChatPrompt) -> dict:
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        body = {"model": self.cfg.model}
        if self.prefills and prompt.answer_start:
            messages.append({"role": "assistant", "content": prompt.answer_start})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return {**body, "messages": messages}

    async def _complete(self, request: GenRequest) -> str:
        prompt = request.prompt
        body = {**self._body(prompt), "max_tokens": request.max_tokens, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        if prompt.stop:
            body["stop"] = list(prompt.stop)
        return cut_at_stop(self._answer(await self._post(body)), prompt.stop)

    async def _post(self, body: dict) -> str:
        """The text of a 200 answer to `body`, retrying 429, 5xx and connection errors with backoff."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        problem = ""
        for attempt in range(self.cfg.http_retries + 1):
            wait = min(self.cfg.backoff_s * 2**attempt, self.MAX_BACKOFF_S)
            session = self._client()
            try:
                async with self._semaphore, session.post(self.url, json=body, timeout=timeout) as resp:
                    if resp.status == 200:
                        return await resp.text()
                    detail = self._redact((await resp.text())[:300])
                    problem = f"HTTP {resp.status}: {detail}"
                    if resp.status != 429 and resp.status < 500:
                        raise EngineError(f"{self.url} refused the request ({problem})")
                    retry_after = resp.headers.get("Retry-After", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = min(float(retry_after), self.MAX_BACKOFF_S)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                problem = self._redact(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            if attempt < self.cfg.http_retries:
                log.warning("%s: %s; retry %d/%d in %.1fs", self.url, problem, attempt + 1, self.cfg.http_retries, wait)
                await asyncio.sleep(wait)
        raise EngineError(f"{self.url} failed after {self.cfg.http_retries + 1} attempts; last: {problem}")

    def _answer(self, raw: str) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineError(f"{self.url} answered 200 but not with a chat completion: {self._redact(raw[:200])!r}") from None
        return content or ""


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine, "openai": OpenAIEngine}


def make_engine(name: str, cfg: LLMConfig) -> TextEngine:
    if name not in ENGINES:
        raise ValueError(f"unknown LLM engine '{name}': one of {sorted(ENGINES)}")
    return ENGINES[name](cfg)
