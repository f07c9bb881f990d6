#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests and for trying `music2vec launch` without a cluster: one node
# on loopback, and two more hosts, each in network and UTS namespaces of its own, for multi-node jobs.
#
#   local_slurm.sh start    install slurm + munge + slurmdbd + mariadb (Debian packages) when missing, write the
#                           configuration, start the daemons in the background, wait for every node to be idle
#   local_slurm.sh stop     cancel the jobs, stop exactly the daemons that `start` recorded, remove the namespaces
#   local_slurm.sh status   exit 0 when every recorded daemon is alive (and print sinfo)
#
# Partitions: `debug` (default) is this machine's own node, reached on 127.0.0.1. `twohosts` is m2v-node1 and
# m2v-node2: a slurmd each, in a network namespace (its own address, $NET.11 and .12, on a veth pair whose host end
# is on the bridge m2v-br0, $NET.1) and a UTS namespace (its own hostname); the jobs they start live there too. They
# share the filesystem and munge with the host. No route leads off the bridge: the namespaces have no default route,
# and nothing forwards their packets. Where namespaces cannot be made (no CAP_NET_ADMIN, no `ip`), `start` goes on
# without them and writes why to $DIR/twohosts.unavailable.
#
# Needs root and apt (Debian 12: slurm 22.05). No systemd and no cgroups: each daemon runs in the foreground under
# setsid, and its PID and executable are recorded so that `stop` never signals a process it did not start.
# Accounting (slurmdbd on a private mariadb) is on, because `sacct` is how submitit and `music2vec status` learn
# the state of a job that ended outside Python (cancelled, killed, requeued).
#
# Environment: LOCAL_SLURM_DIR (state, logs, sockets; default /tmp/music2vec-slurm), LOCAL_SLURM_PARTITION
# (default debug), LOCAL_SLURM_CPUS (CPUs each node advertises; more than the machine has oversubscribes it),
# LOCAL_SLURM_WAIT_S (default 90), LOCAL_SLURM_NET (the bridge's /24, default 10.213.79). Ports: 6817 slurmctld
# (on all the host's addresses), 6818 slurmd (each in its namespace), 6819 slurmdbd and 3307 mariadb on 127.0.0.1.
# Adds the two hosts' names to /etc/hosts (removed by `stop`), as a cluster's DNS would.
# Writes /etc/slurm/slurm.conf and slurmdbd.conf (the default paths, so sbatch, sacct and submitit need no
# SLURM_CONF); a slurm.conf this script did not write is kept as slurm.conf.before-local-slurm.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/music2vec-slurm}
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
WAIT_S=${LOCAL_SLURM_WAIT_S:-90}
NODE=$(hostname -s)
CLUSTER=music2vec-local
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
STAMP="# written by music2vec cluster/testing/local_slurm.sh"
PIDS=$DIR/pids
LOG=$DIR/log
MUNGE_SOCKET=$DIR/munge/socket
DB_SOCKET=$DIR/db/mariadb.sock
DAEMONS="munged mariadbd slurmdbd slurmctld slurmd"  # start order; stop goes in reverse
NET=${LOCAL_SLURM_NET:-10.213.79}
BRIDGE=m2v-br0
HOSTS="m2v-node1 m2v-node2"
HOSTS_STAMP="# music2vec local_slurm.sh twohosts"
UNAVAILABLE=$DIR/twohosts.unavailable

