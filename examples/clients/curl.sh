#!/usr/bin/env bash
# A curl session against `adaptory serve`. Start a server first, e.g.:
#   ADAPTORY_API_KEY=sk-local adaptory serve --preload shout --preload sentiment
# then: ADAPTORY_API_KEY=sk-local MODEL=shout CLASSIFIER=sentiment bash examples/clients/curl.sh
set -euo pipefail

URL="${ADAPTORY_URL:-http://127.0.0.1:8000}"
MODEL="${MODEL:-shout}"
CLASSIFIER="${CLASSIFIER:-sentiment}"
AUTH=()
if [[ -n "${ADAPTORY_API_KEY:-}" ]]; then AUTH=(-H "Authorization: Bearer ${ADAPTORY_API_KEY}"); fi

echo "== health (never needs the key)"
curl -sS "$URL/health"; echo

echo "== models: the bases and every adapter they can serve"
curl -sS "${AUTH[@]}" "$URL/v1/models"; echo

echo "== a completion with adapter $MODEL"
curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/completions" \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"Shout: the cat sat\\nAnswer:\", \"max_tokens\": 16, \"temperature\": 0}"; echo

echo "== a chat completion, streamed as server-sent events"
curl -sS -N "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/chat/completions" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"hello\"}], \"max_tokens\": 16, \"stream\": true}"; echo

echo "== classification with $CLASSIFIER (skipped if it is not registered)"
curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/classify" \
  -d "{\"model\": \"$CLASSIFIER\", \"input\": [\"great product\", \"it broke after a week\"]}" || true; echo

echo "== admin: make an adapter resident, then evict it"
curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/adapters/load" -d "{\"model\": \"$MODEL\"}"; echo
curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/adapters/unload" -d "{\"model\": \"$MODEL\"}"; echo

echo "== an error: unknown model (404, OpenAI-shaped body)"
curl -sS "${AUTH[@]}" -H "Content-Type: application/json" "$URL/v1/completions" \
  -d '{"model": "no-such-adapter", "prompt": "x"}'; echo

echo "== metrics (Prometheus text)"
curl -sS "${AUTH[@]}" "$URL/metrics" | grep -E '^adaptory_(requests_total|generated_tokens_total|resident_adapters)' || true
