"""Data preparation, benchmarks and the tools they share with the tests (benchlib.py); run the
scripts as files (`python scripts/bench_ep.py`). Not part of the installed package."""