log() { printf '[local_slurm %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------------------------------------ recorded daemons
# $PIDS has one line per daemon: "name pid exe". A PID is ours only while /proc/PID/exe is still the recorded binary.
ours() { [ -e "/proc/$1" ] && [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$2" ] && ! is_zombie "$1"; }
is_zombie() { [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
lookup() { [ -f "$PIDS" ] && awk -v name="$1" '$1 == name {print $2, $3}' "$PIDS" || true; }
alive() { local entry; entry=$(lookup "$1"); [ -n "$entry" ] && ours $entry; }

spawn() {  # name user command... : run a foreground daemon in its own session and record its PID
    local name=$1 user=$2 exe pid
    shift 2
    exe=$(readlink -f "${SPAWN_EXE:-$1}")  # what the command finally execs into (SPAWN_EXE, for a wrapper)
    if [ "$user" = root ]; then
        setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
    else  # setpriv execs, so $! is the daemon itself
        setsid setpriv --reuid="$user" --regid="$user" --init-groups "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
    fi
    pid=$!
    for _ in $(seq 100); do [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$exe" ] && break; sleep 0.05; done
    echo "$name $pid $exe" >>"$PIDS"
    log "started $name (pid $pid)"
}

halt() {  # name: SIGTERM, then SIGKILL after 10 s
    local entry pid exe
    entry=$(lookup "$1")
    [ -n "$entry" ] || return 0
    read -r pid exe <<<"$entry"
    if ours "$pid" "$exe"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do ours "$pid" "$exe" || break; sleep 0.1; done
        if ours "$pid" "$exe"; then log "$1 (pid $pid) ignored SIGTERM; killing it"; kill -KILL "$pid" || true; fi
        log "stopped $1 (pid $pid)"
    fi
}

await() {  # what daemon command... : poll the command until it succeeds, the daemon dies, or WAIT_S passes
    local what=$1 daemon=$2 started=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! alive "$daemon" || ((SECONDS - started > WAIT_S)); then
            tail -n 30 "$LOG/$daemon".* >&2 2>/dev/null || true
            fail "gave up waiting for $what ($daemon $(alive "$daemon" && echo "still running" || echo died))"
        fi
        sleep 0.3
    done
}

# ------------------------------------------------------------------------------------------------ installation
install_packages() {
    local wanted=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server) missing=() package
    for package in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    local blocker=/usr/sbin/policy-rc.d own_blocker=0 status=0
    if [ ! -e $blocker ]; then  # keep the packages' scripts from starting system services: we start our own
        printf '#!/bin/sh\nexit 101\n' >$blocker && chmod 755 $blocker && own_blocker=1
    fi
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=600 update -qq &&
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
    } >"$DIR/apt.log" 2>&1 || status=$?
    [ $own_blocker -eq 1 ] && rm -f $blocker
    [ $status -eq 0 ] || { tail -n 30 "$DIR/apt.log" >&2; fail "apt-get failed; see $DIR/apt.log"; }
}

# ------------------------------------------------------------------------------------------------ two hosts
host_index() { echo "${1#m2v-node}"; }  # m2v-node2 -> 2

make_network() {  # the bridge, and per host a namespace with its end of a veth pair; fails on the first error
    ip link add $BRIDGE type bridge &&
        ip addr add "$NET.1/24" dev $BRIDGE &&
        ip link set $BRIDGE up || return 1
    local host index
    for host in $HOSTS; do
        index=$(host_index "$host")
        ip netns add "$host" &&
            ip link add "m2v-veth$index" type veth peer name eth0 netns "$host" &&
            ip link set "m2v-veth$index" master $BRIDGE up &&
            ip -n "$host" addr add "$NET.1$index/24" dev eth0 &&
            ip -n "$host" link set eth0 up &&
            ip -n "$host" link set lo up || return 1
        printf '%s %s %s\n' "$NET.1$index" "$host" "$HOSTS_STAMP" >>/etc/hosts
    done
}

setup_network() {  # 0 with the two hosts' network up; else 1, and why in $UNAVAILABLE
    local error
    rm -f "$UNAVAILABLE"
    remove_network
    if ! command -v ip >/dev/null; then
        echo "the ip command (iproute2) is not installed" >"$UNAVAILABLE"
    elif ! error=$(make_network 2>&1); then
        echo "network namespaces could not be made: ${error:-unknown error}" >"$UNAVAILABLE"
        remove_network
    else
        return 0
    fi
    log "two hosts unavailable: $(cat "$UNAVAILABLE")"
    return 1
}

remove_network() {  # the namespaces (killing what still runs in them: only the jobs of our nodes), bridge, names
    local host pids
    command -v ip >/dev/null || return 0
    for host in $HOSTS; do
        if ip netns list 2>/dev/null | grep -qw "^$host"; then
            pids=$(ip netns pids "$host" 2>/dev/null || true)
            [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
            ip netns del "$host" 2>/dev/null || true
        fi
    done
    ip link del $BRIDGE 2>/dev/null || true
    if grep -qF "$HOSTS_STAMP" /etc/hosts 2>/dev/null; then  # in place: /etc/hosts may be a bind mount
        local kept
        kept=$(grep -vF "$HOSTS_STAMP" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

twohosts() { [ -e "$DIR/twohosts.up" ]; }

# ------------------------------------------------------------------------------------------------ configuration
write_configs() {
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts  # MASTER_ADDR is the node name
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge && mungekey --create --keyfile=/etc/munge/munge.key --force
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key

    local hardware cpus memory
    hardware=$(slurmd -C | head -n 1)
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hardware" | cut -d= -f2)
    memory=$(grep -o 'RealMemory=[0-9]*' <<<"$hardware" | cut -d= -f2)
    cpus=${LOCAL_SLURM_CPUS:-$cpus}
    if [ -f $CONF ] && ! grep -qF "$STAMP" $CONF && [ ! -e $CONF.before-local-slurm ]; then
        cp -p $CONF $CONF.before-local-slurm
    fi
    mkdir -p /etc/slurm
    # The two hosts reach the controller on the bridge; so does everything on this machine then (a local address).
    local controller=127.0.0.1 extra_nodes="" host
    if twohosts; then
        controller=$NET.1
        for host in $HOSTS; do
            extra_nodes+="NodeName=$host NodeAddr=$NET.1$(host_index "$host") NodeHostname=$host CPUs=$cpus"
            extra_nodes+=" RealMemory=$(((memory - 256) / 2)) State=UNKNOWN"$'\n'
        done
        extra_nodes+="PartitionName=twohosts Nodes=m2v-node[1-2] MaxTime=INFINITE MaxNodes=2 State=UP"
    fi
    # Job ids must not repeat across restarts: submitit keeps a job's files under jobs/<id>, and a reused id would
    # hand a new job the old one's result. The epoch makes each start's ids fresh.
    cat >$CONF.new <<CONF
$STAMP
ClusterName=$CLUSTER
SlurmctldHost=$NODE($controller)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd-%n
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/state/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# sacct and sacctmgr reach slurmdbd through the munge socket named here (they ignore AuthInfo)
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
FirstJobId=$(($(date +%s) % 60000000 + 1))
MailProg=/bin/true
KillWait=30  # SLURM's default: the time a job has between SIGTERM and SIGKILL to checkpoint
MinJobAge=600
ReturnToService=2
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$((memory - 256)) State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE MaxNodes=1 State=UP
$extra_nodes
CONF
    mv $CONF.new $CONF
    cat >$DBD_CONF <<CONF
$STAMP
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$DIR/state/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
CONF
    chmod 600 $DBD_CONF
}

# ------------------------------------------------------------------------------------------------ daemons
start_daemons() {
    mkdir -p "$DIR/munge" "$DIR/db" "$DIR/state/ctld" "$DIR/state/slurmd-$NODE"
    chown munge:munge "$DIR/munge"
    chown mysql:mysql "$DIR/db"
    spawn munged munge /usr/sbin/munged -F --socket="$MUNGE_SOCKET" --key-file=/etc/munge/munge.key \
        --pid-file="$DIR/munge/pid" --seed-file="$DIR/munge/seed"
    await "munge" munged bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"

    mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/db/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed; see $LOG/mariadb-install.log"
    # --no-defaults must come first: a system mariadb's /etc/mysql settings (socket, port) must not apply
    spawn mariadbd root "$(command -v mariadbd)" --no-defaults --user=mysql --datadir="$DIR/db/data" \
        --socket="$DB_SOCKET" --bind-address=127.0.0.1 --port=3307 --log-error="$DIR/db/error.log" \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=64M
    await "mariadb" mariadbd mariadb --no-defaults -S "$DB_SOCKET" -u root -e "select 1"
    mariadb --no-defaults -S "$DB_SOCKET" -u root -e "
        CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm'; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

    spawn slurmdbd root /usr/sbin/slurmdbd -D
    await "slurmdbd" slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    spawn slurmctld root /usr/sbin/slurmctld -D -i
    await "slurmctld" slurmctld bash -c "scontrol ping | grep -q UP"
    spawn slurmd root /usr/sbin/slurmd -D -N "$NODE"
    await "node $NODE idle" slurmd bash -c "sinfo -h -N -n '$NODE' -o %T | grep -qx idle"
    twohosts || return 0
    local host
    # In the host's network namespace, with its own hostname; nsenter, unshare and sh each exec the next, so the
    # recorded PID is slurmd's. Not `ip netns exec`: it mounts a sysfs of its own, which hides /sys/fs/cgroup.
    for host in $HOSTS; do
        mkdir -p "$DIR/state/slurmd-$host"
        SPAWN_EXE=/usr/sbin/slurmd spawn "slurmd-$host" root nsenter --net="/run/netns/$host" unshare --uts -- \
            /bin/sh -c 'hostname "$0" && exec /usr/sbin/slurmd -D -N "$0"' "$host"
    done
    for host in $HOSTS; do
        await "node $host idle" "slurmd-$host" bash -c "sinfo -h -N -n '$host' -o %T | grep -qx idle"
    done
}

recorded() { [ -f "$PIDS" ] && awk '{print $1}' "$PIDS" || true; }  # the daemons started, in start order

start() {
    mkdir -p "$DIR"
    local daemon running=0 stopped=0
    for daemon in $DAEMONS; do if alive $daemon; then running=1; else stopped=1; fi; done
    for daemon in $(recorded); do alive "$daemon" || stopped=1; done
    if [ $stopped -eq 0 ]; then log "already running"; return 0; fi
    [ $running -eq 1 ] && { log "some daemons died: restarting all"; stop; }
    install_packages
    rm -f "$DIR/twohosts.up"
    setup_network && touch "$DIR/twohosts.up"
    write_configs
    rm -rf "$DIR/state" "$DIR/munge" "$DIR/db" "$LOG.previous"  # fresh state; the last logs stay in log.previous
    [ -d "$LOG" ] && mv "$LOG" "$LOG.previous"
    mkdir -p "$LOG" && : >"$PIDS"
    start_daemons
    log "ready: $(sinfo -h -o '%P on %N (%c CPUs each)' | paste -sd ';' | sed 's/;/; /g')"
}

stop() {
    if alive slurmctld; then
        scancel --full --quiet --cluster="$CLUSTER" --user=root 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    local daemon
    for daemon in $(recorded | tac); do halt "$daemon"; done
    rm -f "$PIDS"
    remove_network
    rm -f "$DIR/twohosts.up"
}

status() {
    local daemon healthy=0
    [ -s "$PIDS" ] || { echo "not started"; return 1; }
    for daemon in $(recorded); do
        if alive "$daemon"; then echo "$daemon running"; else echo "$daemon NOT running"; healthy=1; fi
    done
    [ -f "$UNAVAILABLE" ] && echo "twohosts unavailable: $(cat "$UNAVAILABLE")"
    if [ $healthy -eq 0 ]; then sinfo || true; fi  # a busy controller does not make the daemons dead
    return $healthy
}

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts system daemons)"
case ${1:-} in
    start | stop | status) "$1" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
