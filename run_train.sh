#!/usr/bin/env bash
# Train ddpm_ms. Usage:
#   bash run_train.sh [--device auto|Ascend|GPU|CPU] [--config configs/quick.yaml] [more ddpm-train args / key=value]
# A device that is not available falls back (Ascend -> GPU -> CPU) with one warning.
set -euo pipefail
cd "$(dirname "$0")"
config=configs/quick.yaml
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
exec python -m ddpm_ms.train --config "$config" "${args[@]+"${args[@]}"}"
