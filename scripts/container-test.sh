#!/usr/bin/env bash
# Build the signaling server image from ./Dockerfile, run it, probe it, pair peers through it,
# stop it with SIGTERM, and remove it again. `make container-test` runs this (after `make venv`).
#
# Runs as root on a Debian bookworm machine with no container registry in reach (our CI):
#   - installs podman, runc, slirp4netns and debootstrap with apt-get if any is missing;
#   - builds a minimal Debian base image (debootstrap --variant=minbase from the mirror apt
#     uses here) once and keeps it as localhost/bookworm-min for the next runs;
#   - builds with `podman build --format docker` (so HEALTHCHECK is kept) and the host's CA
#     bundle as a build *secret* (TLS to the package registries is re-signed by a local CA
#     here; the bundle is used during the build only and is not stored in the image);
#   - runs with `--runtime runc` (crun refuses this host's hybrid cgroups) and explicit
#     --ulimit values (podman's defaults exceed the host's hard limits), as flags, so no
#     containers.conf or other system-wide setting is changed;
#   - publishes the port on 127.0.0.1 only, through slirp4netns (a user-space port forwarder,
#     so no iptables rules or bridge interfaces are created), and builds with --network host
#     for the same reason.
#
# System state this script leaves behind (and nothing else; it checks that iptables is
# unchanged):
#   - the apt packages podman, runc, slirp4netns, debootstrap and their dependencies, if it
#     had to install them (remove: apt-get purge podman runc slirp4netns debootstrap);
#   - the cached base image localhost/bookworm-min, about 80 MB in /var/lib/containers
#     (remove: podman rmi localhost/bookworm-min);
#   - podman's own storage/state directories under /var/lib/containers and /run/containers;
#   - the empty lock file /tmp/duet-container-test.lock (serializes concurrent runs).
# The test image and container are removed at the end, also when a step fails or the script
# is interrupted. Re-running is safe: leftovers of an interrupted run are removed first.
#
# Environment (all optional):
#   DUET_CONTAINER_BASE   base image for the build; default localhost/bookworm-min, built here.
#                         Set python:3.11-slim-bookworm where a registry is reachable.
#   DUET_DEBIAN_MIRROR    mirror for debootstrap; default: the one in /etc/apt/sources.list(.d)
#   DUET_BUILD_CA         CA bundle passed as the build secret "ca"; default
#                         /etc/ssl/certs/ca-certificates.crt (skipped if missing)
#   DUET_CONTAINER_KEEP_LOGS=1  keep the log directory even when everything passed
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
IMAGE=localhost/duet-signaling:container-test
NAME=duet-signaling-container-test
BASE_IMAGE=${DUET_CONTAINER_BASE:-localhost/bookworm-min}
LOCAL_BASE=localhost/bookworm-min
CA_BUNDLE=${DUET_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
ENV_PROBE_MAX_ROOMS=4321 # passed as DUET_SIGNALING_MAX_ROOMS; /healthz must report it
STOP_TIMEOUT=20
# Flags instead of a system-wide containers.conf (see the header).
PODMAN_FLAGS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
RUN_NETWORK=(--network slirp4netns:port_handler=slirp4netns)

START=$(date +%s.%N)
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/duet-container-test.XXXXXX")
ROOTFS=""
FAILED=()
declare -A RESULT=()

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n==> [%6ss] %s\n' "$(elapsed "$START")" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { # fail ID MESSAGE: record a failed check and go on with the next step
    printf '    FAILED (%s): %s\n' "$1" "$2" >&2
    FAILED+=("$1")
}
die() {
    printf '\nERROR: %s\n' "$*" >&2
    exit 1
}

iptables_state() {
    # Rules and chains only: no counters, no "generated on" comments. A machine with no rules
    # prints nothing (and a missing ip6tables-save fails): that is a state too, not an error.
    if command -v iptables-save >/dev/null 2>&1; then
        { iptables-save || true; ip6tables-save || true; } 2>/dev/null |
            { grep -v '^#' || true; } | sed -E 's/\[[0-9]+:[0-9]+\]//g' | sha256sum |
            cut -d' ' -f1
    else
        echo "no-iptables"
    fi
}

