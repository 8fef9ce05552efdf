"""The ZeRO memory benchmark (tools/benchmarks/bench_zero.py): its command line (cli), the memory model and its
projection to real scale (memory), the launcher runs (runs) and their rank program (rank), and the report."""
