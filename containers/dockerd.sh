#!/usr/bin/env bash
# A private Docker daemon for stride's tests, with all its state under one
# folder, so it needs no systemd and leaves the machine's own Docker alone.
#
#   containers/dockerd.sh up     start it (or reuse a running one); prints
#                                the socket path
#   containers/dockerd.sh env    prints `export DOCKER_HOST=...` for eval
#   containers/dockerd.sh down   stop it
#   containers/dockerd.sh status exit 0 when it answers
#
# State: $STRIDE_DOCKER_DIR (default /tmp/stride-docker): data/ (images),
# exec/, docker.sock, dockerd.pid, dockerd.log. Needs root.
set -euo pipefail

D=${STRIDE_DOCKER_DIR:-/tmp/stride-docker}
SOCK=$D/docker.sock
PIDFILE=$D/dockerd.pid
export DOCKER_HOST=unix://$SOCK

log() { printf '[dockerd.sh] %s\n' "$*" >&2; }

ensure_installed() {
  command -v dockerd >/dev/null && return
  log "installing docker.io"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
}

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

running_pid() {
  [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"
}

up() {
  ensure_installed
  mkdir -p "$D"
  if answers; then echo "$SOCK"; return; fi
  if [[ -n $(running_pid || true) ]]; then
    log "dockerd $(cat "$PIDFILE") runs but does not answer; see $D/dockerd.log"; exit 1
  fi
  rm -f "$SOCK" "$PIDFILE"
  log "starting dockerd (state in $D)"
  # setsid: the daemon outlives this script and the caller's terminal.
  # A separate exec-root keeps its containerd apart from any system one.
  # 3>&- ... 9>&-: the daemon must not keep a caller's lock file open forever.
  setsid dockerd --data-root "$D/data" --exec-root "$D/exec" --pidfile "$PIDFILE" \
    -H "unix://$SOCK" >"$D/dockerd.log" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
  local i
  for i in $(seq 120); do           # at most 120 x 0.5 s = 60 s
    answers && { echo "$SOCK"; return; }
    kill -0 $! 2>/dev/null || break
    sleep 0.5
  done
  log "dockerd did not come up; last lines of $D/dockerd.log:"
  tail -n 20 "$D/dockerd.log" >&2
  exit 1
}

# dockerd leaves its data-root bind and network namespace mounted; a later `up`
# would stack new ones on them.
unmount_leftovers() {
  local m
  for m in $(awk -v d="$D/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
}

down() {
  local pid i; pid=$(running_pid || true)
  [[ -z $pid ]] && { log "not running"; return; }
  kill "$pid"
  for i in $(seq 60); do            # at most 30 s, then give up loudly
    kill -0 "$pid" 2>/dev/null || { unmount_leftovers; log "stopped"; return; }
    sleep 0.5
  done
  log "dockerd $pid still running after 30 s"; exit 1
}

case ${1:-} in
  up) up ;;
  down) down ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  status) answers ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
