#!/usr/bin/env bash
# Start (installing if needed) a one-node Slurm cluster on localhost:
# munged -> MariaDB -> slurmdbd -> slurmctld -> slurmd.  Idempotent.
# State lives in ${CELLAVIE_CLUSTER_DIR:-/var/tmp/cellavie-cluster}; see cluster/README.rst.
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0="$(now)"
[[ "$(id -u)" -eq 0 ]] || die "must run as root (installs packages, runs daemons as root)"

# ---------------------------------------------------------------- install ---
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server libpmix-dev openmpi-bin libopenmpi-dev)

packages_missing() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed' || return 0
    done
    return 1
}

apt_retry() {
    # Another engineer may hold the dpkg lock: wait for it, and retry a few times.
    local i
    for i in 1 2 3 4 5; do
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@"; then
            return 0
        fi
        log "apt-get $* failed (attempt ${i}); retrying in 10 s"
        sleep 10
    done
    return 1
}

if packages_missing; then
    log "installing: ${PACKAGES[*]}"
    # Keep Debian's maintainer scripts from starting the *system* munge/mariadb/slurm
    # services (we run our own instances); only if no policy is in place already.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=0
    if [[ ! -e "${POLICY}" ]]; then
        printf '#!/bin/sh\n# temporary, from cellavie cluster/up.sh\nexit 101\n' >"${POLICY}"
        chmod 0755 "${POLICY}"
        ADDED_POLICY=1
        trap '[[ "${ADDED_POLICY}" == 1 ]] && rm -f "${POLICY}"' EXIT
    fi
    apt_retry update -qq
    apt_retry install -y -q "${PACKAGES[@]}"
    if [[ "${ADDED_POLICY}" == 1 ]]; then rm -f "${POLICY}"; ADDED_POLICY=0; fi
    log "packages installed ($(elapsed "${T0}") s)"
fi
for bin in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sinfo srun sacctmgr; do
    command -v "${bin}" >/dev/null || die "${bin} not found after install"
done

# ------------------------------------------------------------- state dirs ---
mkdir -p "${STATE}" "${ETC}" "${RUN}" "${LOG}" "${STATE}/spool/ctld" "${STATE}/spool/d" \
    "${STATE}/dev" "${MUNGE_DIR}" "${MUNGE_SOCKET_DIR}" "${DB_DIR}"
chmod 0755 "${STATE}" "${ETC}" "${RUN}" "${LOG}" "${STATE}/dev"
# munged: key and private dir 0700, socket dir must be o+x (clients connect as any user).
chmod 0711 "${MUNGE_DIR}"
chmod 0755 "${MUNGE_SOCKET_DIR}"

# Fake GPUs: character devices (195 = NVIDIA major).  Plain files are ignored by Slurm.
for ((i = 0; i < NODE_GPUS; i++)); do
    dev="${STATE}/dev/nvidia${i}"
    if [[ ! -c "${dev}" ]]; then
        rm -f "${dev}"
        mknod "${dev}" c 195 "${i}"
    fi
done

# MariaDB password for the slurm DB user (generated once, kept in the state dir).
DB_PASS_FILE="${DB_DIR}/slurm.pass"
if [[ ! -s "${DB_PASS_FILE}" ]]; then
    (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"${DB_PASS_FILE}")
fi
DB_PASS="$(cat "${DB_PASS_FILE}")"

# ---------------------------------------------------------------- configs ---
render() {  # render TEMPLATE OUTPUT
    sed -e "s|@STATE@|${STATE}|g" \
        -e "s|@HOST@|${HOST}|g" \
        -e "s|@CLUSTER@|${CLUSTER_NAME}|g" \
        -e "s|@CTLD_PORT@|${CTLD_PORT}|g" \
        -e "s|@SLURMD_PORT@|${SLURMD_PORT}|g" \
        -e "s|@DBD_PORT@|${DBD_PORT}|g" \
        -e "s|@DB_PORT@|${DB_PORT}|g" \
        -e "s|@DB_PASS@|${DB_PASS}|g" \
        -e "s|@MUNGE_SOCKET@|${MUNGE_SOCKET}|g" \
        -e "s|@CPUS@|${NODE_CPUS}|g" \
        -e "s|@REALMEM@|${NODE_MEM_MB}|g" \
        -e "s|@GPUS@|${NODE_GPUS}|g" \
        -e "s|@GPU_MAX@|$((NODE_GPUS - 1))|g" \
        "$1" >"$2.new"
    if grep -q '@[A-Z_]*@' "$2.new"; then die "unfilled placeholder in $2"; fi
}

