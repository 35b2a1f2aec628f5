#!/usr/bin/env bash
# Stop every daemon cluster/up.sh started (slurmd, slurmctld, slurmdbd, MariaDB,
# munged) and make sure none is left running.  State (accounting DB, job ids,
# munge key) is kept in ${CELLAVIE_CLUSTER_DIR:-/var/tmp/cellavie-cluster}.
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0="$(now)"
export SLURM_CONF="${ETC}/slurm.conf"

# Cancel jobs first, so that their steps do not outlive slurmd.
if daemon_pid slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs="$(timeout 10 squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING -o '%i' 2>/dev/null || true)"
    if [[ -n "${jobs}" ]]; then
        log "cancelling jobs: $(echo ${jobs})"
        # shellcheck disable=SC2086
        timeout 10 scancel ${jobs} 2>/dev/null || true
        for _ in $(seq 1 25); do
            [[ -z "$(timeout 5 squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING -o '%i' 2>/dev/null || true)" ]] && break
            sleep 0.2
        done
    fi
fi

stop() {  # stop NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local name="$1" pid
    if ! pid="$(daemon_pid "${name}")"; then
        rm -f "$(pidfile_of "${name}")"
        return 0
    fi
    kill -TERM "${pid}" 2>/dev/null || true
    for _ in $(seq 1 75); do
        alive "${pid}" || break
        sleep 0.2
    done
    if alive "${pid}"; then
        log "${name} (pid ${pid}) ignored SIGTERM for 15 s; killing"
        kill -KILL "${pid}" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$(pidfile_of "${name}")"
    log "stopped ${name} (pid ${pid})"
}

# Reverse start order.
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop "${DAEMONS[i]}"
done

# Stragglers: any process of ours (daemon or slurmstepd mentioning the state dir).
left="$(our_pids)"
if [[ -n "${left}" ]]; then
    log "terminating stragglers: $(echo ${left})"
    # shellcheck disable=SC2086
    kill -TERM ${left} 2>/dev/null || true
    for _ in $(seq 1 25); do
        [[ -z "$(our_pids)" ]] && break
        sleep 0.2
    done
    left="$(our_pids)"
    if [[ -n "${left}" ]]; then
        log "kill -9 $(echo ${left})"
        # shellcheck disable=SC2086
        kill -KILL ${left} 2>/dev/null || true
        sleep 0.5
    fi
fi
rm -f "${MUNGE_SOCKET}" "${MUNGE_SOCKET}.lock" "${DB_SOCKET}"

left="$(our_pids)"
if [[ -n "${left}" ]]; then
    ps -o pid,comm,args -p "$(echo ${left} | tr ' ' ',')" >&2 || true
    die "processes still running after down"
fi
log "cluster down ($(elapsed "${T0}") s); state kept in ${STATE}"
