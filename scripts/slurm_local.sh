#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 whose every file lives in one directory DIR: its own
# munge key and socket, slurm.conf, state, spool and logs, and job accounting the way a real
# cluster keeps it (slurmdbd on a MariaDB reached through a socket in DIR), so that `sacct`
# answers. Nothing under /etc is read or written; the daemons listen on free ports.
#
#   scripts/slurm_local.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm_local.sh stop DIR    # cancels the cluster's jobs, stops its daemons by PID
#
# Needs root (slurmd runs each job as the user who submitted it) and Debian's packages:
#   apt-get install --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd \
#       mariadb-server-core
# Keep DIR short (munge's socket path must fit in 108 bytes), e.g. $(mktemp -d /tmp/slurmXXXX).
# tests/test_slurm.py starts and stops its cluster with this script.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
dir=$2
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait up to $1 tenths of a second for the command after it to succeed.
wait_for() {
    local tenths=$1
    shift
    for _ in $(seq "$tenths"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

fail() {
    echo "error: $1; logs in $dir/log/" >&2
    stop
    exit 1
}

# Whether a process runs (a zombie, exited but not yet reaped by init, does not).
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}
gone() { ! alive "$1"; }

# Stop one daemon by the PID in its pid file: TERM, then KILL after 10 s.
stop_pid() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if kill -TERM "$pid" 2>/dev/null && ! wait_for 100 gone "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

start() {
    local missing=()
    for bin in munged mungekey slurmctld slurmd slurmdbd sbatch sacctmgr mariadbd python3; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    if ((${#missing[@]})); then
        echo "error: not installed: ${missing[*]} (apt-get install $PACKAGES)" >&2
        exit 3
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "error: slurmd must run as root to start jobs as their users" >&2
        exit 3
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -e $dir/slurm.conf ]]; then
        echo "error: $dir already holds a cluster; stop it, or start in an empty directory" >&2
        exit 2
    fi
    # munged insists: its socket's directory searchable by all, its key readable by it alone.
    chmod 755 "$dir"
    mkdir -m 700 "$dir/key" "$dir/db"
    mkdir -m 755 "$dir/munge" "$dir/log" "$dir/state" "$dir/spool"
    local socket=$dir/munge/munge.socket
    if ((${#socket} > 100)); then
        echo "error: $socket is too long for a Unix socket; use a shorter DIR" >&2
        exit 2
    fi
    export SLURM_CONF=$dir/slurm.conf

    # Authentication: a key of this cluster's own.
    mungekey --create --keyfile="$dir/key/munge.key"
    munged --key-file="$dir/key/munge.key" --socket="$socket" --seed-file="$dir/key/munged.seed" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" ||
        fail "munged did not start"

    # Accounting storage: a throwaway MariaDB reached only through its socket, in a directory
    # only root can enter (no TCP port, no grant tables: slurmdbd runs as root). Durability off:
    # nothing here needs to survive a crash.
    setsid mariadbd --no-defaults --datadir="$dir/db" --user=root --skip-networking \
        --skip-grant-tables --socket="$dir/db/mysqld.sock" --pid-file="$dir/db/mariadbd.pid" \
        --log-error="$dir/log/mariadb.log" --skip-log-bin --innodb-buffer-pool-size=32M \
        --innodb-log-file-size=8M --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 \
        </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/db/mariadbd.pid" # so that stop finds it even if it fails early
    wait_for 300 test -S "$dir/db/mysqld.sock" || fail "mariadbd did not start in 30 s"

    local dbd_port
    dbd_port=$(free_port)
    cat >"$dir/slurmdbd.conf" <<EOF
# Written by scripts/slurm_local.sh.
AuthType=auth/munge
AuthInfo=socket=$socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf" # slurmdbd refuses a config others can read

    local node cpus memory
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on 127.0.0.1.
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MailProg=/bin/true
# No cgroups in a container: track job processes through /proc, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$dbd_port
AccountingStoragePass=$socket
JobAcctGatherType=jobacct_gather/none
NodeName=localnode NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    MYSQL_UNIX_PORT=$dir/db/mysqld.sock slurmdbd || fail "slurmdbd did not start"
    wait_for 300 sacctmgr -n list cluster || fail "slurmdbd did not answer in 30 s"
    sacctmgr -i add cluster local >/dev/null || fail "sacctmgr could not add the cluster"
    slurmctld || fail "slurmctld did not start"
    slurmd -N localnode || fail "slurmd did not start"

    # Up when the node has registered and takes jobs.
    wait_for 300 bash -c '[[ $(sinfo -h -N -o %T) == idle ]]' ||
        fail "the node did not come up in 30 s: $(sinfo -h -N -o '%T %E' 2>&1)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    # Jobs first, while slurmctld and slurmd can still end them (KillWait: 30 s).
    if [[ -s $dir/slurmctld.pid ]] && alive "$(<"$dir/slurmctld.pid")"; then
        scancel --quiet --partition=debug 2>/dev/null || true
        wait_for 400 bash -c '[[ -z $(squeue -h -o %i) ]]' || true
    fi
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/slurmdbd.pid"
    stop_pid "$dir/db/mariadbd.pid"
    stop_pid "$dir/munge/munged.pid"
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
