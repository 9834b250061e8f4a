#!/usr/bin/env bash
# MFU on one NVIDIA GPU, measured through `jaxlm train` itself (metrics.jsonl's mfu and
# tokens_per_sec_per_device), for configs/gpt2_124m.py and a ~350M decoder (GPT-2 medium's shape),
# bf16, scanned layers, with each attention implementation side by side in the same session.
#
#   bash benchmarks/gpu.sh [STEPS]        # from the repository root, on the GPU machine
#
# Each row is a fresh `jaxlm train` on the built-in data with GPT-2's vocabulary size (50304), no
# evaluation or checkpoint inside the timed steps; the figure is the median over the logged lines after
# the first (which holds the compile). Needs jax with CUDA: pip install -e . "jax[cuda12]".
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
OUT=${OUT:-$(mktemp -d)}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
python -c "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind); assert d.platform == 'gpu'"

row() {  # name, then jaxlm overrides
  local name=$1; shift
  local workdir="$OUT/$name"
  python -m jaxlm.cli train --workdir="$workdir" --config.train.steps="$STEPS" --config.train.log_every=10 \
    --config.train.eval_every=1000000 --config.train.checkpoint_every=1000000 --config.train.sample_tokens=0 \
    --config.train.eval_batches=1 --config.model.vocab_size=50304 --config.mesh.data=1 "$@" \
    > "$workdir.log" 2>&1 || { echo "$name: failed, see $workdir.log"; tail -5 "$workdir.log"; return 0; }
  python - "$name" "$workdir/metrics.jsonl" <<'PY'
import json, statistics, sys
name, path = sys.argv[1:]
rows = [r for r in map(json.loads, open(path)) if "mfu" in r][1:]  # (the first line includes the compile)
med = lambda k: statistics.median(r[k] for r in rows)
print(f"{name:34s} {med('tokens_per_sec_per_device'):>12,.0f} tok/s/device  MFU {100 * med('mfu'):5.1f}%", flush=True)
PY
}

M350="--config.model.num_layers=24 --config.model.width=1024 --config.model.num_heads=16 --config.model.mlp_width=4096"
for attention in cudnn dot_product einsum; do
  row "gpt2_124m-$attention" --config=configs/gpt2_124m.py --config.data.batch_size=16 --config.model.attention=$attention
done
for attention in cudnn einsum; do
  # shellcheck disable=SC2086
  row "decoder_350m-$attention" --config=configs/gpt2_124m.py $M350 --config.data.batch_size=8 \
    --config.model.attention=$attention
done
row "decoder_350m-cudnn-remat" --config=configs/gpt2_124m.py $M350 --config.data.batch_size=16 \
  --config.model.attention=cudnn --config.model.remat=save_projections