# Any command that fails outside a check says so before the script ends (set -e alone would
# end it silently, as the iptables probe once did on a machine with no rules).
on_error() {
    printf '\nERROR: "%s" failed with status %s (scripts/container-test.sh line %s)\n' \
        "$1" "$2" "$3" >&2
}

cleanup() {
    local status=$?
    set +e
    if command -v podman >/dev/null 2>&1; then
        if podman container exists "$NAME" 2>/dev/null; then
            if [[ $status -ne 0 ]]; then
                echo "--- container logs (last 40 lines) ---" >&2
                podman logs "$NAME" 2>&1 | tail -n 40 >&2
            fi
            podman rm -f -t 0 "$NAME" >/dev/null 2>&1
        fi
        podman image exists "$IMAGE" 2>/dev/null && podman rmi -f "$IMAGE" >/dev/null 2>&1
    fi
    [[ -n $ROOTFS && -d $ROOTFS ]] && rm -rf "$ROOTFS"
    if [[ $status -eq 0 && ${DUET_CONTAINER_KEEP_LOGS:-0} != 1 ]]; then
        rm -rf "$LOGDIR"
    else
        echo "logs kept in $LOGDIR" >&2
    fi
    exit "$status"
}
# The host's Debian mirror (deb822 .sources or one-line .list), as apt uses it for bookworm.
debian_mirror() {
    python3 - <<'EOF'
import glob, re
uris = []
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
            uris.append(words[1])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(
            (m.group(1).lower(), m.group(2))
            for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M)
        )
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and "bookworm" in fields.get("suites", "").split():
            uris += fields.get("uris", "").split()
print(uris[0] if uris else "http://deb.debian.org/debian")
EOF
}

# Sourced with DUET_CONTAINER_TEST_FUNCTIONS_ONLY=1 (the tests), stop here: helpers defined.
if [[ ${DUET_CONTAINER_TEST_FUNCTIONS_ONLY:-0} == 1 ]]; then
    rm -rf "$LOGDIR"
    return 0 2>/dev/null || exit 0
