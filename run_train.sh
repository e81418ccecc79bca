#!/usr/bin/env bash
# Train ddpm_ms. Usage, from any directory:
#   bash /path/to/run_train.sh [--device auto|Ascend|GPU|CPU] [--config FILE|NAME] [--nproc N]
#                              [more ddpm-train arguments, key=value overrides]
# Relative paths (--config, --data-dir, --output-dir, MSRUN_LOG_DIR) are relative to the directory
# you run it from. --config defaults to this repository's configs/quick.yaml; it also takes a
# packaged config's name (quick, fashion_mnist, ...). This checkout's ddpm_ms is the one run.
# A device that is not available falls back (Ascend -> GPU -> CPU) with one warning; with
# --nproc > 1 a named device that is missing is an error on every worker instead.
# --nproc N > 1 launches N data-parallel workers on this machine with MindSpore's msrun
# (batch_size is the global batch; MASTER_PORT and MSRUN_LOG_DIR may be set in the environment).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# run this checkout's package whether or not it is pip-installed (msrun's workers inherit it)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
config="$repo/configs/quick.yaml"
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
