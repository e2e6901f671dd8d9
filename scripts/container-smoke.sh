#!/usr/bin/env bash
# Builds the real Dockerfile, runs the image, waits for /readyz, predicts, checks the server runs as
# non-root and that the image's HEALTHCHECK command works, sends SIGTERM and checks a clean exit.
# Uses `docker` where an engine answers, else ../shared/tools/container (buildah, no engine).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-localhost/bnserve:smoke}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
TOOLS=${CONTAINER_TOOLS:-../shared/tools/container}
LOG=$(mktemp /tmp/bnserve-smoke.XXXXXX.log)
say() { printf 'container-smoke: %s\n' "$*"; }
fail() { say "FAILED: $*"; echo "--- container log ---"; tail -n 30 "$LOG"; exit 1; }

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
  build() { docker build -t "$TAG" .; }
  # the image's own command, on the host's loopback (as the buildah runner does)
  start() { docker run --rm --name bnserve-smoke --network host -e BNSERVE_HOST=127.0.0.1 -e BNSERVE_PORT="$PORT" "$TAG"; }
  exec_in() { docker run --rm --network host -e BNSERVE_PORT="$PORT" "$TAG" "$@"; }
  image_size() { docker image inspect --format '{{.Size}}' "$TAG"; }
  healthcheck() { docker image inspect --format '{{json .Config.Healthcheck.Test}}' "$TAG"; }
else
  engine=buildah
  [ -x "$TOOLS/build" ] || { say "no docker engine and no $TOOLS"; exit 1; }
  "$TOOLS/base-image"
  build() { "$TOOLS/build" . "$TAG" --format docker; }
  start() { "$TOOLS/run" -e BNSERVE_HOST=127.0.0.1 -e BNSERVE_PORT="$PORT" "$TAG"; }
  exec_in() { "$TOOLS/run" -e BNSERVE_PORT="$PORT" "$TAG" "$@"; }
  image_size() { podman image inspect --format '{{.Size}}' "$TAG"; }
  healthcheck() { buildah inspect --type image "$TAG" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]))'; }
fi

say "engine: $engine; building $TAG"
t0=$(date +%s)
build > "$LOG.build" 2>&1 || { tail -n 30 "$LOG.build"; fail "build failed"; }
grep -E '^verify: |^model written' "$LOG.build" | sed 's/^/  /'
say "built in $(( $(date +%s) - t0 )) s; image size $(( $(image_size) / 1000000 )) MB"

listener() { ss -ltnpH "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2; }
# On any failure: stop the server itself (signalling the runner alone can leave it running).
cleanup() {
  local p; p=$(listener)
  [ -n "$p" ] && kill -TERM "$p" 2>/dev/null
  kill -TERM "$runner" 2>/dev/null || true
  wait "$runner" 2>/dev/null || true
}
start_ns=$(date +%s%N)
start > "$LOG" 2>&1 &
runner=$!
trap cleanup EXIT
until curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  kill -0 $runner 2>/dev/null || fail "the container exited before it was ready"
  [ $(( ($(date +%s%N) - start_ns) / 1000000000 )) -lt 60 ] || fail "not ready after 60 s"
  sleep 0.1
done
say "ready after $(( ($(date +%s%N) - start_ns) / 1000000 )) ms (container start to /readyz 200)"

row='{"features": [13.54, 14.36, 87.46, 566.3, 0.09779, 0.08129, 0.06664, 0.04781, 0.1885, 0.05766, 0.2699, 0.7886, 2.058, 23.56, 0.008462, 0.0146, 0.02387, 0.01315, 0.0198, 0.0023, 15.11, 19.26, 99.7, 711.2, 0.144, 0.1773, 0.239, 0.1288, 0.2977, 0.07259]}'
answer=$(curl -fsS -X POST "http://127.0.0.1:$PORT/predict" -H 'Content-Type: application/json' -d "$row") || fail "predict failed"
echo "$answer" | python3 -c 'import json, sys; a = json.load(sys.stdin); assert a["class"] in a["probabilities"], a' || fail "bad answer: $answer"
say "predict: $answer"

# The image must serve the model README.md names: the same file a fresh `make model` builds here.
served=$(curl -fsS "http://127.0.0.1:$PORT/model") || fail "GET /model failed"
check=$(python3 - "$served" README.md 2>&1 <<'PY'
import json, re, sys
served = json.loads(sys.argv[1])
sha, version, size = served["file"]["sha256"], served["model_version"], served["file"]["size_bytes"]
print(f"serves {version}, {size} bytes, sha256 {sha}")
pattern = r"model written: models/default\.onnx\s+\((\d+) bytes, sha256 ([0-9a-f]{64})\)"
lines = open(sys.argv[2], encoding="utf-8").read().splitlines()
stated = [(n, m) for n, line in enumerate(lines, 1) if (m := re.search(pattern, line))]
if not stated:
    sys.exit("README.md states no 'model written: models/default.onnx (N bytes, sha256 ...)' line")
for n, m in stated:
    if (int(m[1]), m[2]) != (size, sha):
        sys.exit(f"README.md line {n} states {m[1]} bytes, sha256 {m[2]}: the image serves another "
                 "file (tests/test_readme_model.py says what a fresh `make model` builds here)")
print(f"README.md line {stated[0][0]} states the same")
PY
) || fail "model: $check"
say "model: ${check//$'\n'/; }"

pid=$(listener)
[ -n "$pid" ] || fail "no process listens on port $PORT"
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" != 0 ] || fail "the server (pid $pid) runs as root"
say "server pid $pid runs as uid $uid (non-root)"

hc=$(healthcheck)
mapfile -t hc_cmd < <(python3 -c 'import json, sys; t = json.loads(sys.argv[1]); assert t[0] == "CMD", t; print("\n".join(t[1:]))' "$hc")
exec_in "${hc_cmd[@]}" >/dev/null 2>&1 || fail "the image's HEALTHCHECK command failed against a ready server: $hc"
say "HEALTHCHECK command passes: ${hc_cmd[*]}"

# SIGTERM to the server process itself, as Kubernetes and `docker stop` deliver it; the runner then
# exits with the server's own status (signalling the runner would report its own 143 instead).
kill -TERM "$pid"
rc=0; wait $runner || rc=$?
trap - EXIT
[ "$rc" = 0 ] || fail "exit status $rc after SIGTERM"
grep -q 'Finished server process' "$LOG" || fail "no clean shutdown in the log"
kill -0 "$pid" 2>/dev/null && fail "the server (pid $pid) is still running"
say "SIGTERM: clean exit (status 0)"
say "ok"