fi
trap 'on_error "$BASH_COMMAND" "$?" "$LINENO"' ERR
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# ---------------------------------------------------------------------------------------------
step "1/10 prerequisites"
[[ $(id -u) -eq 0 ]] || die "needs root (rootful podman, debootstrap, apt-get); CI runs as root"
[[ -x $PY ]] || die "$PY missing: run 'make container-test' (it creates .venv first)"
exec 9>/tmp/duet-container-test.lock
flock -w 900 9 || die "another container test holds /tmp/duet-container-test.lock"
missing=()
for tool in podman runc slirp4netns debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    info "installing with apt-get: ${missing[*]}"
    t=$(date +%s.%N)
    apt-get update -qq >"$LOGDIR/apt.log" 2>&1 || { tail -n 20 "$LOGDIR/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc slirp4netns debootstrap \
        >>"$LOGDIR/apt.log" 2>&1 || { tail -n 20 "$LOGDIR/apt.log"; die "apt-get install failed"; }
    RESULT[apt_install_seconds]=$(elapsed "$t")
fi
info "$(podman --version), $(runc --version | head -n 1)"
IPTABLES_BEFORE=$(iptables_state)
# Leftovers of an interrupted earlier run.
podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
podman rmi -f "$IMAGE" >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
step "2/10 base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
    info "cached; reusing (remove with: podman rmi $BASE_IMAGE)"
    RESULT[base]=cached
elif [[ $BASE_IMAGE == "$LOCAL_BASE" ]]; then
    mirror=${DUET_DEBIAN_MIRROR:-$(debian_mirror)}
    info "debootstrap --variant=minbase bookworm from $mirror"
    t=$(date +%s.%N)
    ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/duet-bookworm-min.XXXXXX")
    debootstrap --variant=minbase bookworm "$ROOTFS" "$mirror" >"$LOGDIR/debootstrap.log" 2>&1 ||
        { tail -n 20 "$LOGDIR/debootstrap.log"; die "debootstrap failed"; }
    # Slim it like Debian's own *-slim images: no docs, man pages, locales, apt caches.
    cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/01-duet-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
        "$ROOTFS"/usr/share/locale/*
    find "$ROOTFS/usr/share/doc" -type f ! -name copyright -delete
    tar -C "$ROOTFS" -c . | podman import \
        --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD=["/bin/bash"]' - "$LOCAL_BASE" >"$LOGDIR/import.log" 2>&1 ||
        { tail -n 20 "$LOGDIR/import.log"; die "podman import failed"; }
    rm -rf "$ROOTFS"
    ROOTFS=""
    RESULT[base]=built
    RESULT[base_seconds]=$(elapsed "$t")
    info "built in ${RESULT[base_seconds]} s (kept for later runs)"
else
    info "not present; podman build will pull it"
    RESULT[base]=pulled
fi

# ---------------------------------------------------------------------------------------------
step "3/10 podman build --format docker -t $IMAGE (BASE=$BASE_IMAGE)"
build=(podman build "${PODMAN_FLAGS[@]}" --format docker --layers=false --network host
    --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" -f Dockerfile)
if [[ -s $CA_BUNDLE ]]; then
    build+=(--secret "id=ca,src=$CA_BUNDLE")
    info "CA bundle $CA_BUNDLE passed as build secret 'ca' (not stored in the image)"
fi
t=$(date +%s.%N)
"${build[@]}" . >"$LOGDIR/build.log" 2>&1 || { tail -n 40 "$LOGDIR/build.log"; die "image build failed"; }
RESULT[build_seconds]=$(elapsed "$t")
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
RESULT[image_size_mb]=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
info "built in ${RESULT[build_seconds]} s; image size ${RESULT[image_size_mb]} MB"

# ---------------------------------------------------------------------------------------------
step "4/10 image contents: healthcheck, non-root user, no numpy/torch, no CA secret"
healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
info "HEALTHCHECK: $healthcheck"
info "USER: $user"
[[ $healthcheck == *healthz* ]] || fail image_healthcheck "the image has no HEALTHCHECK on /healthz"
if ! contents=$(podman run --rm "${PODMAN_FLAGS[@]}" --network none --entrypoint python "$IMAGE" -c '
import importlib.util, json, os
print(json.dumps({
    "uid": os.getuid(),
    "present": [m for m in ("numpy", "torch", "aiortc", "duet") if importlib.util.find_spec(m)],
    "ca_secret_in_image": os.path.exists("/run/secrets/ca"),
    "server": bool(importlib.util.find_spec("signaling_server")),
}))' 2>"$LOGDIR/contents.err"); then
    cat "$LOGDIR/contents.err" >&2
    fail image_contents "could not run python in the image"
else
    info "$contents"
    [[ $contents == *'"uid": 0,'* ]] && fail image_user "the server runs as root"
    [[ $contents == *'"present": [],'* ]] || fail image_packages "unexpected packages: $contents"
    [[ $contents == *'"ca_secret_in_image": false'* ]] || fail image_ca "the CA secret is in the image"
    [[ $contents == *'"server": true'* ]] || fail image_server "signaling_server is not installed"
fi

# ---------------------------------------------------------------------------------------------
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
step "5/10 podman run -p 127.0.0.1:$PORT:8765 -e DUET_SIGNALING_MAX_ROOMS=$ENV_PROBE_MAX_ROOMS"
t=$(date +%s.%N)
# stderr: podman logs harmless errors about the systemd healthcheck timer (no systemd here).
podman run -d --name "$NAME" "${PODMAN_FLAGS[@]}" "${RUN_NETWORK[@]}" \
    -p "127.0.0.1:$PORT:8765" -e "DUET_SIGNALING_MAX_ROOMS=$ENV_PROBE_MAX_ROOMS" \
    "$IMAGE" >"$LOGDIR/run.out" 2>"$LOGDIR/run.err" || { cat "$LOGDIR/run.err" >&2; die "podman run failed"; }
info "container $(cut -c1-12 "$LOGDIR/run.out") started"

# ---------------------------------------------------------------------------------------------
step "6/10 wait for $URL/healthz"
if ! health=$("$PY" - "$URL/healthz" <<'EOF'
import json, sys, time, urllib.request
error = None
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
            body = json.load(response)
            if response.status == 200:
                print(json.dumps(body))
                break
    except (OSError, ValueError) as exc:
        error = exc
    if time.monotonic() > deadline:
        sys.exit(f"no 200 from {sys.argv[1]} in 30 s: {error}")
    time.sleep(0.2)
EOF
); then
    die "the server did not become healthy"
fi
RESULT[startup_seconds]=$(elapsed "$t")
info "healthy after ${RESULT[startup_seconds]} s: $health"
if [[ $health == *"\"max_rooms\": $ENV_PROBE_MAX_ROOMS"* ]]; then
    info "DUET_SIGNALING_MAX_ROOMS reached the server"
else
    fail env_config "/healthz does not report max_rooms=$ENV_PROBE_MAX_ROOMS set by the environment"
fi

# ---------------------------------------------------------------------------------------------
# pair_check CHECK KEY WHAT: run one container-pair.py check, record its JSON under KEY.
pair_check() {
    local out
    if out=$("$PY" scripts/container-pair.py "$URL" --check "$1"); then
        info "$out"
        RESULT[$2]=$out
    else
        info "$out"
        fail "$2" "$3"
    fi
}

step "7/10 raw protocol pairing through the container (two WebSocket clients)"
pair_check raw raw_pairing "raw WebSocket pairing through the container"

# ---------------------------------------------------------------------------------------------
step "8/10 duet pairing through the container (owner and researcher processes)"
pair_check duet duet_pairing "duet.launch/duet.join pairing through the container"

# ---------------------------------------------------------------------------------------------
step "9/10 podman healthcheck run $NAME"
if hc=$(podman healthcheck run "$NAME" 2>&1); then
    info "${hc:-healthy} (status: $(podman inspect --format '{{.State.Health.Status}}' "$NAME"))"
else
    info "$hc"
    fail healthcheck "podman healthcheck run"
fi

step "9b/10 the image with --store redis:// against a redis-server on this machine"
PY=$PY bash scripts/container-redis-check.sh "$IMAGE" || fail redis_store "the image with a Redis store"

# ---------------------------------------------------------------------------------------------
step "10/10 podman stop (SIGTERM), clean exit, remove container and image"
t=$(date +%s.%N)
podman stop -t "$STOP_TIMEOUT" "$NAME" >/dev/null 2>>"$LOGDIR/run.err"
RESULT[stop_seconds]=$(elapsed "$t")
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
RESULT[exit_code]=$exit_code
podman logs "$NAME" >"$LOGDIR/container.log" 2>&1
info "exit code $exit_code after ${RESULT[stop_seconds]} s"
if [[ $exit_code != 0 ]]; then
    tail -n 20 "$LOGDIR/container.log" >&2
    fail clean_exit "the server exited with $exit_code on SIGTERM (want 0)"
elif ! grep -q '"signal": "SIGTERM"' "$LOGDIR/container.log"; then
    fail clean_exit "the server's log does not show it handling SIGTERM"
else
    info "server logged: $(grep -o '"event": "[a-z_]*"' "$LOGDIR/container.log" | tail -n 3 | cut -d'"' -f4 | paste -sd, -)"
fi
podman rm "$NAME" >/dev/null 2>>"$LOGDIR/run.err"
podman rmi "$IMAGE" >/dev/null
info "container and image removed; base image $BASE_IMAGE kept"

IPTABLES_AFTER=$(iptables_state)
if [[ $IPTABLES_BEFORE == "$IPTABLES_AFTER" ]]; then
    RESULT[iptables_unchanged]=true
else
    RESULT[iptables_unchanged]=false
    fail iptables "iptables rules changed during the test"
fi

# ---------------------------------------------------------------------------------------------
RESULT[total_seconds]=$(elapsed "$START")
status=passed
((${#FAILED[@]} == 0)) || status=failed
summary=$(
    for key in "${!RESULT[@]}"; do printf '%s\t%s\n' "$key" "${RESULT[$key]}"; done |
        STATUS=$status FAILED_STEPS="${FAILED[*]:-}" python3 -c '
import json, os, sys
out = {"container_test": os.environ["STATUS"], "failed": os.environ["FAILED_STEPS"].split()}
for line in sys.stdin:
    key, value = line.rstrip("\n").split("\t", 1)
    try:
        value = json.loads(value)
    except ValueError:
        pass
    out[key] = value
first = ("container_test", "failed")
print(json.dumps(dict(sorted(out.items(), key=lambda kv: (kv[0] not in first, kv[0])))))'
)
echo
echo "$summary"
[[ $status == passed ]] || exit 1
