# Shared settings and helpers for cluster/{up,down,status}.sh.  Sourced, not run.
# shellcheck shell=bash

CLUSTER_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${CELLAVIE_CLUSTER_DIR:-/var/tmp/cellavie-cluster}"
CLUSTER_NAME="${CELLAVIE_CLUSTER_NAME:-cellavie}"
CLUSTER_ACCOUNT="${CELLAVIE_CLUSTER_ACCOUNT:-cellavie}"
HOST="localhost"
# Non-default ports so that a system Slurm/MariaDB (6817-6819, 3306) cannot clash.
CTLD_PORT="${CELLAVIE_SLURMCTLD_PORT:-6917}"
SLURMD_PORT="${CELLAVIE_SLURMD_PORT:-6918}"
DBD_PORT="${CELLAVIE_SLURMDBD_PORT:-6919}"
DB_PORT="${CELLAVIE_MARIADB_PORT:-3307}"
# Declared node size (more than the hardware; allowed by config_overrides).
NODE_CPUS="${CELLAVIE_CLUSTER_CPUS:-8}"
NODE_MEM_MB="${CELLAVIE_CLUSTER_MEM_MB:-16384}"
NODE_GPUS=4
# Where Slurm clients look when SLURM_CONF is unset (Debian default).
SYS_SLURM_ETC="${CELLAVIE_SYS_SLURM_ETC:-/etc/slurm}"

ETC="${STATE}/etc"
RUN="${STATE}/run"
LOG="${STATE}/log"
MUNGE_DIR="${STATE}/munge"
MUNGE_SOCKET_DIR="${MUNGE_DIR}/socket"
MUNGE_SOCKET="${MUNGE_SOCKET_DIR}/munge.socket.2"
DB_DIR="${STATE}/mariadb"
DB_DATA="${DB_DIR}/data"
DB_SOCKET="${DB_DIR}/mysqld.sock"

# Daemons in start order; pid file for each.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
pidfile_of() { printf '%s/%s.pid' "${RUN}" "$1"; }

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# True if process $1 exists and is not a zombie (PID 1 here may reap late).
alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true)"
    [[ -n "${st}" && "${st}" != "Z" && "${st}" != "X" ]]
}

# Print the pid of daemon $1 if its pid file names a live process whose command
# is that daemon; exit status 1 otherwise.
daemon_pid() {
    local name="$1" pf pid comm
    pf="$(pidfile_of "${name}")"
    [[ -s "${pf}" ]] || return 1
    pid="$(tr -dc '0-9' <"${pf}")"
    [[ -n "${pid}" ]] || return 1
    alive "${pid}" || return 1
    comm="$(cat "/proc/${pid}/comm" 2>/dev/null || true)"
    [[ "${comm}" == "${name}"* ]] || return 1
    printf '%s\n' "${pid}"
}

# Pids of daemon processes that belong to this cluster: one of our daemon
# names (or slurmstepd) whose command line or environment mentions the state dir.
our_pids() {
    local pid
    for pid in $(pgrep -x 'munged|mariadbd|slurmdbd|slurmctld|slurmd|slurmstepd' 2>/dev/null || true); do
        if grep -qaF -- "${STATE}/" "/proc/${pid}/cmdline" "/proc/${pid}/environ" 2>/dev/null; then
            printf '%s\n' "${pid}"
        fi
    done
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
