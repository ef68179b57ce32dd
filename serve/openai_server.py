"""A small OpenAI-compatible chat-completions server for a local HF model (SmolLM2 by default).

    python -m sip.serve.openai_server --model ~/.cache/sip/smollm2 --port 8000

It serves POST /v1/chat/completions and GET /v1/models on 127.0.0.1 unless told otherwise, batches
concurrent requests into one generate call, honours `stop`, `n`, `max_tokens` and vLLM's
`continue_final_message`, answers a `logprobs` request with the most likely next token and its
`top_logprobs` (one token, whatever `max_tokens` says), and with `--api-key-env VAR` answers 401
unless the request carries that key. It exists so the `openai` backend can be tested and benchmarked
offline; point real runs at vLLM (`vllm serve`) or a hosted API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from sip.serve.engines import ChatPrompt, GenRequest, HFEngine
from sip.serve.smollm2 import DEFAULT_DIR
from sip.config import LLMConfig

BATCH_WAIT_S = 0.01


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)


class Batcher:
    """Gathers requests that arrive within BATCH_WAIT_S and share sampling settings into one generate call."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, key: tuple[float, float], request: GenRequest) -> list[str]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((key, request, future))
        return await future

    async def run(self) -> None:
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(BATCH_WAIT_S)
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            groups: dict[tuple[float, float], list] = {}
            for item in items:
                groups.setdefault(item[0], []).append(item)
            for key, group in groups.items():
                try:
                    answers = await self.engine.generate([request for _, request, _ in group], *key)
                except Exception as err:  # every waiting request hears of it
                    for _, _, future in group:
                        future.set_exception(err)
                    continue
                for (_, _, future), texts in zip(group, answers):
                    future.set_result(texts)


def make_app(model: str, served_name: str, api_key: str | None, torch_threads: int = 1, batch_size: int = 8) -> FastAPI:
    engine = HFEngine(LLMConfig(model=model, torch_threads=torch_threads, batch_size=batch_size, timeout_s=600))
    batcher = Batcher(engine)

    @asynccontextmanager
    async def lifespan(_app):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(lifespan=lifespan)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "sip"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_key(request)
        if body.model != served_name:
            raise HTTPException(status_code=404, detail=f"model '{body.model}' is not served here; this server has '{served_name}'")
        messages = [(m.role, m.content) for m in body.messages]
        answer_start = ""
        if body.continue_final_message:
            if messages[-1][0] != "assistant":
                raise HTTPException(status_code=400, detail="continue_final_message needs a final assistant message")
            answer_start = messages.pop()[1]
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        prompt = ChatPrompt(tuple(messages), answer_start, stop)
        logprobs = None
        if body.logprobs:
            (top,) = await engine.top_tokens([prompt], max(body.top_logprobs, 1))
            entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
            texts = [top[0][0]]
            logprobs = {"content": [{**entries[0], "top_logprobs": entries[: body.top_logprobs]}]}
        else:
            texts = await batcher.submit((body.temperature, body.top_p), GenRequest(prompt, max_tokens, body.n))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": "stop"}
                for i, text in enumerate(texts)
            ],
        }

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_DIR), help="HF model folder")
    parser.add_argument("--served-model-name", default="smollm2", help="the `model` clients must send")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None, help="environment variable with the key clients must send")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    import uvicorn

    app = make_app(args.model, args.served_model_name, api_key, args.torch_threads, args.batch_size)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
