#!/usr/bin/env bash
# Train ddpm_ms. Usage:
#   bash run_train.sh [--device auto|Ascend|GPU|CPU] [--config configs/quick.yaml] [--nproc N]
#                     [more ddpm-train arguments, key=value overrides]
# A device that is not available falls back (Ascend -> GPU -> CPU) with one warning.
# --nproc N > 1 launches N data-parallel workers on this machine with MindSpore's msrun
# (batch_size is the global batch; MASTER_PORT and MSRUN_LOG_DIR may be set in the environment).
set -euo pipefail
cd "$(dirname "$0")"
config=configs/quick.yaml
nproc=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --nproc) nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#--nproc=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nproc must be a positive integer, got '$nproc'" >&2
  exit 2
fi
if [ "$nproc" -gt 1 ]; then
  exec msrun --worker_num="$nproc" --local_worker_num="$nproc" --master_port="${MASTER_PORT:-8118}" \
    --log_dir="${MSRUN_LOG_DIR:-msrun_log}" --join=True \
    python -m ddpm_ms.train --config "$config" "${args[@]+"${args[@]}"}"
fi
exec python -m ddpm_ms.train --config "$config" "${args[@]+"${args[@]}"}"
