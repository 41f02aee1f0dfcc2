#!/usr/bin/env bash
# Local, single-machine, REAL Slurm cluster for stride's tests and CI.
#
#   bash slurm/cluster.sh up       # install (if needed) + start; idempotent
#   eval "$(bash slurm/cluster.sh env)"
#   bash slurm/cluster.sh status
#   bash slurm/cluster.sh down     # stop every daemon started here; idempotent
#   bash slurm/cluster.sh install  # apt packages only
#   bash slurm/cluster.sh purge    # down + delete the state folder
#   bash slurm/cluster.sh check    # is the state folder safe to use? (read-only)
#
# Everything lives in one state folder ($STRIDE_SLURM_DIR, default
# /tmp/stride-slurm): configs, munge key+socket, MariaDB data, spool, logs,
# pids. /etc/slurm, /etc/munge, /etc/hosts and system services are untouched.
# The folder holds root's munge key and database password: it is created
# root-owned and 0711, and a folder someone else made (or could change) is
# refused, never used (see check_state_dir).
# All traffic stays on loopback: controller 127.0.0.10, nodeK 127.0.0.(10+K).
# See "A local Slurm cluster for development" in README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/templates"
STATE="${STRIDE_SLURM_DIR:-/tmp/stride-slurm}"
NODES="${STRIDE_SLURM_NODES:-2}"
GPUS_PER_NODE="${STRIDE_SLURM_GPUS:-2}"     # fake GPUs (gres); 0 disables
# Bound on each MariaDB tool call (datadir set-up, the accounting grants):
# a wedged mariadbd must fail `up`, never hang it.
DB_TIMEOUT_S="${STRIDE_SLURM_DB_TIMEOUT_S:-120}"

CTL_NAME=stride-ctl
CTL_ADDR=127.0.0.10
NODE_ADDR_FIRST=11                          # nodeK -> 127.0.0.(10+K)
CTL_PORT=17817                              # off the default 6817-6819 so a
DBD_PORT=17819                              # system Slurm cannot collide
NODE_PORT_FIRST=17821                       # nodeK -> 17820+K

CONF="$STATE/etc/slurm.conf"
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd slurm-wlm-mysql-plugin mariadb-server)

