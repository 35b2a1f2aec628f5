#!/usr/bin/env bash
# Show the dev cluster's daemons, nodes, queue and accounting.
# Exit status 0 when every daemon runs and the node is usable, 1 otherwise.
set -euo pipefail

# shellcheck source=cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

export SLURM_CONF="${ETC}/slurm.conf"
ok=1

echo "== daemons (state dir ${STATE})"
for name in "${DAEMONS[@]}"; do
    if pid="$(daemon_pid "${name}")"; then
        printf '  %-10s running  pid %s\n' "${name}" "${pid}"
    else
        printf '  %-10s STOPPED\n' "${name}"
        ok=0
    fi
done

if [[ ! -r "${SLURM_CONF}" ]] || ! command -v sinfo >/dev/null; then
    echo "cluster not set up: run 'make cluster-up'"
    exit 1
fi

if daemon_pid slurmctld >/dev/null; then
    echo "== sinfo"
    timeout 10 sinfo -N -o '%N %P %T %c %m %G %E' || ok=0
    state="$(timeout 10 sinfo -h -n "${HOST}" -o '%T' 2>/dev/null | head -n1 || true)"
    case "${state}" in idle | mixed | allocated | completing) ;; *) ok=0 ;; esac
    echo "== squeue"
    timeout 10 squeue || ok=0
fi
if daemon_pid slurmdbd >/dev/null; then
    echo "== sacctmgr"
    timeout 10 sacctmgr -n show cluster format=cluster,controlhost,controlport || ok=0
    timeout 10 sacctmgr -n show assoc format=cluster,account,user tree || ok=0
    echo "== recent jobs (sacct, last hour)"
    timeout 10 sacct -a -X -S now-1hour -o jobid,jobname%20,user,state,exitcode,elapsed | tail -n 12 || ok=0
fi

if [[ "${ok}" == 1 ]]; then
    echo "cluster OK (client config: ${SYS_SLURM_ETC}/slurm.conf)"
else
    echo "cluster NOT fully up: run 'make cluster-up' (logs in ${LOG})"
    exit 1
fi
