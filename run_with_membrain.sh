#!/usr/bin/env bash
# Run any command with Membrain switched on for vLLM. Variables already set are kept.
#   ./run_with_membrain.sh python -m vllm.entrypoints.openai.api_server --model ...
# Same as: membrain run -- <command>
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
export VLLM_MEMBRAIN_ENABLED="${VLLM_MEMBRAIN_ENABLED:-1}"
export VLLM_MEMBRAIN_ENDPOINT="${VLLM_MEMBRAIN_ENDPOINT:-http://localhost:9201}"
export VLLM_MEMBRAIN_NAMESPACE="${VLLM_MEMBRAIN_NAMESPACE:-default}"
exec "$@"
