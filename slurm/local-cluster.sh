#!/usr/bin/env bash
# Start a real multi-node SLURM cluster on this one machine, for the integration tests.
#
#   bash slurm/local-cluster.sh up       install what is missing, configure, start what is not
#                                        running, wait until every node is up (idempotent)
#   bash slurm/local-cluster.sh down     cancel jobs, stop every daemon it started, remove the
#                                        state directory, its config files and /etc/hosts lines
#   bash slurm/local-cluster.sh status   daemons and sinfo; exit 1 when the cluster is not up
#   bash slurm/local-cluster.sh smoke    srun over all nodes, sbatch --wait, checked in sacct
#
# Needs root and Debian/Ubuntu packages (apt-get); no systemd: the daemons are started by hand.
# The cluster matches slurm/clusters/local-test.yaml: one slurmctld, slurmdbd with a private
# MariaDB (so sacct works and submitit sees cancelled jobs as finished) and LOCAL_SLURM_NODES
# slurmd daemons, node1..nodeN, all on 127.0.0.1 with their own ports. Partitions: `debug`
# (default) and `high` (other names with LOCAL_SLURM_PARTITIONS); a job in `high` preempts `debug` jobs, which get their --signal
# (submitit's USR2) and are requeued.
#
# Each slurmd runs in its own UTS namespace, so `hostname` in a job prints its node's name;
# /etc/hosts maps node1..nodeN to 127.0.0.1. The nodes still share ONE network stack: two
# "nodes" cannot listen on the same port, so give every concurrent torch.distributed job its
# own MASTER_PORT. The nodes also share the real cores and memory: CPUs and RealMemory are
# advertised, not enforced (no cgroups).
#
# Settings (environment):
#   LOCAL_SLURM_NODES=4                       compute nodes
#   LOCAL_SLURM_NODE_PREFIX=node              their names: node1..nodeN
#   LOCAL_SLURM_PARTITIONS=debug,high         the default partition, then one whose jobs preempt it
#   LOCAL_SLURM_CLUSTER=${LOCAL_SLURM_CLUSTER:-localtest}             the cluster's name (ClusterName)
#   LOCAL_SLURM_CPUS=4                        CPUs each node advertises
#   LOCAL_SLURM_MEM_MB=4096                   RealMemory each node advertises
#   LOCAL_SLURM_STATE=/var/tmp/launch-local-slurm   state, logs, pids, MariaDB data
#   LOCAL_SLURM_PORT_BASE=24800               ports: base+1 slurmctld, +2 slurmdbd, +3 MariaDB,
#                                             +10+K slurmd of nodeK (below the kernel's
#                                             ephemeral range 32768-60999, so no outgoing
#                                             connection holds them)
#   LOCAL_SLURM_GRACE_S=20                    preemption grace: seconds between the signal to
#                                             a preempted job and its forced requeue
#   LOCAL_SLURM_WAIT_S=60                     cap on each wait for a daemon or the nodes
#
# /etc/slurm/slurm.conf and slurmdbd.conf are overwritten; a pre-existing slurm.conf that this
# script did not write is kept as slurm.conf.before-local-cluster and put back by `down`.
# Logs: $LOCAL_SLURM_STATE/log (the tail of the relevant one is printed when a step fails).
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-4}
NODE_PREFIX=${LOCAL_SLURM_NODE_PREFIX:-node}
PARTITIONS=${LOCAL_SLURM_PARTITIONS:-debug,high}
PARTITION=${PARTITIONS%%,*}
HIGH_PARTITION=${PARTITIONS#*,}
CPUS=${LOCAL_SLURM_CPUS:-4}
MEM_MB=${LOCAL_SLURM_MEM_MB:-4096}
STATE=${LOCAL_SLURM_STATE:-/var/tmp/launch-local-slurm}
PORT_BASE=${LOCAL_SLURM_PORT_BASE:-24800}
GRACE_S=${LOCAL_SLURM_GRACE_S:-20}
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

CLUSTER=${LOCAL_SLURM_CLUSTER:-localtest}
CTLD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
RUN=$STATE/run
LOG=$STATE/log
DB_SOCKET=$RUN/mariadb.sock
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
BACKUP=$CONF.before-local-cluster
MARK="# Written by slurm/local-cluster.sh; removed by its 'down'."
HOSTS_TAG="# launch-local-slurm"
LOCK=/run/lock/launch-local-slurm.lock
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd slurm-wlm-mysql-plugin mariadb-server)