CONFIG_CHANGED=0
install_conf() {  # install_conf NAME MODE: move $ETC/NAME.new into place
    local name="$1" mode="$2"
    if ! cmp -s "${ETC}/${name}.new" "${ETC}/${name}"; then
        CONFIG_CHANGED=1
        mv -f "${ETC}/${name}.new" "${ETC}/${name}"
    else
        rm -f "${ETC}/${name}.new"
    fi
    chmod "${mode}" "${ETC}/${name}"
}
render "${CLUSTER_SRC}/slurm.conf.in" "${ETC}/slurm.conf"
render "${CLUSTER_SRC}/gres.conf.in" "${ETC}/gres.conf"
render "${CLUSTER_SRC}/slurmdbd.conf.in" "${ETC}/slurmdbd.conf"
cp "${CLUSTER_SRC}/cgroup.conf" "${ETC}/cgroup.conf.new"
install_conf slurm.conf 0644
install_conf gres.conf 0644
install_conf cgroup.conf 0644
install_conf slurmdbd.conf 0600   # slurmdbd insists on 0600, owned by SlurmUser

# Install at Debian's default location so clients work without SLURM_CONF.
mkdir -p "${SYS_SLURM_ETC}"
for f in slurm.conf gres.conf cgroup.conf slurmdbd.conf; do
    dst="${SYS_SLURM_ETC}/${f}"
    if [[ -e "${dst}" ]] && ! grep -q 'cellavie' "${dst}" && [[ ! -e "${dst}.cellavie-orig" ]]; then
        cp -p "${dst}" "${dst}.cellavie-orig"   # keep a foreign config once
    fi
    if ! cmp -s "${ETC}/${f}" "${dst}"; then
        install -m "$(stat -c '%a' "${ETC}/${f}")" "${ETC}/${f}" "${dst}"
    fi
done

cat >"${STATE}/env.sh" <<EOF
# Generated by cluster/up.sh -- source it to talk to the cellavie dev cluster.
# (Not required: the same config is installed at ${SYS_SLURM_ETC}/slurm.conf.)
export SLURM_CONF='${ETC}/slurm.conf'
export CELLAVIE_CLUSTER_DIR='${STATE}'
# Open MPI refuses to run as root without these (jobs inherit the submitter's env).
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EOF

export SLURM_CONF="${ETC}/slurm.conf"

# ---------------------------------------------------------------- daemons ---
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit="$1" what="$2" t
    shift 2
    t="$(now)"
    until "$@" >/dev/null 2>&1; do
        if awk -v a="${t}" -v b="$(now)" -v l="${limit}" 'BEGIN { exit !(b - a > l) }'; then
            log "timed out after ${limit} s waiting for ${what}"
            return 1
        fi
        sleep 0.2
    done
}

stop_daemon() {  # stop_daemon NAME (used when the config changed)
    local pid
    pid="$(daemon_pid "$1")" || return 0
    log "restarting $1 (config changed)"
    kill -TERM "${pid}" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "${pid}" || break; sleep 0.2; done
    kill -KILL "${pid}" 2>/dev/null || true
    rm -f "$(pidfile_of "$1")"
}

if [[ "${CONFIG_CHANGED}" == 1 ]]; then
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon slurmdbd
fi

start_daemon() {  # start_daemon NAME READY_CHECK_FN COMMAND...
    local name="$1" ready="$2" pid
    shift 2
    if pid="$(daemon_pid "${name}")"; then
        log "${name} already running (pid ${pid})"
        return 0
    fi
    rm -f "$(pidfile_of "${name}")"
    local t
    t="$(now)"
    # setsid + no inherited stdio: daemons must not hold the caller's pipes open.
    setsid "$@" </dev/null >>"${LOG}/${name}.out" 2>&1 &
    if ! wait_for 60 "${name}" "${ready}"; then
        tail -n 20 "${LOG}/${name}"*.log "${LOG}/${name}.out" 2>/dev/null >&2 || true
        die "${name} did not start; logs in ${LOG}"
    fi
    log "${name} started (pid $(daemon_pid "${name}" || echo '?'), $(elapsed "${t}") s)"
}

# munged ------------------------------------------------------------------
MUNGE_KEY="${MUNGE_DIR}/munge.key"
if [[ ! -s "${MUNGE_KEY}" ]]; then
    (umask 077 && dd if=/dev/urandom of="${MUNGE_KEY}" bs=1024 count=1 status=none)
fi
chmod 0600 "${MUNGE_KEY}"
munge_ready() { daemon_pid munged && [[ -S "${MUNGE_SOCKET}" ]] && munge -n -S "${MUNGE_SOCKET}" | unmunge -S "${MUNGE_SOCKET}"; }
start_daemon munged munge_ready \
    munged --force --socket="${MUNGE_SOCKET}" --key-file="${MUNGE_KEY}" \
    --pid-file="$(pidfile_of munged)" --log-file="${LOG}/munged.log" \
    --seed-file="${MUNGE_DIR}/munged.seed"

