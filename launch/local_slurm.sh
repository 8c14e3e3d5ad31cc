#!/usr/bin/env bash
# A private single-node Slurm on localhost (slurmctld + slurmd + munged) for tests and trials.
#
#   launch/local_slurm.sh install   apt-get install slurmctld slurmd slurm-client munge (root)
#   launch/local_slurm.sh up        install if needed, write the config, start the daemons
#   launch/local_slurm.sh down      stop the daemons this script started (pid files)
#   launch/local_slurm.sh status    exit 0 when the cluster answers and its node is usable
#   launch/local_slurm.sh env       print `export SLURM_CONF=...` for the clients
#
# Everything lives in $DAS_SLURM_DIR (default /var/tmp/das-slurm): slurm.conf, a munge key and
# socket of its own, state, logs and pid files. Nothing in /etc is touched and the ports are not
# Slurm's defaults, so a real Slurm or munge on the host is left alone; clients find this
# cluster through SLURM_CONF. Slurm 22.05 (Debian 12) without cgroups: proctrack/linuxproc,
# task/none. Exit status 3 means "cannot run here" (not root, no apt, no packages); callers
# (the slurm tests) skip with the printed reason.
set -euo pipefail

DIR=${DAS_SLURM_DIR:-/var/tmp/das-slurm}
CTLD_PORT=${DAS_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${DAS_SLURM_SLURMD_PORT:-16818}
CPUS=${DAS_SLURM_CPUS:-4}  # more than the cores on purpose (config_overrides): lets array tasks overlap
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

cannot() { echo "local_slurm: $*" >&2; exit 3; }

have_binaries() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sbatch >/dev/null
}

install() {
    have_binaries && return 0
    [ "$(id -u)" = 0 ] || cannot "Slurm is not installed and installing it needs root: run as root, or apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || cannot "Slurm is not installed and there is no apt-get; install ${PACKAGES[*]} by hand"
    echo "local_slurm: installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || cannot "apt-get update failed"
    # The packages' own service start is not wanted (no init system in CI); failures there are
    # harmless as long as the binaries arrive, which have_binaries checks.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null ||
        have_binaries || cannot "apt-get install ${PACKAGES[*]} failed"
    have_binaries || cannot "apt-get installed ${PACKAGES[*]} but the binaries are missing"
}

write_conf() {
    mkdir -p "$DIR"/{state,spool,log,run,munge}
    chmod 700 "$DIR/munge"
    cat >"$CONF" <<EOF
# Written by launch/local_slurm.sh: private single-node test cluster (do not use in production).
ClusterName=daslocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
PropagateResourceLimits=NONE
ReturnToService=2
MinJobAge=600
KillWait=10
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

responds() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'
}

up() {
    install
    [ "$(id -u)" = 0 ] || cannot "starting the daemons needs root (SlurmUser=root)"
    if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && responds; then
        echo "local_slurm: already running (SLURM_CONF=$CONF)"
        return 0
    fi
    down >/dev/null 2>&1 || true
    write_conf
    if [ ! -s "$DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || cannot "munged did not start (see $DIR/log/munged.log)"
    # -c: start from an empty job table (state of an earlier run is not wanted).
    slurmctld -c -f "$CONF" || cannot "slurmctld did not start (see $DIR/log/slurmctld.log)"
    slurmd -f "$CONF" -N localhost || cannot "slurmd did not start (see $DIR/log/slurmd.log)"
    for _ in $(seq 60); do
        if responds; then
            echo "local_slurm: up (SLURM_CONF=$CONF)"
            return 0
        fi
        SLURM_CONF=$CONF scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    cannot "the daemons started but the node never became idle; see $DIR/log/"
}

down() {
    local stopped=0
    for name in slurmd slurmctld munged; do
        local pidfile="$DIR/run/$name.pid"
        if pid_alive "$pidfile"; then
            local pid
            pid=$(cat "$pidfile")
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            stopped=$((stopped + 1))
        fi
        rm -f "$pidfile"
    done
    echo "local_slurm: stopped $stopped daemons"
}

case "${1:-}" in
    install) install ;;
    up) up ;;
    down) down ;;
    status) responds ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
