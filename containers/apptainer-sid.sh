#!/usr/bin/env bash
# Apptainer on Debian 12: it is packaged neither for bookworm (nor backports,
# nor trixie) nor on PyPI, but Debian sid packages it. This builds a minimal
# sid root holding it (mmdebstrap, ~20-40 s, ~250 MB) and installs
# apptainer-wrapper.sh as /usr/local/bin/apptainer, which runs it from there.
#
#   containers/apptainer-sid.sh install    build (if its inputs changed) + install
#   containers/apptainer-sid.sh check      exit 0 when `apptainer version` works
#
# State: $STRIDE_APPTAINER_ROOT (default /var/lib/stride/apptainer-root).
# Needs root. A host with a native Apptainer (>= 1.2) needs none of this.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=${STRIDE_APPTAINER_ROOT:-/var/lib/stride/apptainer-root}
BIN=${STRIDE_APPTAINER_BIN:-/usr/local/bin/apptainer}
MIRROR=${STRIDE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# mount: umount for the wrapper's pivot_root; debootstrap: `Bootstrap: debootstrap`
# definition files; uidmap: `build --fakeroot` (%post as root in a user namespace).
PACKAGES=apptainer,mount,debootstrap,uidmap
ETC_FILES="hosts resolv.conf passwd group localtime"   # the files the wrapper mounts
LAYOUT_VERSION=1
LOG=${ROOT}.build.log

log() { printf '[apptainer-sid] %s\n' "$*" >&2; }

key() { { echo "$LAYOUT_VERSION $PACKAGES $MIRROR"; } | sha256sum | cut -c1-16; }

build_root() {
  local new=$ROOT.new
  rm -rf "$new"
  mkdir -p "$(dirname "$ROOT")"
  log "mmdebstrap sid ($PACKAGES) -> $ROOT"
  # sid's Release file can look expired between pushes; the archive key still signs it.
  timeout 900 mmdebstrap --variant=essential --include="$PACKAGES" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    sid "$new" "$MIRROR" >"$LOG" 2>&1 || { tail -n 25 "$LOG" >&2; log "mmdebstrap failed; log: $LOG"; exit 1; }
  # As root, Apptainer would keep every capability, and this machine's root lacks CAP_SYS_RESOURCE.
  sed -i 's/^root default capabilities = .*/root default capabilities = no/' "$new/etc/apptainer/apptainer.conf"
  # `build --fakeroot` maps root to these ids.
  echo "root:200000:65536" >"$new/etc/subuid"
  echo "root:200000:65536" >"$new/etc/subgid"
  local file
  for file in $ETC_FILES; do rm -f "$new/etc/$file"; : >"$new/etc/$file"; done
  key >"$new/.stride-key"
  rm -rf "$ROOT"
  mv "$new" "$ROOT"
}

install_wrapper() {
  if [[ -e $BIN ]] && ! grep -q 'apptainer-sid.sh' "$BIN" 2>/dev/null; then
    log "$BIN exists and is not stride's wrapper: leaving it alone"; return
  fi
  install -m 0755 "$HERE/apptainer-wrapper.sh" "$BIN"
}

check() { timeout 60 "$BIN" version >/dev/null 2>&1; }

cmd_install() {
  [[ $(id -u) == 0 ]] || { log "run as root (mmdebstrap, mount namespaces)"; exit 1; }
  command -v mmdebstrap >/dev/null || { log "mmdebstrap is missing: apt-get install mmdebstrap"; exit 1; }
  mkdir -p "$(dirname "$ROOT")"
  exec 9>"$ROOT.lock"
  flock -w 900 9 || { log "timed out waiting for $ROOT.lock"; exit 1; }
  if [[ ! -f $ROOT/.stride-key || $(cat "$ROOT/.stride-key") != "$(key)" ]]; then
    build_root
  fi
  install_wrapper
  check || { log "'$BIN version' fails after install"; "$BIN" version >&2 || true; exit 1; }
  log "apptainer $("$BIN" version) from $ROOT"
}

case ${1:-} in
  install) cmd_install ;;
  check) check ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
