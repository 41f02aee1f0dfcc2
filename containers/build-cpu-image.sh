#!/usr/bin/env bash
# Build the stride CPU image: a plain root-filesystem directory that
# Charliecloud (ch-run), Apptainer (as a sandbox) and Podman (--rootfs) run
# as it is, and that Docker imports (containers/setup.sh). No registry needed.
#
#   containers/build-cpu-image.sh [DEST]     (DEST default: $STRIDE_IMAGE_DIR
#                                             or /tmp/stride-images/cpu)
#
# Two layers, each rebuilt only when its input changed:
#   deps   Debian bookworm (mmdebstrap) + the pinned wheels of
#          requirements-cpu.txt, installed from the host with pip --target.
#          Key: hash of the base settings below + requirements-cpu.txt.
#   stride the repository's stride/ package copied into site-packages.
#          Key: hash of stride/ and pyproject.toml.
# A second run with nothing changed takes well under a second.
# Needs root (mmdebstrap in root mode, chroot for the smoke tests).
# Prints DEST on stdout; progress goes to stderr, tool output to DEST.build.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DEST=$(realpath -m "${1:-${STRIDE_IMAGE_DIR:-/tmp/stride-images/cpu}}")
WHEELS=${STRIDE_WHEEL_DIR:-/tmp/stride-images/wheels}
REQS=$HERE/requirements-cpu.txt
# Any pip of a CPython 3.11 x86_64 (the image's Python): the project's venv.
PIP=${STRIDE_PIP:-$REPO/.venv/bin/pip}
LOG=$DEST.build.log

