#!/usr/bin/env bash
# Stream 1 GiB down and 1 GiB up through the demo gateway with curl, then print the gateway's peak RSS.
# Usage: bash bench/stream_1gib.sh   (needs: pip install ., curl)
set -euo pipefail
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
python -c "from mtlsgate.cli import main; main()" demo --dir "$dir/demo" --port 18643 --upstream-port 19643 >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "Stop with Ctrl-C" "$dir/log" && break; sleep 0.2; done
d="$dir/demo"
curl_() { curl -sS --cacert "$d/ca/ca.pem" --cert "$d/alice.pem" --key "$d/alice-key.pem" "$@"; }
size=$((1024 * 1024 * 1024))
echo "download: $(curl_ -o /dev/null -w '%{size_download} bytes %{time_total}s' "https://localhost:18643/bytes/$size")"
echo "upload:   $(head -c $size /dev/zero | curl_ -T - -H 'Content-Type: application/octet-stream' -X POST https://localhost:18643/upload | python -c 'import json,sys; print(json.load(sys.stdin)["body_bytes"], "bytes echoed")')"
echo "process peak RSS (demo: gateway + echo upstream in one process): $(grep VmHWM /proc/$pid/status)"
