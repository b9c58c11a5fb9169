"""Local devnet, demos and benchmarks."""
