"""Throughput benchmarks of jaxdl against PyTorch (see benchmarks/README.md)."""
