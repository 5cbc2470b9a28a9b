"""incar: the in-car assistant service."""
__version__ = "0.1.0"
