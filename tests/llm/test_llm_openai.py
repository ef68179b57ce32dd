"""The openai engine against real HTTP servers on 127.0.0.1.

The model answers come from the real SmolLM2 behind `sip.serve.openai_server`. A small proxy in
front of it answers 429 / 5xx first, stalls, or counts requests in flight, to test retries with
backoff, timeouts and the concurrency limit. The API key must never show in logs, errors or reprs.
"""

import asyncio
import json
import logging
import math
import os
import time

import pytest
from aiohttp import ClientSession, web

from sip.records import Passage
from sip.serve.engines import ChatPrompt, EngineError, GenRequest, OpenAIEngine
from sip.serve.llm import LLMTeacher

SERVER_KEY_ENV = "SIP_TEST_OPENAI_KEY"  # set by the smollm2_server fixture (conftest.py)

PASSAGE = Passage("Peru is a country in South America. The capital of Peru is", " Lima, a city on the Pacific coast.")
DIRECT = {"quality": "quality_direct_v1", "safety": "safety_direct_v1", "factuality": "factuality_direct_v1",
          "coherence": "coherence_v1", "rewrite": "rewrite_v1"}
PROMPT = ChatPrompt((("user", "Say hello."),))
CANNED = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}


def llm_cfg(base_url, **kw):
    from sip.config import LLMConfig

    base = dict(base_url=base_url, model="smollm2", api_key_env=SERVER_KEY_ENV, backoff_s=0.01, timeout_s=120)
    return LLMConfig(**{**base, **kw})