log() { printf '[cluster.sh +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print where a daemon logs and the end of that log, then fail.
die_with_log() { # name logfile
  log "ERROR: $1 did not start. Its log file: $2"
  if [[ -f $2 ]]; then
    log "---- last 30 lines of $2 ----"; tail -n 30 "$2" >&2; log "----"
  fi
  exit 1
}

# Run a command until it succeeds; bounded by count and time. wait_for SECS DESC CMD...
wait_for() {
  local secs=$1 desc=$2; shift 2
  local deadline=$((SECONDS + secs)) i
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    ((SECONDS < deadline)) || break
    sleep 0.25
  done
  log "timed out after ${secs}s waiting for: $desc"
  return 1
}

# Slurm client commands, always on our config and never unbounded
# (sacctmgr retries for 20 minutes when it cannot reach slurmdbd).
sl() { SLURM_CONF="$CONF" timeout 30 "$@"; }

node_names() { local k; for ((k = 1; k <= NODES; k++)); do echo "node$k"; done; }
node_addr() { echo "127.0.0.$((NODE_ADDR_FIRST + ${1#node} - 1))"; }
node_port() { echo "$((NODE_PORT_FIRST + ${1#node} - 1))"; }

# ---------------------------------------------------------------- pid files
# Alive and not a zombie (our daemons are reparented to init, which may be
# slow to reap them).
proc_running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# A pid file counts only if the process is alive AND is the expected program
# (after a reboot a stale pid can belong to anything).
pid_alive() { # pidfile comm-prefix
  local pid comm
  [[ -f $1 ]] || return 1
  pid=$(<"$1"); [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$2"* ]] && proc_running "$pid"
}

# TERM, wait (bounded), then KILL. stop_pid pidfile comm-prefix name
stop_pid() {
  local pid i
  pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(<"$1")
  log "stopping $3 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do
    proc_running "$pid" || break
    sleep 0.25
  done
  if proc_running "$pid"; then
    log "$3 ignored SIGTERM for 15s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

# ------------------------------------------------------------------ install
packages_missing() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

cmd_install() {
  local missing t0=$SECONDS
  missing=$(packages_missing)
  if [[ -z $missing ]]; then log "packages already installed"; return 0; fi
  command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"
  log "installing: $(echo $missing)"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq || die "apt-get update failed"
  # A fresh name (mktemp): a fixed one in the shared temp folder could be a symlink planted by another user.
  local apt_log; apt_log=$(mktemp "${TMPDIR:-/tmp}/stride-slurm-apt.XXXXXX") || die "cannot create a temporary file"
  # shellcheck disable=SC2086
  timeout 900 apt-get install -y -qq --no-install-recommends $missing >"$apt_log" 2>&1 \
    || { tail -n 30 "$apt_log" >&2; die "apt-get install failed (log: $apt_log)"; }
  rm -f "$apt_log"
  log "packages installed in $((SECONDS - t0))s"
}

# ------------------------------------------------------------------- config
render() { # template -> stdout, replacing @KEY@ from the variables below
  sed -e "s|@STATE@|$STATE|g" -e "s|@CTL_ADDR@|$CTL_ADDR|g" \
      -e "s|@CTL_PORT@|$CTL_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
      -e "s|@NODES@|$NODES|g" \
      -e "s|@NODE_ADDR_FIRST@|$NODE_ADDR_FIRST|g" \
      -e "s|@NODE_ADDR_LAST@|$((NODE_ADDR_FIRST + NODES - 1))|g" \
      -e "s|@NODE_PORT_FIRST@|$NODE_PORT_FIRST|g" \
      -e "s|@NODE_PORT_LAST@|$((NODE_PORT_FIRST + NODES - 1))|g" \
      -e "s|@GRES_TYPES@|$GRES_TYPES|g" -e "s|@NODE_GRES@|$NODE_GRES|g" \
      -e "s|@DB_PASS@|${DB_PASS:-}|g" \
      "$1"
}

# Fake GPUs: gres needs real character-device files (count-only entries make
# nodes invalid). c 1 3 is the /dev/null device, so nothing can be harmed.
setup_fake_gpus() {
  GRES_TYPES="# GresTypes: fake GPUs disabled"; NODE_GRES=""
  ((GPUS_PER_NODE > 0)) || return 0
  local i ok=1
  mkdir -p "$STATE/dev"
  for ((i = 0; i < GPUS_PER_NODE; i++)); do
    [[ -c $STATE/dev/gpu$i ]] || mknod -m 0666 "$STATE/dev/gpu$i" c 1 3 2>/dev/null || ok=0
  done
  if ((ok == 0)); then
    log "WARNING: mknod not permitted here; starting without fake GPUs"
    return 0
  fi
  # (sed turns the \n into a newline; the TRES line makes sacct show GPUs.)
  GRES_TYPES="GresTypes=gpu\nAccountingStorageTRES=gres/gpu"; NODE_GRES="Gres=gpu:$GPUS_PER_NODE"
}

write_gres_conf() {
  if [[ -z $NODE_GRES ]]; then echo "# no fake GPUs" >"$1"; return; fi
  cat >"$1" <<EOF
# Fake GPUs (character device 1:3 = /dev/null): scheduling tests only.
AutoDetect=off
NodeName=node[1-$NODES] Name=gpu File=$STATE/dev/gpu[0-$((GPUS_PER_NODE - 1))]
EOF
}

# Private hosts file, bind-mounted over /etc/hosts inside every daemon's
# namespace: jobs must resolve node names (submitit's MASTER_ADDR is the first
# node's NAME, and an unresolvable name makes torch hang for 30 minutes).
write_hosts() {
  local n
  {
    echo "# GENERATED by slurm/cluster.sh: /etc/hosts as seen inside the cluster"
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$CTL_ADDR $CTL_NAME"
    for n in $(node_names); do echo "$(node_addr "$n") $n"; done
  } >"$1"
}

# Writes every config file into a scratch folder, then moves them in place.
# Returns 1 (without touching anything) if slurm.conf would change while
# daemons still run on the old one.
write_config() {
  local tmp="$STATE/etc.new"
  rm -rf "$tmp"; mkdir -p "$tmp" "$STATE/etc"
  setup_fake_gpus
  DB_PASS=$(<"$STATE/mysql/slurm.pass")
  render "$TEMPLATES/slurm.conf.in" >"$tmp/slurm.conf"
  render "$TEMPLATES/slurmdbd.conf.in" >"$tmp/slurmdbd.conf"
  render "$TEMPLATES/my.cnf.in" >"$tmp/my.cnf"
  write_gres_conf "$tmp/gres.conf"
  write_hosts "$tmp/hosts"
  if [[ -f $CONF ]] && ! cmp -s "$CONF" "$tmp/slurm.conf" && any_running; then
    rm -rf "$tmp"; return 1
  fi
  chmod 600 "$tmp/slurmdbd.conf" "$tmp/my.cnf"
  chmod 644 "$tmp/slurm.conf" "$tmp/gres.conf" "$tmp/hosts"
  # Replace only what changed: running daemons have etc/hosts bind-mounted over /etc/hosts, and a new inode
  # would leave them a deleted file (ch-run then refuses to bind it into an image).
  local f
  for f in "$tmp"/*; do
    cmp -s "$f" "$STATE/etc/${f##*/}" || mv -f "$f" "$STATE/etc/"
  done
  rm -rf "$tmp"
  write_env_sh
}

write_env_sh() {
  cat >"$STATE/env.sh" <<EOF
# Source this (or: eval "\$(bash slurm/cluster.sh env)") to use the stride test cluster.
export SLURM_CONF=$CONF
export STRIDE_SLURM_DIR=$STATE
EOF
}

make_dirs() {
  mkdir -p "$STATE"/{etc,run,log,spool/ctld,mysql,munge/run}
  # munged wants every folder above its socket searchable by all and
  # writable only by its owner: 0711 (others cannot list it), 0755 for
  # munge/ and its run/; the key file itself is 0600. The database (and its
  # password file, its socket) is root's alone.
  chmod 711 "$STATE"
  chmod 755 "$STATE/munge" "$STATE/munge/run"
  chmod 700 "$STATE/mysql"
  local n; for n in $(node_names); do mkdir -p "$STATE/spool/$n"; done
  # The DB password is made once and kept: the database outlives down/up.
  if [[ ! -s $STATE/mysql/slurm.pass ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/mysql/slurm.pass")
  fi
}

# --------------------------------------------------------------- namespaces
# Start a daemon with its own hostname and the private hosts file, in new UTS
# and mount namespaces. The network namespace is shared, so every 127.x
# address is reachable from everywhere. Propagation "slave": mounts made on
# the host later still show up inside, our /etc/hosts bind never leaks out.
run_in_ns() { # hostname command...
  local name=$1; shift
  unshare --uts --mount --propagation slave -- /bin/sh -c '
    set -e
    echo "$1" >/proc/sys/kernel/hostname
    mount --bind "$2" /etc/hosts
    shift 2
    exec "$@"' sh "$name" "$STATE/etc/hosts" "$@"
}

port_busy() { timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# ------------------------------------------------------------------ daemons
start_munge() {
  local pidf="$STATE/run/munged.pid" sock="$STATE/munge/run/munge.socket.2"
  pid_alive "$pidf" munged && return 0
  if [[ ! -s $STATE/munge/munge.key ]]; then
    (umask 077; dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
  fi
  rm -f "$sock" "$sock.lock"           # stale after a crash or reboot
  log "starting munged"
  munged --key-file="$STATE/munge/munge.key" --socket="$sock" \
    --pid-file="$pidf" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed" --num-threads=4 \
    >>"$STATE/log/munged.log" 2>&1 9>&- || die_with_log munged "$STATE/log/munged.log"
  wait_for 15 "munge socket" test -S "$sock" || die_with_log munged "$STATE/log/munged.log"
}

start_mariadb() {
  local pidf="$STATE/run/mariadbd.pid" cnf="$STATE/etc/my.cnf" logf="$STATE/log/mariadbd.log"
  pid_alive "$pidf" mariadbd && return 0
  if [[ ! -d $STATE/mysql/data/mysql ]]; then
    log "initialising MariaDB datadir"
    rm -rf "$STATE/mysql/data"
    timeout "$DB_TIMEOUT_S" mariadb-install-db --defaults-file="$cnf" --auth-root-authentication-method=socket \
      --skip-test-db >>"$STATE/log/mariadb-install.log" 2>&1 \
      || die_with_log "mariadb-install-db (bounded by ${DB_TIMEOUT_S}s)" "$STATE/log/mariadb-install.log"
  fi
  log "starting mariadbd"
  # mariadbd stays in the foreground: detach it ourselves.
  setsid mariadbd --defaults-file="$cnf" </dev/null >>"$logf" 2>&1 9>&- &
  wait_for 60 "mariadbd ping" timeout 10 mariadb-admin --defaults-file="$cnf" -uroot ping \
    || die_with_log mariadbd "$logf"
  wait_for 5 "mariadbd pid file" pid_alive "$pidf" mariadbd || die_with_log mariadbd "$logf"
  timeout "$DB_TIMEOUT_S" mariadb --defaults-file="$cnf" -uroot >>"$logf" 2>&1 <<EOF \
    || die_with_log "mariadb (the accounting grants, bounded by ${DB_TIMEOUT_S}s)" "$logf"
CREATE DATABASE IF NOT EXISTS stride_slurm_acct;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(<"$STATE/mysql/slurm.pass")';
GRANT ALL ON stride_slurm_acct.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
  local pidf="$STATE/run/slurmdbd.pid" logf="$STATE/log/slurmdbd.log"
  pid_alive "$pidf" slurmdbd && return 0
  port_busy "$CTL_ADDR" "$DBD_PORT" && die "port $DBD_PORT is taken by another program (not our slurmdbd)"
  log "starting slurmdbd"
  # slurmdbd finds slurmdbd.conf beside $SLURM_CONF. The mysql client library
  # takes the socket path from MYSQL_UNIX_PORT (slurmdbd.conf has no key for it).
  SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$STATE/mysql/mysqld.sock" run_in_ns "$CTL_NAME" slurmdbd \
    >>"$logf" 2>&1 9>&- || die_with_log slurmdbd "$logf"
  wait_for 60 "slurmdbd to answer" sl sacctmgr -n show cluster || die_with_log slurmdbd "$logf"
}

# Cluster, account and user must exist in the database before slurmctld starts,
# so that it registers at once (no restart needed).
register_accounting() {
  if ! sl sacctmgr -n -P show cluster format=cluster | grep -qx stride; then
    log "registering cluster 'stride' in slurmdbd"
    sl sacctmgr -i add cluster stride >/dev/null
  fi
  if ! sl sacctmgr -n -P show account stride format=account | grep -qx stride; then
    sl sacctmgr -i add account stride cluster=stride description=stride-tests organization=stride >/dev/null
  fi
  if ! sl sacctmgr -n -P show assoc cluster=stride user=root format=account | grep -qx stride; then
    sl sacctmgr -i add user root account=stride cluster=stride defaultaccount=stride >/dev/null
  fi
}

start_slurmctld() {
  local pidf="$STATE/run/slurmctld.pid" logf="$STATE/log/slurmctld.log"
  pid_alive "$pidf" slurmctld && return 0
  port_busy "$CTL_ADDR" "$CTL_PORT" && die "port $CTL_PORT is taken by another program (not our slurmctld)"
  log "starting slurmctld"
  SLURM_CONF="$CONF" run_in_ns "$CTL_NAME" slurmctld >>"$logf" 2>&1 9>&- || die_with_log slurmctld "$logf"
  wait_for 60 "slurmctld to answer" sl scontrol ping || die_with_log slurmctld "$logf"
}

start_slurmd() { # node name
  local n=$1 pidf="$STATE/run/slurmd-$1.pid" logf="$STATE/log/slurmd-$1.log"
  pid_alive "$pidf" slurmd && return 0
  port_busy "$(node_addr "$n")" "$(node_port "$n")" && die "port $(node_port "$n") is taken by another program (not our slurmd $n)"
  log "starting slurmd $n ($(node_addr "$n"):$(node_port "$n"))"
  SLURM_CONF="$CONF" run_in_ns "$n" slurmd -N "$n" >>"$logf" 2>&1 9>&- || die_with_log "slurmd $n" "$logf"
  wait_for 30 "slurmd $n pid file" pid_alive "$pidf" slurmd || die_with_log "slurmd $n" "$logf"
}

# All nodes idle (or busy with jobs) in sinfo. Nodes left DOWN/DRAINED by an
# earlier crash are resumed once.
nodes_ready() {
  local ok=0 n state
  while read -r n state; do
    case $state in
      idle | mixed | allocated | completing) ok=$((ok + 1)) ;;
      down | drained | draining) sl scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
    esac
  done < <(sl sinfo -h -N -o '%N %T' | sort -u)
  ((ok == NODES))
}

# ------------------------------------------------------------------- health
any_running() {
  local f
  for f in "$STATE"/run/*.pid; do
    [[ -f $f ]] || continue
    pid_alive "$f" "$(basename "$f" .pid | sed 's/-node[0-9]*$//')" && return 0
  done
  return 1
}

all_running() {
  local n
  pid_alive "$STATE/run/munged.pid" munged && pid_alive "$STATE/run/mariadbd.pid" mariadbd \
    && pid_alive "$STATE/run/slurmdbd.pid" slurmdbd && pid_alive "$STATE/run/slurmctld.pid" slurmctld \
    || return 1
  for n in $(node_names); do pid_alive "$STATE/run/slurmd-$n.pid" slurmd || return 1; done
}

healthy() {
  [[ -f $CONF ]] && all_running && sl scontrol ping >/dev/null 2>&1 \
    && sl sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx stride \
    && nodes_ready
}

# ----------------------------------------------------------------- commands
cmd_up() {
  local t0=$SECONDS n
  ((NODES >= 1 && NODES <= 16)) || die "STRIDE_SLURM_NODES must be 1..16 (got $NODES)"
  ((EUID == 0)) || die "must run as root (namespaces, bind mounts, SlurmUser=root); try: sudo bash $0 up"
  make_dirs
  # Re-rendered every time, so an edited template or another node count is
  # picked up: running daemons on an outdated config get restarted.
  if ! write_config; then
    log "configuration changed (templates or STRIDE_SLURM_*): restarting the cluster"
    cmd_down; write_config
  fi
  if healthy; then
    log "already up and healthy ($STATE)"; cmd_env; return 0
  fi
  cmd_install
  start_munge
  start_mariadb
  start_slurmdbd
  register_accounting
  start_slurmctld
  for n in $(node_names); do start_slurmd "$n"; done
  if ! wait_for 90 "all $NODES nodes idle in sinfo" nodes_ready; then
    sl sinfo -N -l >&2 || true
    for n in $(node_names); do log "slurmd $n log: $STATE/log/slurmd-$n.log"; done
    die_with_log slurmctld "$STATE/log/slurmctld.log"
  fi
  log "cluster up in $((SECONDS - t0))s: $NODES nodes, state in $STATE"
  cmd_env
}

# Everything in a node's namespace (slurmd, slurmstepd, job processes) goes:
# a leftover job step must not keep running after `down`.
kill_node_namespace() { # node
  local pidf="$STATE/run/slurmd-$1.pid" ns p
  pid_alive "$pidf" slurmd || return 0
  ns=$(readlink "/proc/$(<"$pidf")/ns/uts") || return 0
  # Never sweep the host's own namespace (should slurmd ever run in it).
  [[ $ns != "$(readlink /proc/$$/ns/uts)" && $ns != "$(readlink /proc/1/ns/uts)" ]] || ns=""
  stop_pid "$pidf" slurmd "slurmd $1"
  [[ -n $ns ]] || return 0
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/uts" 2>/dev/null) == "$ns" ]] && kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

cmd_down() {
  local n
  [[ -d $STATE/run ]] || { log "nothing to stop ($STATE/run missing)"; return 0; }
  for n in $(node_names) $(ls "$STATE/run" 2>/dev/null | sed -n 's/^slurmd-\(node[0-9]*\)\.pid$/\1/p'); do
    kill_node_namespace "$n"
  done
  stop_pid "$STATE/run/slurmctld.pid" slurmctld slurmctld
  stop_pid "$STATE/run/slurmdbd.pid" slurmdbd slurmdbd
  stop_pid "$STATE/run/mariadbd.pid" mariadbd mariadbd
  stop_pid "$STATE/run/munged.pid" munged munged
  log "down"
}

cmd_status() {
  local f name rc=0
  echo "state folder: $STATE"
  for f in munged mariadbd slurmdbd slurmctld $(node_names | sed 's/^/slurmd-/'); do
    name=${f%%-*}
    if pid_alive "$STATE/run/$f.pid" "$name"; then
      echo "  $f: running (pid $(<"$STATE/run/$f.pid"))"
    else
      echo "  $f: NOT running"; rc=1
    fi
  done
  if ((rc == 0)); then
    sl sinfo || rc=1
    sl squeue || rc=1
  fi
  return $rc
}

cmd_env() {
  echo "export SLURM_CONF=$CONF"
  echo "export STRIDE_SLURM_DIR=$STATE"
}

cmd_purge() {
  cmd_down
  case $STATE in /|/tmp|/root|/home|"") die "refusing to delete $STATE" ;; esac
  log "deleting $STATE"; rm -rf "$STATE"
}

# ------------------------------------------------------------- state folder
# The state folder holds root's munge key (whoever knows it can run jobs as
# root) and the database password. If another user created it first (the
# default lives in the shared /tmp), they chose both, and could swap any file
# later: so it must be a real folder (no symlink), owned by root or the user
# running this, writable by nobody else, below a parent nobody else may
# rename it in. Anything else is refused with one line, never repaired.
refuse_state() { log "ERROR: refusing state folder $STATE: $*"; exit 1; }

check_owned_private() { # path label [secret]: ours (or root's), no symlink, writable (secret: readable) by us only
  local owner mode fix="remove it, or set STRIDE_SLURM_DIR to a folder of your own"
  [[ ! -L $1 ]] || refuse_state "$2 is a symlink (to $(readlink -- "$1")): $fix"
  [[ -e $1 ]] || return 0
  read -r owner mode < <(stat -c '%u %a' -- "$1")
  ((owner == EUID || owner == 0)) \
    || refuse_state "$2 belongs to uid $owner, not to you (uid $EUID), so the munge key and database password may be theirs: $fix"
  ((!(8#$mode & 8#022))) || refuse_state "$2 is writable by group or others (mode $mode): $fix"
  [[ -z ${3:-} ]] || ((!(8#$mode & 8#077))) || refuse_state "$2 is readable by group or others (mode $mode): $fix"
}

check_state_dir() {
  local parent mode f
  parent=$(dirname -- "$STATE")
  if [[ -d $parent ]]; then
    mode=$(stat -L -c '%a' -- "$parent")
    # A folder others may write in, without the sticky bit (/tmp has it), lets them rename ours away.
    ((!(8#$mode & 8#022) || (8#$mode & 8#1000))) \
      || refuse_state "its parent $parent is writable by others and not sticky (mode $mode): choose STRIDE_SLURM_DIR elsewhere"
  fi
  check_owned_private "$STATE" "it"
  [[ ! -e $STATE || -d $STATE ]] || refuse_state "it is not a folder: remove it, or set STRIDE_SLURM_DIR elsewhere"
  for f in etc run log spool mysql munge .lock; do check_owned_private "$STATE/$f" "its $f"; done
  for f in munge/munge.key mysql/slurm.pass etc/slurmdbd.conf etc/my.cnf; do
    check_owned_private "$STATE/$f" "its $f" secret
  done
}

# Created by mkdir (atomic: it fails if the folder already exists) with its mode, then checked either way.
ensure_state_dir() {
  mkdir -p -- "$(dirname -- "$STATE")"
  check_state_dir
  mkdir -m 0711 -- "$STATE" 2>/dev/null || true
  check_state_dir
}

main() {
  local cmd=${1:-help}
  case $cmd in
    install) cmd_install ;;
    check) check_state_dir; log "state folder $STATE: ok" ;;
    up | down | status | purge)
      ensure_state_dir
      # One cluster operation at a time (parallel CI jobs, double clicks).
      exec 9>"$STATE/.lock"
      flock -w 300 9 || die "another cluster.sh holds $STATE/.lock"
      "cmd_$cmd" ;;
    env) check_state_dir; cmd_env ;;
    *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; [[ $cmd == help ]] ;;
  esac
}

main "$@"
