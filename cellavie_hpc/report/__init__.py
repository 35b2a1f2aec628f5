"""Reports: collect per-rank records, scaling efficiency, bottlenecks, calibration, plots and tables."""
