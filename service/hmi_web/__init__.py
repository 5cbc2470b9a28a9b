"""The web HMI: a page and the gateway it talks to (a gRPC client of the service)."""
