"""This host's extra CA certificates, for every command that reaches the network.

A TLS-intercepting network (a corporate proxy, this project's CI) signs with a CA the host adds
to its own store (Debian/Ubuntu: /usr/local/share/ca-certificates; RHEL: /etc/pki/ca-trust).
`build` copies them into the image; `lock`'s resolver (uv, whose own roots do not include them)
gets a bundle of the usual roots plus these, so the same commands work behind the same proxy.
"""

from __future__ import annotations

import glob
import os
import ssl
from pathlib import Path

# Where hosts keep the CA certificates they add to the system's (Debian/Ubuntu, RHEL family).
HOST_CA_GLOBS = (
    "/usr/local/share/ca-certificates/*.crt",
    "/usr/local/share/ca-certificates/*/*.crt",
    "/etc/pki/ca-trust/source/anchors/*.crt",
    "/etc/pki/ca-trust/source/anchors/*.pem",
)


def host_ca_certificates() -> list[str]:
    """This host's extra CA certificates, the ones its own tools trust beyond the defaults."""
    return sorted({path for pattern in HOST_CA_GLOBS for path in glob.glob(pattern)})


def _default_roots() -> bytes:
    """The roots a resolver trusts without help: the user's SSL_CERT_FILE, else the system's
    bundle, else certifi's."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if candidate and os.path.isfile(candidate):
            return Path(candidate).read_bytes()
    try:
        import certifi
    except ImportError:
        return b""
    return Path(certifi.where()).read_bytes()


def ca_bundle() -> bytes | None:
    """The default roots plus this host's extra CAs, as one PEM bundle; None when the host adds
    none (the defaults serve)."""
    extra = host_ca_certificates()
    if not extra:
        return None
    bundle = _default_roots()
    for path in extra:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if data.strip() and data.strip() not in bundle:
            bundle += b"\n" + data.strip() + b"\n"
    return bundle


def resolver_environment(scratch: Path, environ=os.environ) -> dict[str, str]:
    """``environ`` for a resolver subprocess: with SSL_CERT_FILE naming a bundle (written in
    ``scratch``) of the default roots and this host's extra CAs, when the host has any."""
    environment = dict(environ)
    bundle = ca_bundle()
    if bundle is None:
        return environment
    target = scratch / "ca-bundle.pem"
    target.write_bytes(bundle)
    environment["SSL_CERT_FILE"] = str(target)
    return environment
