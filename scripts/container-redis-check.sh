#!/usr/bin/env bash
# The signaling image with --store redis://: a redis-server on the host's loopback, the image
# run with DUET_SIGNALING_STORE pointing at it (slirp4netns reaches the host's loopback at
# 10.0.2.2 with allow_host_loopback), /healthz must report a healthy redis store, and a raw
# pairing must go through. Called by scripts/container-test.sh with the image to test;
# removes its container and stops its redis-server whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:?usage: container-redis-check.sh IMAGE}
PY=${PY:-$PWD/.venv/bin/python}
NAME=duet-signaling-container-redis-check
PODMAN_FLAGS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
trap 'echo "container-redis-check: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

command -v redis-server >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
REDIS_PORT=$(free_port)
PORT=$(free_port)
REDIS_DIR=$(mktemp -d)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no --save "" \
    --appendonly no --dir "$REDIS_DIR" >"$REDIS_DIR/redis.log" 2>&1 &
REDIS_PID=$!
cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    kill "$REDIS_PID" 2>/dev/null || true
    rm -rf "$REDIS_DIR"
}
trap cleanup EXIT
podman rm -f "$NAME" >/dev/null 2>&1 || true

podman run -d --name "$NAME" "${PODMAN_FLAGS[@]}" \
    --network slirp4netns:port_handler=slirp4netns,allow_host_loopback=true \
    -p "127.0.0.1:$PORT:8765" -e "DUET_SIGNALING_STORE=redis://10.0.2.2:$REDIS_PORT/0" \
    "$IMAGE" >/dev/null
URL="http://127.0.0.1:$PORT"
"$PY" - "$URL/healthz" <<'PYEOF'
import json, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
            body = json.load(response)
        break
    except (OSError, urllib.error.URLError) as exc:
        if time.monotonic() > deadline:
            sys.exit(f"/healthz never answered 200 with the redis store: {exc}")
        time.sleep(0.3)
assert body["store"] == {"kind": "redis", "healthy": True}, body
print(f"    /healthz: store {body['store']}")
PYEOF
"$PY" scripts/container-pair.py "$URL" --check raw | sed 's/^/    /'
echo "    redis store check passed"
