"""Benchmark harness for Simple OCI Registry (issue 4): ours against nginx and CNCF distribution.

Run ``python -m bench`` (full, a few minutes), ``python -m bench --quick`` (CI-sized smoke) or
``python -m bench --tiny`` (seconds; what ``tests/test_bench.py`` runs). Loopback only.
"""
