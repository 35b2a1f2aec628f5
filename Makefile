# cellavie-hpc: every target a researcher types on a login node or a laptop.
# Variables: SWEEP (sweep file), SCALE (a `scales:` entry of it, e.g. smoke), CLUSTER (slurm|local|auto),
# OUT (sweep folder), RESULTS, REPORT.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CELLAVIE := $(VENV)/bin/cellavie
SWEEP ?= jobs/scaling.yaml
SCALE ?=
CLUSTER ?= slurm
OUT ?= sweeps/$(basename $(notdir $(SWEEP)))
RESULTS ?= $(OUT)/results
REPORT ?= $(OUT)/report

.PHONY: help install test test-fast demo submit-scaling sweep-status collect report bench benchmarks \
        cluster-up cluster-down cluster-status clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

STAMP := $(VENV)/.cellavie-installed

install:  ## create .venv and install the package, its test extras and Horovod (cached wheel)
	bash tools/install.sh
	touch "$(STAMP)"

# demo and test install first on a fresh clone, so that the README's two commands are all a user types.
$(STAMP): setup.cfg tools/install.sh tools/build_horovod.sh
	bash tools/install.sh
	touch "$(STAMP)"

test: $(STAMP)  ## run the whole test suite (Slurm/Horovod tests skip unless available; CI requires them)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)  ## tests that need neither Slurm nor Horovod
	$(PY) -m pytest -q -m "not slurm and not horovod and not slow"

demo: $(STAMP)  ## the embedded default end to end on this machine: synthetic data, local sweep, report
	$(CELLAVIE) demo --out demo

submit-scaling:  ## submit SWEEP (at SCALE) to CLUSTER into OUT; returns once queued
	$(CELLAVIE) sweep submit "$(SWEEP)" --cluster "$(CLUSTER)" --out "$(OUT)" $(if $(SCALE),--scale "$(SCALE)")

sweep-status:  ## pending / running / done / failed per point of OUT
	$(CELLAVIE) sweep status "$(OUT)"

collect:  ## gather the records of OUT into RESULTS
	$(CELLAVIE) collect "$(OUT)" --out "$(RESULTS)"

report:  ## tables, plots, LaTeX and HTML from RESULTS into REPORT
	$(CELLAVIE) report "$(RESULTS)" --out "$(REPORT)"

bench:  ## single-device methodology (jobs/single_gpu.yaml) on this machine
	$(CELLAVIE) bench --out bench

benchmarks:  ## every benchmark script, each printing its table
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) "$$b" || exit 1; done

cluster-up:  ## start the one-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd); idempotent
	bash cluster/up.sh

cluster-down:  ## stop every daemon cluster-up started
	bash cluster/down.sh

cluster-status:  ## sinfo and daemon status of the one-node Slurm
	bash cluster/status.sh

clean:  ## remove build leftovers (never .venv, data or results)
	rm -rf build dist *.egg-info .pytest_cache
