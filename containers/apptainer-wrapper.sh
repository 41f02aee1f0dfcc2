#!/usr/bin/env bash
# `apptainer` for Debian 12 hosts: runs the real Apptainer (Debian sid's package,
# which needs glibc 2.38+) from the sid root that containers/apptainer-sid.sh
# builds, in a private mount namespace. Installed as /usr/local/bin/apptainer;
# a host with a native Apptainer needs none of this.
#
# Inside, the sid root is /, and every top-level host folder that is not part of
# the operating system (/tmp, /home, /root, /work, /scratch, /dev, /proc, /sys,
# /run, ...) is mounted at its own path, plus /var/tmp and the host's /etc/hosts,
# resolv.conf, passwd, group and localtime: so `apptainer exec --bind P:P` sees
# every host path P, and a Slurm node's private /etc/hosts stays the node's.
# pivot_root, not chroot: Apptainer refuses a "weak chrooted environment".
# Needs root (mount namespaces).
set -euo pipefail

ROOT=${STRIDE_APPTAINER_ROOT:-/var/lib/stride/apptainer-root}
OS_DIRS=" bin boot etc lib lib32 lib64 libx32 sbin usr var lost+found "
ETC_FILES="hosts resolv.conf passwd group localtime"   # keep in step with apptainer-sid.sh

if [[ ${1:-} != --stride-in-namespace ]]; then
  [[ -x $ROOT/usr/bin/apptainer ]] || {
    echo "apptainer: no Apptainer root at $ROOT: run containers/apptainer-sid.sh install" >&2; exit 127; }
  exec unshare --mount --propagation private -- "$0" --stride-in-namespace "$@"
fi
shift

mount --bind "$ROOT" "$ROOT"                 # pivot_root needs a mount point
for src in /*; do
  name=${src#/}
  [[ -d $src && ! -L $src && $OS_DIRS != *" $name "* ]] || continue
  mkdir -p "$ROOT/$name"
  mount --rbind "$src" "$ROOT/$name"
done
mkdir -p "$ROOT/var/tmp" && mount --rbind /var/tmp "$ROOT/var/tmp"
for file in $ETC_FILES; do     # apptainer-sid.sh made each a plain file in the root
  if [[ -e /etc/$file ]]; then mount --bind "/etc/$file" "$ROOT/etc/$file"; fi
done

cwd=$PWD
cd "$ROOT"
mkdir -p .host-root
pivot_root . .host-root
umount -l /.host-root
cd "$cwd" 2>/dev/null || cd /
exec /usr/bin/apptainer "$@"
