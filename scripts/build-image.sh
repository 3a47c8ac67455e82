#!/usr/bin/env bash
# Build the simple-oci-registry container image from this checkout (`make image` runs this), with
# no network inside the build, and write it as an .oci archive the registry itself can serve.
#
#   1. Wheels, on the host: this project's wheel (pip wheel) and every dependency as a binary
#      wheel for the image's Python and architecture, at the versions pinned in constraints.txt
#      (pip download); a dependency that constraints.txt does not pin stops the build.
#   2. The base image, one of two routes that give the same layout (a venv in /opt/venv on the
#      base's python3, UID 65532, nothing written outside the volumes):
#      - offline (default): a minimal Debian bookworm root filesystem made by mmdebstrap from the
#        Debian mirror apt already uses, imported with `podman import`. The tarball is cached
#        under IMAGE_CACHE_DIR, keyed by everything mmdebstrap is given, so a rebuild skips it.
#      - registry: BASE_IMAGE=<name>@sha256:<digest> of an image with python3 (for example
#        docker.io/library/python:3.11-slim-bookworm@sha256:...); a tag alone is refused, since
#        the same tag can name different bytes tomorrow.
#   3. podman build --network=none --pull=never of Containerfile on a context holding only the
#      wheels and constraints.txt; file times and the creation date come from the last commit.
#   4. The image is written to IMAGE_OCI as an oci-archive with gzip layers, and its sizes are
#      printed.
#
# Settings (environment variables; the Makefile passes its variables of the same name):
#   IMAGE_NAME      the image's name in local storage (localhost/simple-oci-registry)
#   IMAGE_TAG       its tag (the project version from pyproject.toml)
#   IMAGE_OCI       where the .oci archive goes (demo-images/simple-oci-registry/<tag>.oci)
#   IMAGE_CACHE_DIR root filesystem and wheel cache (build/image-cache)
#   BASE_IMAGE      registry base pinned by digest; empty: the offline Debian base
#   DEBIAN_MIRROR   mirror for mmdebstrap (the first deb.debian.org-style URI apt uses)
#   PYTHON          the host Python that runs pip (.venv/bin/python when present)
# podman honours CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, which is how the tests give the
# build a private storage.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE_NAME=${IMAGE_NAME:-localhost/simple-oci-registry}
IMAGE_TAG=${IMAGE_TAG:-$VERSION}
IMAGE_OCI=${IMAGE_OCI:-demo-images/simple-oci-registry/$IMAGE_TAG.oci}
IMAGE_CACHE_DIR=${IMAGE_CACHE_DIR:-build/image-cache}
BASE_IMAGE=${BASE_IMAGE:-}
# Debian bookworm's python3, and the ABI the wheels are downloaded for. A registry base must
# have the same minor version (the build checks).
PYTHON_VERSION=3.11
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# File times and the image's creation date: the last commit's, so two builds of one commit
# differ only where the Debian mirror moved on.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH

command -v podman >/dev/null || die "podman is not installed (scripts/install-system-deps.sh)"
case $(uname -m) in
    x86_64) WHEEL_ARCH=x86_64 ;;
    aarch64) WHEEL_ARCH=aarch64 ;;
    *) die "no wheel platform known for $(uname -m)" ;;
esac

CONTEXT=build/image-context
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/wheels" "$IMAGE_CACHE_DIR/wheels"
cp constraints.txt "$CONTEXT/constraints.txt"

# --- 1. wheels --------------------------------------------------------------------------------
log "building the project wheel"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$CONTEXT/wheels" . 2>&1 | grep -v '^WARNING: Location' >&2 || true
project_wheel=$(ls "$CONTEXT"/wheels/simple_oci_registry-*.whl 2>/dev/null) ||
    die "pip wheel did not produce the project wheel"
# pip matches --platform literally, so name every manylinux level glibc 2.36 (bookworm) runs.
platforms=()
for minor in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${minor}_$WHEEL_ARCH"); done
platforms+=(--platform "manylinux2014_$WHEEL_ARCH")
download=("$PYTHON" -m pip download --quiet --dest "$CONTEXT/wheels" --constraint constraints.txt
          --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
          --abi "cp${PYTHON_VERSION/./}" --abi abi3 --abi none "${platforms[@]}"
          --find-links "$IMAGE_CACHE_DIR/wheels" "$project_wheel" pip)
# The cache first, without the index, so a rebuild works offline; the index when it lacks one.
if ! "${download[@]}" --no-index >/dev/null 2>&1; then
    log "downloading dependency wheels"
    "${download[@]}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
