"""The inference runtime: execution-provider backends, the generation engine and the NPU scheduler."""
