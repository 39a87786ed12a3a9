# bench/ovs.sh — a private Open vSwitch with the netdev (userspace) datapath, for
# bench/userspace.sh. Sourced by it, not run on its own (the one entry point is userspace.sh).
#
# Everything lives in $OVS_DIR (a directory under the bench's work dir): the database file,
# ovsdb-server's socket, both daemons' pidfiles, unixctl sockets and logs. Both daemons run
# inside the bridge namespace $OVS_NS (so `ip netns pids` finds them in any cleanup), every
# ovs-vsctl call names the private database socket (--db) and every ovs-appctl call the
# private control socket (-t PATH). A system Open vSwitch, running or not, is never
# contacted: no default path (/run/openvswitch, /etc/openvswitch) is used.
#
# Caller provides: OVS_NS (namespace), OVS_DIR (private dir), die() and log().
#
#   ovs_deps                     0 if every tool and the schema are there
#   ovs_start BRIDGE PORT...     fresh db, ovsdb-server, ovs-vswitchd; netdev bridge with the
#                                ports, NORMAL (MAC-learning) forwarding; waits for the ports
#   ovs_stop                     ovs-vswitchd exit --cleanup, ovsdb-server exit; kills by
#                                pidfile if they do not go; idempotent
#   OVS_VSWITCHD_PID             pid of the running ovs-vswitchd (empty when stopped)

OVS_SCHEMA=${OVS_SCHEMA:-/usr/share/openvswitch/vswitch.ovsschema}
OVS_TOOLS=(ovsdb-tool ovsdb-server ovs-vswitchd ovs-vsctl ovs-appctl)
OVS_VSWITCHD_PID=""

ovs_deps() {
    local t
    for t in "${OVS_TOOLS[@]}"; do command -v "$t" >/dev/null || return 1; done
    [[ -r $OVS_SCHEMA ]]
}

# Every OVS tool gets the private directories in its environment as well (belt and braces:
# the explicit --db/-t/--pidfile/--unixctl/--log-file options below already name them).
ovs_env() {
    env OVS_RUNDIR="$OVS_DIR" OVS_LOGDIR="$OVS_DIR" OVS_DBDIR="$OVS_DIR" \
        OVS_SYSCONFDIR="$OVS_DIR" "$@"
}
ovs_vsctl() { ovs_env ovs-vsctl --db="unix:$OVS_DIR/db.sock" --timeout=10 "$@"; }
ovs_appctl() { ovs_env timeout 10 ovs-appctl -t "$OVS_DIR/$1.ctl" "${@:2}"; }

ovs_start() {
    local br=$1 p i ofport
    shift
    mkdir -p "$OVS_DIR"
    rm -f "$OVS_DIR/conf.db" "$OVS_DIR"/*.pid
    ovs_env ovsdb-tool create "$OVS_DIR/conf.db" "$OVS_SCHEMA"
    ovs_env ip netns exec "$OVS_NS" ovsdb-server "$OVS_DIR/conf.db" \
        --remote="punix:$OVS_DIR/db.sock" --pidfile="$OVS_DIR/ovsdb-server.pid" \
        --unixctl="$OVS_DIR/ovsdb-server.ctl" --log-file="$OVS_DIR/ovsdb-server.log" -vconsole:off \
        --detach --no-chdir 2>>"$OVS_DIR/stderr.log" ||
        die "ovsdb-server did not start: $(tail -5 "$OVS_DIR/ovsdb-server.log" 2>/dev/null)"
    ovs_vsctl --no-wait init
    local add=(--no-wait add-br "$br" -- set bridge "$br" datapath_type=netdev fail_mode=standalone)
    for p in "$@"; do add+=(-- add-port "$br" "$p"); done
    ovs_vsctl "${add[@]}"
    ovs_env ip netns exec "$OVS_NS" ovs-vswitchd "unix:$OVS_DIR/db.sock" \
        --pidfile="$OVS_DIR/ovs-vswitchd.pid" --unixctl="$OVS_DIR/ovs-vswitchd.ctl" \
        --log-file="$OVS_DIR/ovs-vswitchd.log" -vconsole:off --detach --no-chdir 2>>"$OVS_DIR/stderr.log" ||
        die "ovs-vswitchd did not start: $(tail -5 "$OVS_DIR/ovs-vswitchd.log" 2>/dev/null)"
    OVS_VSWITCHD_PID=$(cat "$OVS_DIR/ovs-vswitchd.pid")
    # The ports are opened by the daemon's first pass over the database: wait for an ofport.
    for p in "$@"; do
        for ((i = 0; ; i++)); do
            ofport=$(ovs_vsctl get Interface "$p" ofport 2>/dev/null || true)
            [[ $ofport =~ ^[0-9]+$ && $ofport -gt 0 ]] && break
            ((i < 100)) || die "OVS did not open port $p (ofport '$ofport', error: $(ovs_vsctl get Interface "$p" error 2>&1)); log: $(tail -5 "$OVS_DIR/ovs-vswitchd.log")"
            sleep 0.1
        done
    done
    [[ $(ovs_vsctl get bridge "$br" datapath_type) == netdev ]] || die "OVS bridge $br is not on the netdev datapath"
}

# Stop a daemon of ours: unixctl exit first, then TERM/KILL by its private pidfile.
ovs_stop_one() { # NAME [exit args]
    local name=$1 pid="" i
    shift
    if [[ -r $OVS_DIR/$name.pid ]]; then pid=$(cat "$OVS_DIR/$name.pid"); fi
    if [[ -S $OVS_DIR/$name.ctl ]]; then ovs_appctl "$name" exit "$@" >/dev/null 2>&1 || true; fi
    [[ -n $pid ]] || return 0
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -TERM "$pid" 2>/dev/null; then sleep 0.3; fi
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$OVS_DIR/$name.pid"
    return 0
}

ovs_stop() {
    [[ -n ${OVS_DIR:-} && -d $OVS_DIR ]] || return 0
    ovs_stop_one ovs-vswitchd --cleanup
    ovs_stop_one ovsdb-server
    OVS_VSWITCHD_PID=""
}
