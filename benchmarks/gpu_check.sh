#!/usr/bin/env bash
# One short check on a machine with an NVIDIA GPU (no network needed).  From the repository root:
#
#     bash benchmarks/gpu_check.sh            # PY=.venv/bin/python by default
#
# 1. the CUDA-parametrised tests (models, AMP) and the distributed tests;
# 2. a 2-process NCCL training smoke run when the machine has >= 2 GPUs (torchrun, synthetic data);
# 3. benchmarks/amp.py: HTC R-50-FPN inference fps at 1333x800 and training memory at 2 img/GPU,
#    float32 vs fp16 vs bf16;
# 4. benchmarks/speed.py --device cuda (instseg vs torchvision Mask R-CNN, HTC).
# Results land in benchmarks/results/; the log in benchmarks/results/gpu_check.log.
set -u -o pipefail
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p benchmarks/results
LOG=benchmarks/results/gpu_check.log
: > "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }
status=0

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG" || exit 1

step "CUDA tests"
"$PY" -m pytest -q -x -k cuda tests/models tests/unit 2>&1 | tail -5 | tee -a "$LOG" || status=1
"$PY" -m pytest -q -x tests/unit/test_amp.py tests/models/test_unused_params.py tests/cli/test_distributed.py 2>&1 | tail -5 | tee -a "$LOG" || status=1

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  step "torchrun: 2 processes, NCCL, fp16, SyncBN, synthetic data"
  D=$(mktemp -d)
  "$PY" -m instseg data synth --out "$D/synth" --train 16 --val 4 2>&1 | tail -3 | tee -a "$LOG" || status=1
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m instseg train --config mask_rcnn_synth_cpu \
      --train-ann "$D/synth/annotations/instances_train.json" --train-images "$D/synth/images/train" \
      --val-ann "$D/synth/annotations/instances_val.json" --val-images "$D/synth/images/val" \
      --stuff-dir "$D/synth/stuffthingmaps/train" --val-stuff-dir "$D/synth/stuffthingmaps/val" \
      --set model.backbone_weights= train.device=cuda train.amp=fp16 train.sync_bn=true train.max_iters=20 \
      train.output_dir="$D/runs" 2>&1 | tail -8 | tee -a "$LOG" || status=1
else
  step "only $NGPU GPU: the NCCL smoke run needs 2 (skipped)"
fi

step "AMP benchmark (HTC R-50-FPN, 1333x800)"
"$PY" benchmarks/amp.py --iters 20 2>&1 | tee -a "$LOG" || status=1

step "speed.py on CUDA"
"$PY" benchmarks/speed.py --device cuda --iters 10 --out benchmarks/results/speed_cuda.json 2>&1 | tail -15 | tee -a "$LOG" || status=1

step "done (status $status)"
exit $status