log() { echo "[local-cluster $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the end of a daemon's logs, then fail.
die_with_log() {
  local name=$1 f
  shift
  for f in "$LOG/$name.log" "$LOG/$name.out"; do
    if [ -s "$f" ]; then echo "--- tail of $f" >&2; tail -n 20 "$f" >&2; fi
  done
  die "$*"
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "LOCAL_SLURM_NODES must be 1..99, got '$NODES'"
[[ $STATE == /?*/?* ]] || die "LOCAL_SLURM_STATE must be an absolute path below a directory, got '$STATE'"

# ---------------------------------------------------------------- processes

# True if PID exists and is not a zombie (PID 1 here reaps orphans seconds late).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# Print the pid of daemon NAME if it is running. The process name is checked too, because the
# state directory survives a reboot and its pid files then point at unrelated processes.
pid_of() {
  local name=$1 pid
  pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 1
  alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ] || return 1
  echo "$pid"
}

# Start daemon NAME (running in the foreground) in the background, in its own session, with
# stdio on $LOG/NAME.out and every other descriptor closed: a daemon that inherits the lock or
# a caller's pipe keeps it open for as long as it lives, and the next `up` or the caller hangs.
spawn() {
  local name=$1 fd
  shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
    exec setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1
  ) &
  echo $! >"$RUN/$name.pid"   # setsid execs without forking here, so this is the daemon's pid
}

# Poll COMMAND until it succeeds, at most WAIT_S seconds; fail early if daemon NAME exits.
wait_ready() {
  local name=$1 pid deadline=$((SECONDS + WAIT_S))
  shift
  pid=$(cat "$RUN/$name.pid")
  until "$@" >/dev/null 2>&1; do
    alive "$pid" || die_with_log "$name" "$name exited while starting"
    [ "$SECONDS" -lt "$deadline" ] || die_with_log "$name" "$name not ready after ${WAIT_S}s"
    sleep 0.2
  done
}

# SIGTERM the daemons NAME..., SIGKILL those still there after SECS seconds.
stop() {
  local secs=$1 name pid pids=() deadline
  shift
  for name in "$@"; do
    if pid=$(pid_of "$name"); then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$RUN/$name.pid"
  done
  deadline=$((SECONDS + secs))
  for pid in "${pids[@]}"; do
    while alive "$pid"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        log "pid $pid did not stop in ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.2
    done
  done
}