fi
cp -n "$CONTEXT"/wheels/*.whl "$IMAGE_CACHE_DIR/wheels/" 2>/dev/null || true
# Every wheel must be the version constraints.txt pins: an unpinned dependency would make two
# builds of one commit install different sets.
"$PYTHON" - "$CONTEXT/wheels" constraints.txt <<'EOF' || die "constraints.txt does not pin every dependency; run make lock"
import pathlib, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {}
for line in pathlib.Path(sys.argv[2]).read_text().splitlines():
    name, sep, version = line.split("#")[0].strip().partition("==")
    if sep:
        pins[norm(name)] = version.strip()
bad = []
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if norm(name) != "simple-oci-registry" and pins.get(norm(name)) != version:
        bad.append(f"{wheel.name} (constraints.txt: {pins.get(norm(name), 'not pinned')})")
if bad or not any(pathlib.Path(sys.argv[1]).glob("pip-*.whl")):
    sys.exit("unpinned or missing wheels: " + ", ".join(bad or ["pip"]))
EOF

# --- 2. the base image ------------------------------------------------------------------------
if [ -n "$BASE_IMAGE" ]; then
    case $BASE_IMAGE in
        *@sha256:????????????????????????????????????????????????????????????????) ;;
        *) die "BASE_IMAGE '$BASE_IMAGE' is not pinned by digest (NAME@sha256:<64 hex>)" ;;
    esac
    base=$BASE_IMAGE
    base_name=$BASE_IMAGE
    podman image exists "$base" || podman pull "$base" >&2
else
    command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
    # The smallest set that runs the server and node-setup.sh (POSIX sh, coreutils, grep, sed,
    # cmp): no apt, no perl, no bash. dpkg stays so that scanners can read the package list.
    packages=base-files,base-passwd,libc-bin,findutils,dpkg,dash,coreutils,grep,sed,diffutils,python3
    mm_args=(--variant=custom "--include=$packages"
             --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
             "--dpkgopt=path-exclude=/usr/share/man/*" "--dpkgopt=path-exclude=/usr/share/info/*"
             "--dpkgopt=path-exclude=/usr/share/locale/*" "--dpkgopt=path-exclude=/usr/share/doc/*"
             "--dpkgopt=path-include=/usr/share/doc/*/copyright"
             "--customize-hook=rm -rf \"\$1\"/var/cache/* \"\$1\"/var/log/* \"\$1\"/var/lib/apt"
             "$SUITE")
    mirrors=("deb $DEBIAN_MIRROR $SUITE main" "deb $DEBIAN_SECURITY $SUITE-security main")
    key=$(printf '%s\n' "$(mmdebstrap --version)" "${mm_args[@]}" "${mirrors[@]}" |
          sha256sum | cut -c1-16)
    rootfs="$IMAGE_CACHE_DIR/rootfs-$SUITE-$key.tar"
    if [ ! -s "$rootfs" ]; then
        log "making the Debian $SUITE root filesystem with mmdebstrap (cached as $rootfs)"
        # Not the commit's SOURCE_DATE_EPOCH: the tarball is cached across commits.
        env -u SOURCE_DATE_EPOCH mmdebstrap --quiet --format=tar "${mm_args[@]}" "$rootfs.tmp" "${mirrors[@]}" \
            >"$rootfs.log" 2>&1 || { cat "$rootfs.log" >&2; die "mmdebstrap failed"; }
        mv -f "$rootfs.tmp" "$rootfs"
    fi
    base=localhost/simple-oci-registry-base:$SUITE-$key
    base_name="debian:$SUITE (mmdebstrap, ${packages//,/ })"
    if ! podman image exists "$base"; then
        log "importing $rootfs as $base"
        podman import --quiet --change 'CMD ["/bin/sh"]' "$rootfs" "$base" >/dev/null
    fi
fi

# --- 3. build ---------------------------------------------------------------------------------
log "building $IMAGE_NAME:$IMAGE_TAG on $base"
# Docker format: the OCI image config has no HEALTHCHECK field, so podman would drop it.
podman build --quiet --format docker --network=none --pull=never --timestamp "$SOURCE_DATE_EPOCH" \
    --file Containerfile --tag "$IMAGE_NAME:$IMAGE_TAG" \
    --build-arg "BASE_IMAGE=$base" --build-arg "BASE_NAME=$base_name" \
    --build-arg "PYTHON_VERSION=$PYTHON_VERSION" --build-arg "VERSION=$VERSION" \
    --build-arg "REVISION=$REVISION" \
    "$CONTEXT" >/dev/null

# --- 4. the .oci archive ----------------------------------------------------------------------
mkdir -p "$(dirname "$IMAGE_OCI")"
rm -f "$IMAGE_OCI.tmp"
# skopeo compresses the layers (gzip) on the way into the OCI layout and keeps the Docker
# schema 2 manifest and config (--format v2s2), HEALTHCHECK included; the tag is the file name.
skopeo copy --quiet --format v2s2 "containers-storage:$IMAGE_NAME:$IMAGE_TAG" "oci-archive:$IMAGE_OCI.tmp:$IMAGE_TAG" >&2
mv -f "$IMAGE_OCI.tmp" "$IMAGE_OCI"

uncompressed=$(podman image inspect --format '{{.Size}}' "$IMAGE_NAME:$IMAGE_TAG")
compressed=$(stat -c %s "$IMAGE_OCI")
id=$(podman image inspect --format '{{.Id}}' "$IMAGE_NAME:$IMAGE_TAG")
printf 'image     %s:%s (id %.12s)\n' "$IMAGE_NAME" "$IMAGE_TAG" "$id"
printf 'base      %s\n' "$base_name"
printf 'archive   %s\n' "$IMAGE_OCI"
printf 'size      %s bytes uncompressed (%s MiB), %s bytes as the gzip .oci archive (%s MiB)\n' \
    "$uncompressed" "$((uncompressed / 1048576))" "$compressed" "$((compressed / 1048576))"
