#!/usr/bin/env bash
# Container runtimes and test images for stride's container tests, on a Debian 12
# machine with no container registry (tests/run.sh runs this):
#
#   eval "$(bash containers/setup.sh)"
#
# Installs what is missing: Debian's charliecloud-runtime, docker.io, podman
# and mmdebstrap; Apptainer from a Debian sid root (apptainer-sid.sh); starts a
# private dockerd (dockerd.sh); configures Podman for this machine. Then builds,
# each only when the hash of its inputs changed:
#   $IMAGES/cpu             image folder (build-cpu-image.sh): Charliecloud, Apptainer
#   $IMAGES/stride-cpu.sif  Apptainer image built from containers/stride-cpu.def
#   stride-cpu:test         Docker image built from containers/Dockerfile on the
#                           folder image's dependencies (imported, no registry)
#   $IMAGES/py313           Debian trixie's Python 3.13 with stride, submitit and
#                           cloudpickle: the preflight's Python-mismatch case
# Prints `export ...` lines on stdout; progress and timings on stderr. Needs root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
IMAGES=${STRIDE_IMAGES_DIR:-/tmp/stride-images}
WHEELS=${STRIDE_WHEEL_DIR:-$IMAGES/wheels}
MIRROR=${STRIDE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER_TAG=stride-cpu:test
SIF=$IMAGES/stride-cpu.sif
OTHER_PYTHON=$IMAGES/py313
# runc: Podman's crun refuses this machine's hybrid cgroups; netavark: Podman wants a network backend even with
# --network host (a recommended package, and recommends are not installed).
PACKAGES=(charliecloud-runtime docker.io podman runc netavark mmdebstrap)
PODMAN_CONF=$IMAGES/podman/containers.conf
export STRIDE_WHEEL_DIR=$WHEELS

log() { printf '[containers/setup +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
hash_of() { sha256sum | cut -c1-16; }
# Run a noisy step with its output in a log file; show the tail if it fails.
logged() { # logfile command...
  local logfile=$1; shift
  "$@" >"$logfile" 2>&1 || { tail -n 30 "$logfile" >&2; die "failed: $* (log: $logfile)"; }
}
timed() { local t0=$SECONDS; "$@"; log "$1: $((SECONDS - t0)) s"; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  logged "$IMAGES/apt.log" timeout 600 apt-get update -qq
  logged "$IMAGES/apt.log" timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

apptainer_runtime() { bash "$HERE/apptainer-sid.sh" install; }

# Podman's defaults fail here: crun refuses hybrid cgroups, and root cannot raise its rlimits (no CAP_SYS_RESOURCE).
# A limit no higher than this shell's hard limit (raising one is what fails), capped at what Podman was seen to set.
hard_limit() { local v; v=$(ulimit -H"$1"); [[ $v == unlimited || $v -gt $2 ]] && v=$2; echo "$v"; }
podman_config() {
  local nofile nproc
  nofile=$(hard_limit n 20000) nproc=$(hard_limit u 32768)
  mkdir -p "$(dirname "$PODMAN_CONF")"
  cat >"$PODMAN_CONF" <<EOF
# Written by containers/setup.sh for stride's tests (CONTAINERS_CONF).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
}

folder_image() { bash "$HERE/build-cpu-image.sh" "$IMAGES/cpu" >/dev/null; }

# The Apptainer image, from the definition file itself (Bootstrap: debootstrap).
sif_image() {
  local key
  key=$({ cat "$HERE/stride-cpu.def" "$HERE/requirements-cpu.txt" "$IMAGES/cpu/.stride-stride"
          apptainer version; } | hash_of)
  [[ -f $SIF && -f $SIF.key && $(cat "$SIF.key") == "$key" ]] && return
  log "apptainer build $SIF from containers/stride-cpu.def"
  rm -f "$SIF.new"
  # lz4: packing 1.3 GB takes ~17 s instead of ~3 min with the default gzip, for a 40% larger file.
  (cd "$REPO" && logged "$IMAGES/sif.build.log" timeout 1200 apptainer build --fakeroot --force \
      --mksquashfs-args "-comp lz4" --build-arg "WHEELS=$WHEELS" --build-arg "REPO=$REPO" \
      "$SIF.new" containers/stride-cpu.def)
  mv -f "$SIF.new" "$SIF"
  echo "$key" >"$SIF.key"
}

# The Docker image, from containers/Dockerfile, on a base imported from the folder
# image minus its stride layer (what a pytorch/pytorch base is to the CUDA build).
docker_image() {
  eval "$(bash "$HERE/dockerd.sh" env)"
  bash "$HERE/dockerd.sh" up >/dev/null
  local deps site base key current
  deps=$(cat "$IMAGES/cpu/.stride-deps")
  site=./usr/local/lib/python3.11/dist-packages
  base=stride-cpu-deps:$deps
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    log "docker import $base"
    tar -C "$IMAGES/cpu" --exclude="$site/stride" --exclude="$site/stride-*.dist-info" --exclude='./.stride-*' -c . |
      timeout 600 docker import - "$base" >/dev/null
  fi
  key=$({ echo "$deps"; cat "$IMAGES/cpu/.stride-stride" "$HERE/Dockerfile" "$REPO/.dockerignore"; } | hash_of)
  current=$(docker image inspect --format '{{ index .Config.Labels "org.stride.key" }}' "$DOCKER_TAG" 2>/dev/null ||
            true)
  [[ $current == "$key" ]] && return
  log "docker build $DOCKER_TAG from containers/Dockerfile"
  DOCKER_BUILDKIT=0 logged "$IMAGES/docker.build.log" timeout 900 docker build --label "org.stride.key=$key" \
    --build-arg "BASE=$base" --build-arg "PIP_ARGS=--no-index --no-build-isolation --break-system-packages" \
    -f "$HERE/Dockerfile" -t "$DOCKER_TAG" "$REPO"
}

# Python 3.13 (Debian trixie) with this stride, submitit and cloudpickle: only the Python differs from the CPU image.
other_python_image() {
  local base_key site=$OTHER_PYTHON/usr/local/lib/python3.13/dist-packages version
  base_key=$(echo "1 $MIRROR" | hash_of)
  if [[ ! -f $OTHER_PYTHON/.stride-base || $(cat "$OTHER_PYTHON/.stride-base") != "$base_key" ]]; then
    log "mmdebstrap trixie (python3) -> $OTHER_PYTHON"
    rm -rf "$OTHER_PYTHON.new"
    logged "$IMAGES/py313.build.log" timeout 900 mmdebstrap --variant=essential --include=python3 \
      --aptopt='Acquire::Check-Valid-Until "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
      trixie "$OTHER_PYTHON.new" "$MIRROR"
    logged "$IMAGES/py313.build.log" "${STRIDE_PIP:-$REPO/.venv/bin/pip}" install --no-index --find-links "$WHEELS" \
      --no-deps --no-compile --target "$OTHER_PYTHON.new/usr/local/lib/python3.13/dist-packages" \
      submitit cloudpickle typing_extensions
    touch "$OTHER_PYTHON.new/etc/hosts"          # ch-run mounts the host's over it
    echo "$base_key" >"$OTHER_PYTHON.new/.stride-base"
    rm -rf "$OTHER_PYTHON"
    mv "$OTHER_PYTHON.new" "$OTHER_PYTHON"
  fi
  cmp -s "$OTHER_PYTHON/.stride-stride" "$IMAGES/cpu/.stride-stride" && return
  rm -rf "$site/stride" "$site"/stride-*.dist-info
  cp -r "$REPO/stride" "$site/stride"
  find "$site/stride" -name __pycache__ -prune -exec rm -rf {} +
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/stride/__init__.py")
  mkdir -p "$site/stride-$version.dist-info"
  printf 'Metadata-Version: 2.1\nName: stride\nVersion: %s\n' "$version" >"$site/stride-$version.dist-info/METADATA"
  cp "$IMAGES/cpu/.stride-stride" "$OTHER_PYTHON/.stride-stride"
}

main() {
  ((EUID == 0)) || die "run as root (apt-get, mmdebstrap, dockerd, mount namespaces)"
  mkdir -p "$IMAGES"
  exec 8>"$IMAGES/.setup.lock"
  flock -w 1800 8 || die "another containers/setup.sh holds $IMAGES/.setup.lock"
  timed install_packages
  timed apptainer_runtime
  podman_config
  timed folder_image
  timed sif_image
  timed docker_image
  timed other_python_image
  log "containers ready in $SECONDS s"
  bash "$HERE/dockerd.sh" env
  cat <<EOF
export CONTAINERS_CONF=$PODMAN_CONF
export STRIDE_TEST_IMAGE_DIR=$IMAGES/cpu
export STRIDE_TEST_SIF=$SIF
export STRIDE_TEST_DOCKER_IMAGE=$DOCKER_TAG
export STRIDE_TEST_OTHER_PYTHON_IMAGE=$OTHER_PYTHON
EOF
}

main "$@"
