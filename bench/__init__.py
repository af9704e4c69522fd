"""clip benchmarks: `python -m bench` runs the snapshotter comparison (see docs/benchmarks.md)."""
