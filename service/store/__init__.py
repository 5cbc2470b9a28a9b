"""Durable state: one SQLite database (WAL) under the data directory, versioned migrations per owner."""