class Proxy:
    """A real HTTP server on 127.0.0.1: answers from `script` first (status codes), then forwards, cans, or
    answers `answer(body)`."""

    def __init__(self, upstream=None, script=(), delay_s=0.0, answer=None):
        self.upstream, self.script, self.delay_s, self.answer = upstream, list(script), delay_s, answer
        self.seen, self.in_flight, self.max_in_flight = [], 0, 0

    async def handle(self, request):
        self.seen.append((request.headers.get("Authorization", ""), await request.json()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.script:
                status = self.script.pop(0)
                return web.json_response({"error": {"message": f"scripted {status}"}}, status=status,
                                         headers={"Retry-After": "0"} if status == 429 else {})
            if self.answer is not None:
                return web.json_response(self.answer(self.seen[-1][1]))
            if self.upstream is None:
                return web.json_response(CANNED)
            async with ClientSession() as session:
                headers = {"Authorization": request.headers.get("Authorization", "")}
                async with session.post(f"{self.upstream}/chat/completions", json=self.seen[-1][1], headers=headers) as resp:
                    return web.Response(status=resp.status, text=await resp.text(), content_type="application/json")
        finally:
            self.in_flight -= 1

    async def __aenter__(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


@pytest.fixture
def key_watch(caplog):
    """Everything logged at DEBUG and above; at the end, the key must appear nowhere in it."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert os.environ[SERVER_KEY_ENV] not in caplog.text


@pytest.mark.llm
def test_judge_and_rewriter_through_the_real_server(smollm2_server, key_watch):
    cfg = llm_cfg(smollm2_server, prompts=DIRECT, max_tokens=4, rewrite_max_tokens=8, continue_final_message=True, max_retries=1)

    async def run():
        engine = OpenAIEngine(cfg)
        teacher = LLMTeacher(engine, cfg, ("quality", "safety", "rewrite"))
        try:
            return (await teacher.compare([(PASSAGE, PASSAGE.suffix, " Quito.")]), await teacher.safety([(PASSAGE, " Quito.")]),
                    await teacher.rewrite([PASSAGE]), teacher.parse_failures, repr(engine))
        finally:
            await engine.close()

    quality, safety, rewrite, failures, text = asyncio.run(run())
    assert quality[0] in (None, 0.0, 0.5, 1.0) and safety[0] in (None, 0.0, 0.5, 1.0)
    assert failures < 2 * 2  # the prefilled verdict lines parse at least sometimes
    assert isinstance(rewrite[0], str)
    assert os.environ[SERVER_KEY_ENV] not in text and SERVER_KEY_ENV in text


@pytest.mark.llm
def test_429_and_500_are_retried_with_backoff(smollm2_server, key_watch):
    cfg = llm_cfg(smollm2_server, http_retries=3)

    proxy_holder = {}

    async def run_and_keep():
        proxy = Proxy(upstream=smollm2_server, script=[429, 500])
        proxy_holder["p"] = proxy
        async with proxy as url:
            engine = OpenAIEngine(cfg.model_copy(update={"base_url": url}))
            try:
                return await engine.generate([GenRequest(PROMPT, 3)])
            finally:
                await engine.close()

    answers = asyncio.run(run_and_keep())
    proxy = proxy_holder["p"]
    assert len(answers) == 1 and len(answers[0]) == 1 and isinstance(answers[0][0], str)
    assert len(proxy.seen) == 3  # 429, 500, then the real answer
    assert all(auth == f"Bearer {os.environ[SERVER_KEY_ENV]}" for auth, _ in proxy.seen)
    assert proxy.seen[0][1]["model"] == "smollm2" and proxy.seen[0][1]["max_tokens"] == 3
    retries = [r for r in key_watch.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "HTTP 429" in retries[0].getMessage() and "HTTP 500" in retries[1].getMessage()


def test_retries_run_out_with_a_clear_error(key_watch):
    cfg = llm_cfg("http://unused", http_retries=2, api_key_env=None)

    async def run():
        async with Proxy(script=[503, 502, 500, 500]) as url:
            engine = OpenAIEngine(cfg.model_copy(update={"base_url": url}))
            try:
                await engine.generate([GenRequest(PROMPT, 3)])
            finally:
                await engine.close()

    with pytest.raises(EngineError, match=r"failed after 3 attempts; last: HTTP 500"):
        asyncio.run(run())


@pytest.mark.llm
def test_a_wrong_key_fails_at_once_and_is_not_shown(smollm2_server, key_watch, monkeypatch):
    monkeypatch.setenv("SIP_TEST_WRONG_KEY", "sk-wrong-0123456789")
    cfg = llm_cfg(smollm2_server, api_key_env="SIP_TEST_WRONG_KEY")
    engine = OpenAIEngine(cfg)

    async def run():
        try:
            await engine.generate([GenRequest(PROMPT, 3)])
        finally:
            await engine.close()

    start = time.perf_counter()
    with pytest.raises(EngineError, match="HTTP 401") as err:
        asyncio.run(run())
    assert time.perf_counter() - start < 10
    assert "sk-wrong" not in str(err.value) and "sk-wrong" not in repr(engine) and "sk-wrong" not in key_watch.text


def test_a_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SIP_TEST_UNSET_KEY", raising=False)
    with pytest.raises(EngineError, match="SIP_TEST_UNSET_KEY.*not set"):
        OpenAIEngine(llm_cfg("http://127.0.0.1:9/v1", api_key_env="SIP_TEST_UNSET_KEY"))


def test_each_request_has_a_timeout(key_watch):
    cfg = llm_cfg("http://unused", api_key_env=None, timeout_s=0.3, http_retries=1)

    async def run():
        async with Proxy(delay_s=3.0) as url:
            engine = OpenAIEngine(cfg.model_copy(update={"base_url": url}))
            start = time.perf_counter()
            try:
                await engine.generate([GenRequest(PROMPT, 3)])
            except EngineError as err:
                return err, time.perf_counter() - start
            finally:
                await engine.close()

    err, seconds = asyncio.run(run())
    assert "failed after 2 attempts; last: TimeoutError" in str(err)
    assert seconds < 2.5  # two tries of 0.3 s, not the server's 3 s


def test_requests_in_flight_stay_under_the_concurrency_limit():
    cfg = llm_cfg("http://unused", api_key_env=None, concurrency=3)
    proxy = Proxy(delay_s=0.1)

    async def run():
        async with proxy as url:
            engine = OpenAIEngine(cfg.model_copy(update={"base_url": url}))
            try:
                return await engine.generate([GenRequest(PROMPT, 3, n=4), GenRequest(PROMPT, 3, n=8)])
            finally:
                await engine.close()

    answers = asyncio.run(run())
    assert [len(a) for a in answers] == [4, 8] and answers[0][0] == "hello"
    assert len(proxy.seen) == 12 and proxy.max_in_flight == 3


def top_logprobs(*pairs):
    """A one-token chat completion with these (token, probability) pairs as its top_logprobs, as vLLM sends them."""
    top = [{"token": token, "logprob": math.log(p), "bytes": list(token.encode())} for token, p in pairs]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": pairs[0][0]},
                         "logprobs": {"content": [{**top[0], "top_logprobs": top}]}, "finish_reason": "length"}]}


FIRST = top_logprobs((" ", 0.8), (" 1", 0.1), ("Option", 0.1))  # the space begins both " 1" and " 2"
AFTER_SPACE = top_logprobs(("2", 0.75), ("1", 0.25), ("\n", 1e-4))


@pytest.mark.parametrize(("case", "choices", "answers", "probs", "starts"), [
    # SmolLM2 writes " 1" as a lone space, then the digit: the engine asks again after the space, which
    # splits its 0.8 as 0.25 / 0.75; the whole-token " 1" (other tokenizers) counts directly
    ("continues", [" 1", " 2"], {"Conclusion: Option ": AFTER_SPACE},
     [(0.1 + 0.8 * 0.25) / 0.9, 0.8 * 0.75 / 0.9], ["Conclusion: Option", "Conclusion: Option "]),
    # a server that loses the trailing space shows the space again, which begins neither "1" nor "2"
    ("drops_trailing_space", [" 1", " 2"], {}, [1.0, 0.0], ["Conclusion: Option", "Conclusion: Option "]),
    # nothing prefilled, nothing to extend: the space counts for neither choice
    ("no_prefill", [" 1", " 2"], {}, [1.0, 0.0], ["Which option is better?"]),
    # choices that share more tokens than SHARED_DEPTH follows: one request per level, then no verdict
    ("too_deep", ["    1", "    2"], {}, None, ["Conclusion: Option" + " " * d for d in range(3)]),
])
def test_a_token_that_begins_several_choices_is_followed(case, choices, answers, probs, starts):
    proxy = Proxy(answer=lambda body: answers.get(body["messages"][-1]["content"], FIRST))
    cfg = llm_cfg("http://unused", api_key_env=None, continue_final_message=case != "no_prefill")
    prompt = ChatPrompt((("user", "Which option is better?"),), "Conclusion: Option", ("\n",))

    async def run():
        async with proxy as url:
            engine = OpenAIEngine(cfg.model_copy(update={"base_url": url}))
            try:
                return await engine.choice_probs([prompt], choices)
            finally:
                await engine.close()

    (got,) = asyncio.run(run())
    assert got == (None if probs is None else pytest.approx(probs))
    assert [body["messages"][-1]["content"] for _, body in proxy.seen] == starts
    prefilled = case != "no_prefill"
    assert all(body["max_tokens"] == 1 and body["top_logprobs"] == 20 and body.get("continue_final_message", False) == prefilled
               for _, body in proxy.seen)
    assert OpenAIEngine.SHARED_DEPTH == 2  # as too_deep counts


@pytest.mark.llm
def test_the_local_server_speaks_the_openai_protocol(smollm2_server):
    import urllib.error
    import urllib.request

    key = os.environ[SERVER_KEY_ENV]

    def post(body, auth=True):
        request = urllib.request.Request(f"{smollm2_server}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if auth else {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, None

    messages = [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "FINAL DECISION:"}]
    status, body = post({"model": "smollm2", "messages": messages, "max_tokens": 3, "n": 2, "stop": ["\n"],
                         "continue_final_message": True, "add_generation_prompt": False})
    assert status == 200 and len(body["choices"]) == 2
    assert all("\n" not in c["message"]["content"] for c in body["choices"])
    assert post({"model": "smollm2", "messages": messages[:1]}, auth=False)[0] == 401
    assert post({"model": "gpt-unknown", "messages": messages[:1], "max_tokens": 2})[0] == 404
    assert post({"model": "smollm2", "messages": [], "max_tokens": 2})[0] == 422
