"""The container's HEALTHCHECK: ``python -m nidaan.server.healthcheck [PORT]``.

Exit 0 when ``/healthz`` on this host answers 200, over plain HTTP or, with ``http.tls`` on,
over HTTPS (``/healthz`` and ``/readyz`` need no client certificate and no token, see
:mod:`nidaan.server.status`); exit 1 otherwise. The port is the argument, else
``NIDAAN_HTTP_PORT``, else 8080. Only the standard library: it runs once every 30 s.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence


def healthy(port: int, timeout: float = 4.0) -> bool:
    """Whether the node on 127.0.0.1:``port`` says it serves (HTTP, then HTTPS)."""
    # Its own certificate is not checked: this is the node asking itself over loopback.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    for scheme in ("http", "https"):
        try:
            url = f"{scheme}://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=timeout, context=insecure) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError:  # it answered: 503, not serving
            return False
        except (OSError, ValueError):  # nothing there, or not this scheme: try the other
            continue
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    port = int(args[0] if args else os.environ.get("NIDAAN_HTTP_PORT", "8080"))
    return 0 if healthy(port) else 1


if __name__ == "__main__":
    sys.exit(main())
