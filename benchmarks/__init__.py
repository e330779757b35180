"""offloop benchmarks: offloop and its peers measured side by side in one process."""