# Stop slurmctld and every slurmd, including the processes of jobs still running on a node.
# Those are found by the node's UTS namespace, which every job process inherits from slurmd.
stop_slurm() {
  local f nodes=() node uts own p
  own=$(readlink /proc/self/ns/uts)
  # slurmd deletes its pid file when it exits cleanly, so also go by the namespace records.
  for f in "$RUN"/slurmd-*.pid "$RUN"/slurmd-*.uts; do
    [ -e "$f" ] || continue
    node=${f##*/slurmd-}
    nodes+=("${node%.*}")
  done
  if [ ${#nodes[@]} -gt 0 ]; then
    stop 10 $(printf 'slurmd-%s\n' "${nodes[@]}" | sort -u)
    for node in "${nodes[@]}"; do
      uts=$(cat "$RUN/slurmd-$node.uts" 2>/dev/null) || continue
      rm -f "$RUN/slurmd-$node.uts"
      [ "$uts" != "$own" ] || continue
      for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/ns/uts" 2>/dev/null)" = "$uts" ]; then kill -KILL "${p#/proc/}" 2>/dev/null || true; fi
      done
    done
  fi
  stop 30 slurmctld
}

# ---------------------------------------------------------------- install and configure

install_packages() {
  local missing=() p policy=/usr/sbin/policy-rc.d made_policy=0
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "installing ${missing[*]} (log: $LOG/apt.log)"
  # Keep the packages' init scripts from starting system-wide daemons: this script starts
  # private ones.
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1; fi
  if ! { DEBIAN_FRONTEND=noninteractive timeout 900 apt-get update -q &&
         DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
           -o DPkg::Lock::Timeout=300 "${missing[@]}"; } >"$LOG/apt.log" 2>&1; then
    [ "$made_policy" = 0 ] || rm -f "$policy"
    tail -n 20 "$LOG/apt.log" >&2
    die "apt-get could not install ${missing[*]}"
  fi
  [ "$made_policy" = 0 ] || rm -f "$policy"
}

slurm_conf() {
  local node_hostnames=$1
  cat <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only when its credential has expired (default 120 s).
AuthInfo=cred_expire=10
# No cgroups: processes are tracked by parent pid and not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Accept the advertised CPUs and memory even though the machine has fewer.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
ReturnToService=2
KillWait=5
Waittime=0
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
NodeName=$NODE_PREFIX[1-$NODES] NodeHostname=$node_hostnames NodeAddr=127.0.0.1 Port=[$((PORT_BASE + 11))-$((PORT_BASE + 10 + NODES))] CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES PriorityTier=1 GraceTime=$GRACE_S MaxTime=INFINITE State=UP
PartitionName=$HIGH_PARTITION Nodes=ALL PriorityTier=10 MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
  cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=local-test
StorageLoc=slurm_acct_db
EOF
}

# Write FILE from stdin with MODE; return 0 if its content changed.
write_if_changed() {
  local file=$1 mode=$2 new
  new=$(cat)
  [ "$(cat "$file" 2>/dev/null)" != "$new" ] || return 1
  printf '%s\n' "$new" >"$file.tmp"
  chmod "$mode" "$file.tmp"
  mv "$file.tmp" "$file"
}

remove_hosts_lines() {
  local kept
  kept=$(grep -v " $HOSTS_TAG\$" /etc/hosts || true)
  printf '%s\n' "$kept" >/etc/hosts   # rewritten in place: /etc/hosts may be a bind mount
}

write_hosts_lines() {
  local k
  remove_hosts_lines
  for ((k = 1; k <= NODES; k++)); do echo "127.0.0.1 $NODE_PREFIX$k $HOSTS_TAG"; done >>/etc/hosts
}

# ---------------------------------------------------------------- daemons

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  # A munged that is already serving (ours, or the system's) is used as it is.
  munge_works && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  log "starting munged"
  spawn munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  wait_ready munged munge_works
}

# The accounting data is thrown away by `down`: trade durability for fewer fsyncs, which make
# the first start (creating slurmdbd's tables) slow on a busy disk.
DB_FAST=(--innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0)

db() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCKET" -uroot "$@"; }

start_mariadb() {
  pid_of mariadbd >/dev/null && return 0
  if [ ! -d "$STATE/mariadb/mysql" ]; then
    log "creating the MariaDB data directory"
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/mariadb" --skip-test-db \
      --auth-root-authentication-method=socket "${DB_FAST[@]}" >"$LOG/mariadb-install.log" 2>&1 ||
      die_with_log mariadb-install "mariadb-install-db failed"
  fi
  log "starting mariadbd on 127.0.0.1:$DB_PORT"
  # A private instance: no config files read, small buffer pool, performance schema off.
  spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mariadb" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCKET" --pid-file="$RUN/mariadb.pidfile" \
    --log-error="$LOG/mariadbd.log" --skip-name-resolve --performance-schema=OFF \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=16M "${DB_FAST[@]}"
  wait_ready mariadbd db -e 'SELECT 1'
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'local-test';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
  pid_of slurmdbd >/dev/null && return 0
  log "starting slurmdbd on 127.0.0.1:$DBD_PORT"
  spawn slurmdbd /usr/sbin/slurmdbd -D
  wait_ready slurmdbd timeout 10 sacctmgr -n list cluster
  if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die_with_log slurmdbd "sacctmgr could not add cluster $CLUSTER"
  fi
}

start_slurmctld() {
  pid_of slurmctld >/dev/null && return 0
  log "starting slurmctld on 127.0.0.1:$CTLD_PORT"
  mkdir -p "$STATE/ctld"
  spawn slurmctld /usr/sbin/slurmctld -D
  wait_ready slurmctld ctld_up
}

ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmds() {
  local uts=$1 k node
  for ((k = 1; k <= NODES; k++)); do
    node=$NODE_PREFIX$k
    pid_of "slurmd-$node" >/dev/null && continue
    mkdir -p "$STATE/spool/$node"
    log "starting slurmd $node on 127.0.0.1:$((PORT_BASE + 10 + k))"
    if [ "$uts" = yes ]; then
      # Its own UTS namespace: `hostname` in the node's jobs prints the node's name.
      spawn "slurmd-$node" unshare --uts sh -c 'hostname "$1" && exec /usr/sbin/slurmd -D -N "$1"' sh "$node"
    else
      spawn "slurmd-$node" /usr/sbin/slurmd -D -N "$node"
    fi
  done
  for ((k = 1; k <= NODES; k++)); do
    node=$NODE_PREFIX$k
    wait_ready "slurmd-$node" pid_of "slurmd-$node"   # until exec reached slurmd
    readlink "/proc/$(pid_of "slurmd-$node")/ns/uts" >"$RUN/slurmd-$node.uts"
  done
}

# Number of nodes that respond and can run jobs (`idle*` and `down` are not counted; busy
# nodes are, so that `up` is a no-op while jobs run).
nodes_ready() {
  timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u |
    grep -cE ' (idle|mix|alloc|comp)$' || true
}

wait_nodes() {
  local ready=0 deadline=$((SECONDS + WAIT_S)) tries=0
  while :; do
    ready=$(nodes_ready)
    [ "$ready" -lt "$NODES" ] || return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      timeout 10 sinfo -N -l >&2 || true
      die_with_log slurmctld "only $ready of $NODES nodes up after ${WAIT_S}s (logs: $LOG)"
    fi
    # A node left DOWN by an earlier run comes back on registration (ReturnToService=2);
    # resume it by hand now and then in case it does not.
    tries=$((tries + 1))
    if [ $((tries % 25)) = 0 ]; then timeout 10 scontrol update nodename="$NODE_PREFIX[1-$NODES]" state=resume >/dev/null 2>&1 || true; fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- commands

cmd_up() {
  local t0=$SECONDS uts changed=0
  mkdir -p "$RUN" "$LOG" "$STATE/spool" /etc/slurm "${LOCK%/*}"
  touch "$STATE/.local-cluster"   # `down` deletes only a directory that has this mark
  exec 9>"$LOCK"
  flock -w 300 9 || die "another local-cluster.sh has held $LOCK for 300 s"
  install_packages

  uts=no
  if unshare --uts true 2>/dev/null; then uts=yes; else log "unshare --uts fails: every node keeps this machine's hostname"; fi
  write_hosts_lines
  if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    cp -n "$CONF" "$BACKUP"
    log "kept the existing $CONF as $BACKUP"
  fi
  if [ "$uts" = yes ]; then
    slurm_conf "$NODE_PREFIX[1-$NODES]" | write_if_changed "$CONF" 644 && changed=1
  else
    slurm_conf "$(hostname)" | write_if_changed "$CONF" 644 && changed=1
  fi
  slurmdbd_conf | write_if_changed "$DBD_CONF" 600 && changed=1
  if [ "$changed" = 1 ]; then   # daemons still running read the old files: restart them
    stop_slurm
    stop 30 slurmdbd
  fi

  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmds "$uts"
  wait_nodes
  log "up in $((SECONDS - t0)) s: $NODES nodes x $CPUS CPUs, partitions $PARTITION (default) and $HIGH_PARTITION; state in $STATE"
}

cmd_down() {
  local jobs deadline
  mkdir -p "${LOCK%/*}"
  exec 9>"$LOCK"
  flock -w 300 9 || die "another local-cluster.sh has held $LOCK for 300 s"
  if pid_of slurmctld >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      timeout 10 scancel $jobs 2>/dev/null || true
      # Processes that ignore SIGTERM (submitit's do) get SIGKILL after KillWait=5 s; anything
      # left after that is killed with its node below.
      deadline=$((SECONDS + 8))
      while [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    fi
  fi
  stop_slurm
  stop 30 slurmdbd
  stop 60 mariadbd
  stop 15 munged   # only when this script started it (pid file in $RUN)
  remove_hosts_lines
  if grep -qxF "$MARK" "$CONF" 2>/dev/null; then rm -f "$CONF"; fi
  if grep -qxF "$MARK" "$DBD_CONF" 2>/dev/null; then rm -f "$DBD_CONF"; fi
  if [ -f "$BACKUP" ] && [ ! -e "$CONF" ]; then mv "$BACKUP" "$CONF"; fi
  if [ -e "$STATE/.local-cluster" ]; then rm -rf "$STATE"; fi
  log "down"
}

cmd_status() {
  local name k names=(munged mariadbd slurmdbd slurmctld)
  for ((k = 1; k <= NODES; k++)); do names+=("slurmd-$NODE_PREFIX$k"); done
  for name in "${names[@]}"; do
    if pid_of "$name" >/dev/null; then
      printf '%-14s running (pid %s)\n' "$name" "$(pid_of "$name")"
    elif [ "$name" = munged ] && munge_works; then
      printf '%-14s running (not started by this script)\n' "$name"
    else
      printf '%-14s NOT running\n' "$name"
    fi
  done
  if ! ctld_up; then
    echo "slurmctld is not answering: the cluster is down (bash $0 up)"
    return 1
  fi
  timeout 10 sinfo
}

cmd_smoke() {
  local out srun_job sbatch_job state k dir=$STATE/smoke
  ctld_up || die "the cluster is not up (bash $0 up)"
  mkdir -p "$dir"

  log "srun -N$NODES: hostname on every node"
  out=$(timeout 60 srun -J smoke-srun -N "$NODES" sh -c 'echo "$SLURM_JOB_ID $(hostname)"') ||
    die "srun -N$NODES failed"
  echo "$out"
  [ "$(wc -l <<<"$out")" = "$NODES" ] || die "expected $NODES lines from srun"
  if [ "$(cat "$RUN/slurmd-${NODE_PREFIX}1.uts")" != "$(readlink /proc/self/ns/uts)" ]; then
    [ "$(cut -d' ' -f2 <<<"$out" | sort -u | wc -l)" = "$NODES" ] || die "expected $NODES different hostnames"
  fi
  srun_job=$(head -n 1 <<<"$out" | cut -d' ' -f1)

  log "sbatch --wait -N2 (a step on each of 2 nodes)"
  sbatch_job=$(timeout 120 sbatch --parsable --wait -J smoke-sbatch -N 2 -D "$dir" -o "$dir/%j.out" \
    --wrap 'srun hostname') || die "sbatch --wait failed; see $dir"
  cat "$dir/$sbatch_job.out"

  # The records reach the database a moment after the jobs end. Not `sacct -j`: it already
  # answers while a record is incomplete (seen: name "allocation", then the real name).
  for ((k = 0; k < 75; k++)); do
    state=$(timeout 10 sacct -n -X -P -S now-1hours -o JobID,JobName,State 2>/dev/null |
      grep -cxE "$srun_job\|smoke-srun\|COMPLETED|$sbatch_job\|smoke-sbatch\|COMPLETED" || true)
    [ "$state" != 2 ] || break
    sleep 0.2
  done
  timeout 10 sacct -X -j "$srun_job,$sbatch_job" -o JobID,JobName,Partition,NNodes,NodeList,State || true
  [ "$state" = 2 ] || die "after 15 s sacct does not show jobs $srun_job and $sbatch_job as COMPLETED"
  log "smoke test passed"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  smoke) cmd_smoke ;;
  *) echo "usage: $0 up|down|status|smoke" >&2; exit 2 ;;
esac
