"""The role of the caller of an RPC being served, for handlers that decide by it (the Assistant's tools).

The auth interceptor has already let the call in; this asks the same authenticator who it is (certificate,
bearer token or the loopback role), so tools follow the same identities and roles as the RPCs themselves.
"""
from __future__ import annotations

from collections.abc import Callable

from service.security.auth import Authenticator
from service.security.integration import security_of

LEAST_PRIVILEGED = "hmi"


def role_resolver(app_config) -> Callable[[object], str]:
    auth = Authenticator(security_of(app_config))

    def role_of(context) -> str:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        identity, _why = auth.identify(context, metadata)
        return identity.role if identity is not None else LEAST_PRIVILEGED
    return role_of