SUITE=bookworm
MIRROR=${STRIDE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# libstdc++6: torch's _C needs it (the essential variant lacks it).
# python-is-python3: so that `python` works as well as `python3`.
# slurm-client: a rank calls `scontrol requeue` when its job must go back to
# the queue (time limit, crash retry); Debian's matches the local cluster's.
DEBS=python3,python-is-python3,libstdc++6,ca-certificates,slurm-client
PYVER=3.11                                           # bookworm's python3
SITE_REL=usr/local/lib/python$PYVER/dist-packages    # on Debian's sys.path
# Bind targets must already exist in a read-only image (ch-run cannot create
# them). Top-level directories that work folders usually live under; /tmp,
# /home, /mnt, /opt, /srv, /root exist anyway.
MOUNT_POINTS="work scratch data checkpoint gpfs lustre fsx shared projects"
LAYOUT_VERSION=2          # bump to force a rebuild of the deps layer

log() { printf '[build-cpu-image] %s\n' "$*" >&2; }

# Run a noisy command with its output in $LOG; show the tail if it fails.
run_logged() {
  "$@" >>"$LOG" 2>&1 || { log "FAILED: $*"; tail -n 25 "$LOG" >&2; exit 1; }
}

hash_of() { sha256sum | cut -c1-16; }

deps_key() {
  { echo "$LAYOUT_VERSION $SUITE $MIRROR $DEBS $MOUNT_POINTS"; cat "$REQS"; } | hash_of
}

# The stride package exactly as checked out (bytecode caches excluded).
stride_key() {
  (cd "$REPO" && find stride pyproject.toml -type f \
      ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z |
    xargs -0 sha256sum) | hash_of
}

stride_version() {
  python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml"
}

ensure_mmdebstrap() {
  command -v mmdebstrap >/dev/null && return
  log "installing mmdebstrap"
  run_logged apt-get update -qq
  DEBIAN_FRONTEND=noninteractive run_logged apt-get install -y -qq mmdebstrap
}

# Host-side wheel cache, shared with the Apptainer debootstrap build.
ensure_wheels() {
  local key; key=$(hash_of <"$REQS")
  [[ -f $WHEELS/.stamp && $(cat "$WHEELS/.stamp") == "$key" ]] && return
  log "downloading wheels into $WHEELS"
  mkdir -p "$WHEELS"
  # --only-binary: nothing is compiled; host and image are both cp311 x86_64.
  run_logged "$PIP" download --only-binary=:all: -d "$WHEELS" -r "$REQS"
  echo "$key" >"$WHEELS/.stamp"
}

# Debian root + Python packages, built beside DEST and moved in at the end,
# so an interrupted build never leaves a half image at DEST.
build_deps_layer() {
  local new=$DEST.new
  rm -rf "$new"
  log "mmdebstrap $SUITE -> $new"
  run_logged mmdebstrap --variant=essential --include="$DEBS" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$new" "$MIRROR"

  log "pip install --target /$SITE_REL"
  mkdir -p "$new/$SITE_REL"
  # pip compiles .pyc here: the image is mounted read-only at run time, so
  # Python could not cache bytecode itself. CPython 3.11.x share one magic.
  run_logged "$PIP" install --no-index --find-links "$WHEELS" --target "$new/$SITE_REL" -r "$REQS"
  # Console scripts land in SITE/bin with the host's python in their shebang:
  # useless in the image (use `python3 -m torch.distributed.run` etc.).
  rm -rf "$new/$SITE_REL/bin"

  add_mount_points "$new"
  smoke_test "$new" 'import torch, numpy, sklearn, submitit, cloudpickle, fire, yaml'
  rm -rf "$DEST"
  mv "$new" "$DEST"
  deps_key >"$DEST/.stride-deps"
  rm -f "$DEST/.stride-stride"          # the stride layer must be redone
}

add_mount_points() {
  local root=$1 d
  for d in $MOUNT_POINTS; do mkdir -p "$root/$d"; done
  # ch-run, docker and podman bind the host's files over these.
  touch "$root/etc/hosts"
  : >"$root/etc/resolv.conf"          # drop the build host's resolver
}

# Copy stride/ into site-packages plus a minimal .dist-info, so that
# `import stride` and importlib.metadata.version("stride") both work. Copying
# (not `pip install REPO`) needs no build backend and takes milliseconds.
install_stride_layer() {
  local site=$DEST/$SITE_REL version; version=$(stride_version)
  log "installing stride $version from $REPO"
  rm -rf "$site/stride" "$site"/stride-*.dist-info
  cp -r "$REPO/stride" "$site/stride"
  find "$site/stride" -name __pycache__ -prune -exec rm -rf {} +
  python3 -m compileall -q "$site/stride" >/dev/null
  local info=$site/stride-$version.dist-info
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: stride\nVersion: %s\n' "$version" >"$info/METADATA"
  echo stride >"$info/top_level.txt"
  echo build-cpu-image.sh >"$info/INSTALLER"
  smoke_test "$DEST" 'import stride, torch'
  stride_key >"$DEST/.stride-stride"
}

# Run python3 inside the image with a plain chroot (we are root here).
smoke_test() {
  chroot "$1" /usr/bin/python3 -c "$2" >>"$LOG" 2>&1 ||
    { log "smoke test failed in $1: $2"; tail -n 25 "$LOG" >&2; exit 1; }
}

# DEST/.stride-image.json: what stride (and people) need to run the image.
write_manifest() {
  local pyver
  pyver=$(dpkg-query --admindir="$DEST/var/lib/dpkg" -W -f='${Version}' "python$PYVER")
  IMAGE=$DEST SITE_REL=$SITE_REL PYVER_DEB=$pyver MOUNT_POINTS=$MOUNT_POINTS \
  STRIDE_VERSION=$(stride_version) STRIDE_HASH=$(stride_key) DEPS_HASH=$(deps_key) \
  python3 - <<'PY'
import json, os, pathlib, time
e = os.environ
site = pathlib.Path(e["IMAGE"], e["SITE_REL"])
def ver(name):
    hits = sorted(site.glob(name + "-*.dist-info"))
    return hits[0].name[len(name) + 1:-len(".dist-info")] if hits else None
manifest = {
    "image": e["IMAGE"],
    "format": "directory (root filesystem)",
    "python": "/usr/bin/python3",
    "python_version": e["PYVER_DEB"].split("-")[0],
    "site_packages": "/" + e["SITE_REL"],
    "torch": ver("torch"), "numpy": ver("numpy"), "submitit": ver("submitit"),
    "stride_version": e["STRIDE_VERSION"],
    "stride_hash": e["STRIDE_HASH"],
    "deps_hash": e["DEPS_HASH"],
    "mount_points": ["/tmp", "/home"] + ["/" + d for d in e["MOUNT_POINTS"].split()],
    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}
pathlib.Path(e["IMAGE"], ".stride-image.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY
}

main() {
  [[ $(id -u) == 0 ]] || { log "run as root (mmdebstrap, chroot)"; exit 1; }
  mkdir -p "$(dirname "$DEST")"
  # One build at a time per DEST (parallel test runs may all call this).
  exec 9>"$DEST.lock"
  flock -w 1800 9 || { log "timed out waiting for $DEST.lock"; exit 1; }
  : >"$LOG"

  local start=$SECONDS changed=0
  if [[ ! -f $DEST/.stride-deps || $(cat "$DEST/.stride-deps") != "$(deps_key)" ]]; then
    ensure_mmdebstrap
    ensure_wheels
    build_deps_layer
    changed=1
  fi
  if [[ ! -f $DEST/.stride-stride || $(cat "$DEST/.stride-stride") != "$(stride_key)" ]]; then
    install_stride_layer
    changed=1
  fi
  if ((changed)) || [[ ! -f $DEST/.stride-image.json ]]; then
    write_manifest
    log "built $DEST in $((SECONDS - start)) s ($(du -sh "$DEST" | cut -f1))"
  else
    log "up to date: $DEST"
  fi
  echo "$DEST"
}

main "$@"
