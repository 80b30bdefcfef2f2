"""The NexMDM device simulator and load test (see simulator/README.md)."""
