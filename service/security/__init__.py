"""Transport security (TLS / mutual TLS), client identities and roles, and the development CA."""
