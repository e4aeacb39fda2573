"""HTTP with servers this process starts on 127.0.0.1 (the served-model check's, the flow's temporary Prefect API).

Imports nothing but the standard library: the flow uses it before its heavy modules import.
"""

from __future__ import annotations

import socket
import urllib.request


def free_port() -> int:
    """A port of 127.0.0.1 free now; another program could take it before a server binds it, which then fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def direct_opener() -> urllib.request.OpenerDirector:
    """An opener that never goes through an HTTP(S)_PROXY: the server is on this machine."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))
