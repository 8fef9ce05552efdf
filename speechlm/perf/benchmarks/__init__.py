"""The benchmarks behind tools/benchmarks/bench_*.py, one module each (aligners, compression, connector, encoder,
encoder_adapt, fusion, inference, mam, partition, quality, training); their shared harness is speechlm.perf.bench."""
