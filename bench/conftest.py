"""A speedup and GB/s table for the C++ vs numpy benchmarks, printed after pytest-benchmark's own tables."""
from collections import defaultdict

import pytest

_medians = defaultdict(dict)  # group -> {impl: (median seconds, bytes read + written per call)}


@pytest.fixture
def record_throughput(benchmark):
    """After a benchmark ran, record(impl, n_bytes) adds its median time to the summary of its group."""

    def record(impl: str, n_bytes: int):
        if benchmark.stats is not None:  # None under --benchmark-disable
            _medians[benchmark.group][impl] = (benchmark.stats.stats.median, n_bytes)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    terminalreporter.section("C++ vs numpy, same run (median time; GB/s = bytes read + written per second)")
    for group, runs in _medians.items():
        cells = "  ".join(f"{impl} {t * 1e3:9.2f} ms {n / t / 1e9:6.2f} GB/s" for impl, (t, n) in runs.items())
        speedup = f"  speedup {runs['numpy'][0] / runs['cpp'][0]:6.1f}x" if {"cpp", "numpy"} <= runs.keys() else ""
        terminalreporter.write_line(f"{group:<32} {cells}{speedup}")