# MariaDB (non-default port, data under the state dir) ---------------------
MARIADB_ARGS=(--no-defaults --user=root --datadir="${DB_DATA}" --socket="${DB_SOCKET}"
    --port="${DB_PORT}" --bind-address=127.0.0.1 --skip-name-resolve
    --pid-file="$(pidfile_of mariadbd)" --log-error="${LOG}/mariadbd.log"
    --innodb-buffer-pool-size=256M --innodb-log-file-size=64M
    --innodb-lock-wait-timeout=900 --max-connections=100)
if [[ ! -d "${DB_DATA}/mysql" ]]; then
    log "initialising MariaDB data dir ${DB_DATA}"
    rm -rf "${DB_DATA}"
    mariadb-install-db --no-defaults --user=root --datadir="${DB_DATA}" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"${LOG}/mariadb-install-db.log" 2>&1 || { tail -n 30 "${LOG}/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
fi
sql() { mariadb --no-defaults --protocol=socket -S "${DB_SOCKET}" -u root -N -B -e "$1"; }
mariadb_ready() { daemon_pid mariadbd && sql 'SELECT 1'; }
start_daemon mariadbd mariadb_ready mariadbd "${MARIADB_ARGS[@]}"
sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '${DB_PASS}';
     CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
     ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '${DB_PASS}';
     ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
     CREATE DATABASE IF NOT EXISTS slurm_acct_db;
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# slurmdbd ------------------------------------------------------------------
slurmdbd_ready() { daemon_pid slurmdbd && sacctmgr -n -P show cluster format=cluster; }
start_daemon slurmdbd slurmdbd_ready slurmdbd

# Register cluster / account / user (idempotent; before slurmctld connects).
if [[ -z "$(sacctmgr -n -P show cluster "${CLUSTER_NAME}" format=cluster)" ]]; then
    sacctmgr -i add cluster "${CLUSTER_NAME}" >/dev/null
    log "registered cluster ${CLUSTER_NAME} in accounting"
fi
if [[ -z "$(sacctmgr -n -P show account "${CLUSTER_ACCOUNT}" format=account)" ]]; then
    sacctmgr -i add account "${CLUSTER_ACCOUNT}" Cluster="${CLUSTER_NAME}" \
        Description='cellavie dev/CI' Organization=cellavie >/dev/null
    log "added account ${CLUSTER_ACCOUNT}"
fi
for user in root ${SUDO_USER:+"${SUDO_USER}"}; do
    if [[ -z "$(sacctmgr -n -P show assoc cluster="${CLUSTER_NAME}" account="${CLUSTER_ACCOUNT}" user="${user}" format=user)" ]]; then
        sacctmgr -i add user "${user}" Account="${CLUSTER_ACCOUNT}" Cluster="${CLUSTER_NAME}" >/dev/null
        log "added user ${user} to account ${CLUSTER_ACCOUNT}"
    fi
done

# slurmctld / slurmd ----------------------------------------------------------
slurmctld_ready() { daemon_pid slurmctld && scontrol ping | grep -q 'UP'; }
start_daemon slurmctld slurmctld_ready slurmctld -f "${ETC}/slurm.conf"
slurmd_ready() { daemon_pid slurmd; }
start_daemon slurmd slurmd_ready slurmd -f "${ETC}/slurm.conf" -N "${HOST}"

# ------------------------------------------------------------ node ready ---
node_state() { sinfo -h -n "${HOST}" -o '%T' 2>/dev/null | head -n1; }
node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}
if ! wait_for 20 "node ${HOST} to become idle" node_usable; then
    state="$(node_state)"
    log "node state '${state}'; reason: $(sinfo -h -n "${HOST}" -o '%E')"
    if [[ "${state}" == down* || "${state}" == drain* ]]; then
        scontrol update NodeName="${HOST}" State=RESUME || true
    fi
    wait_for 20 "node ${HOST} to become idle" node_usable ||
        die "node ${HOST} is '$(node_state)': $(sinfo -h -n "${HOST}" -o '%E'); see ${LOG}/slurmd.log"
fi

t="$(now)"
timeout 60 srun -N1 -n1 --job-name=cluster-up-check true ||
    die "srun -n1 true failed; see ${LOG}/slurmctld.log and ${LOG}/slurmd.log"
log "srun -n1 true OK ($(elapsed "${t}") s)"

log "cluster '${CLUSTER_NAME}' up in $(elapsed "${T0}") s; state in ${STATE}; config ${SYS_SLURM_ETC}/slurm.conf (also: source ${STATE}/env.sh)"
