"""The server's side of JupyterHub: what a spawner tells it (the JUPYTERHUB_* variables) and the
two calls the idle watcher makes to the hub with the server's own token.

    report(last_active)  the hub's activity API: the server was active then. jupyterhub-idle-
                         culler reads the hub's last_activity, so a server whose kernel is busy
                         without output, or that runs a nohup job, is not culled while the
                         watcher sees the work
    stop()               the hub's API deletes this server: the hub knows at once (no "server
                         stopped unexpectedly"), and the spawner removes the container as it
                         would for the user's own Stop

Loopback or not, the hub is reached directly, never through HTTP_PROXY.
"""

from __future__ import annotations

import datetime
import json
import os
import urllib.error
import urllib.request

from .log import Messages

say = Messages("devbox-idle")


def in_hub(environ=os.environ) -> bool:
    return bool(environ.get("JUPYTERHUB_API_TOKEN") and environ.get("JUPYTERHUB_SERVICE_PREFIX"))


class Hub:
    def __init__(self, environ=os.environ) -> None:
        self.token = environ["JUPYTERHUB_API_TOKEN"]
        self.api = environ.get("JUPYTERHUB_API_URL", "").rstrip("/")
        self.user = environ.get("JUPYTERHUB_USER", "")
        self.server = environ.get("JUPYTERHUB_SERVER_NAME", "")
        self.activity_url = environ.get("JUPYTERHUB_ACTIVITY_URL") or (
            f"{self.api}/users/{self.user}/activity")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.reported: float | None = None

    @classmethod
    def from_environment(cls, environ=os.environ) -> Hub | None:
        return cls(environ) if in_hub(environ) and environ.get("JUPYTERHUB_API_URL") else None

    def _call(self, method: str, url: str, body: dict | None = None) -> int:
        request = urllib.request.Request(
            url, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def report(self, last_active: float) -> bool:
        when = datetime.datetime.fromtimestamp(last_active, datetime.timezone.utc).isoformat(
            timespec="seconds").replace("+00:00", "Z")
        status = self._call("POST", self.activity_url, {
            "servers": {self.server: {"last_activity": when}}, "last_activity": when})
        if status in (200, 204):
            self.reported = last_active
            return True
        say(f"the hub refused this server's activity ({status or 'no answer'}) at "
            f"{self.activity_url}")
        return False

    def stop(self) -> bool:
        path = f"/users/{self.user}/servers/{self.server}" if self.server else (
            f"/users/{self.user}/server")
        status = self._call("DELETE", f"{self.api}{path}")
        if status in (202, 204):
            say(f"asked the hub to stop this server (DELETE {path}: {status})")
            return True
        say(f"the hub did not stop this server (DELETE {path}: {status or 'no answer'}; the "
            "hub's Spawner.server_token_scopes needs servers!server): stopping the container")
        return False
