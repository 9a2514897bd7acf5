"""Private conda channels: where their credentials come from, and fetching their packages.

A committed conda lock holds bare channel URLs (conda.strip_credentials). The credentials live on
the developer's or CI's machine, in the places rattler (and so pixi) reads them:

* ``$RATTLER_AUTH_FILE``, else ``~/.rattler/credentials.json``: ``{"host": {"BasicHTTP":
  {"username": ..., "password": ...}}}``, ``{"host": {"BearerToken": ...}}`` or ``{"host":
  {"CondaToken": ...}}`` (a ``*.example.com`` key covers its subdomains);
* a netrc file, ``$NETRC`` else ``~/.netrc``: ``machine HOST login USER password PASSWORD``.

``lock`` solves with rattler's authenticated client, which reads the same places. ``build`` never
hands a credential to the engine: the classic builder has no secret mounts, and a build arg or
an environment variable would stay in the image's history or its layers. Instead the packages a
credential covers are fetched here, on the host, checked against the lock's sha256, kept in a
cache (``$XDG_CACHE_HOME/devbox-build/conda-packages``) and sent in the build context to a
throwaway build stage; only the installed files reach the image (dockerfile/Dockerfile.j2).
"""

from __future__ import annotations

import base64
import hashlib
import json
import netrc
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from . import cache, credentials
from .errors import BuildFailed, InputError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Credential:
    """How to authenticate to one host; ``source`` says where it was found (never its value)."""

    source: str
    kind: str  # "basic", "bearer" or "conda-token"
    username: str = ""
    secret: str = field(default="", repr=False)  # never in a repr, a traceback or a log

    def request(self, url: str) -> tuple[str, dict[str, str]]:
        """The URL to fetch and the headers to send."""
        if self.kind == "conda-token":  # anaconda.org-style: https://host/t/<token>/channel/...
            parts = urlsplit(url)
            return urlunsplit(parts._replace(path=f"/t/{self.secret}{parts.path}")), {}
        if self.kind == "bearer":
            return url, {"Authorization": f"Bearer {self.secret}"}
        token = base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()
        return url, {"Authorization": f"Basic {token}"}


def auth_file() -> Path:
    return Path(os.environ.get("RATTLER_AUTH_FILE") or Path.home() / ".rattler" / "credentials.json")


def netrc_file() -> Path:
    return Path(os.environ.get("NETRC") or Path.home() / ".netrc")


def credential_for(url: str) -> Credential | None:
    """The credential this machine holds for ``url``'s host: the auth file first, then netrc."""
    host = (urlsplit(url).hostname or "").lower()
    if not host:
        return None
    return _from_auth_file(host) or _from_netrc(host)


def _from_auth_file(host: str) -> Credential | None:
    path = auth_file()
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable credentials file: {exc}") from None
    labels = host.split(".")
    # The host itself, then *.parent, *.grandparent, ... (rattler's own order).
    for key in [host] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]:
        entry = entries.get(key) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and len(entry) == 1:
            (kind, value), = entry.items()
            where = f"{path} (entry {key!r})"
            if kind == "BasicHTTP" and isinstance(value, dict):
                return Credential(where, "basic", str(value.get("username", "")),
                                  str(value.get("password", "")))
            if kind == "BearerToken" and isinstance(value, str):
                return Credential(where, "bearer", secret=value)
            if kind == "CondaToken" and isinstance(value, str):
                return Credential(where, "conda-token", secret=value)
            raise InputError(f"{where}: expected BasicHTTP, BearerToken or CondaToken")
    return None


def _from_netrc(host: str) -> Credential | None:
    path = netrc_file()
    if not path.is_file():
        return None
    try:
        found = netrc.netrc(str(path)).authenticators(host)
    except netrc.NetrcParseError as exc:  # its message may quote a password: only the line
        raise InputError(f"{path}: not a readable netrc file (line {exc.lineno})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror}") from None
    if found is None:
        return None
    login, _, password = found
    return Credential(f"{path} (machine {host})", "basic", login or "", password or "")


def fetch(url: str, sha256: str, credential: Credential) -> Path:
    """The package at ``url``, from the cache or fetched with ``credential``; its sha256 is
    checked before it is kept. Errors name the package and where the credential came from."""
    import requests

    name = url.rsplit("/", 1)[-1]
    target = cache.folder("conda-packages") / sha256 / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    request_url, headers = credential.request(url)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{name}.", delete=False) as out:
        try:
            try:
                with requests.get(request_url, headers=headers, stream=True, timeout=60) as reply:
                    if reply.status_code in (401, 403):
                        raise BuildFailed(
                            f"fetching {url}: the channel refused the credentials from "
                            f"{credential.source} (HTTP {reply.status_code})",
                            hint="correct or renew them there; they never enter the image")
                    reply.raise_for_status()
                    for chunk in reply.iter_content(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except requests.RequestException as exc:
                # The message may hold the request URL, which holds a conda token.
                raise BuildFailed(f"fetching {url}: {credentials.mask(str(exc))}") from None
            if digest.hexdigest() != sha256:
                raise BuildFailed(f"fetching {url}: its sha256 is {digest.hexdigest()}, the lock "
                                  f"says {sha256}; the channel's package changed since it was "
                                  "locked (or the download was tampered with)")
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, target)
    return target
