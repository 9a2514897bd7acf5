"""hub: what a JupyterHub spawner (DockerSpawner, KubeSpawner) requires of the image.

The container starts as a spawner starts it: no command, the JUPYTERHUB_* variables of a user's
server, and a hub API to report to (a stand-in on this host that answers the version and the
activity calls, as the hub does). tests/test_hub.py runs the same image under a real hub.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading

import pytest

from devbox_build.checks.image import IDE_PORT, running
from devbox_build.runtime import contract

USER = "check"
PREFIX = f"/user/{USER}/"
HUB_HOST = "https://hub.example.com"


class _HubApi(http.server.BaseHTTPRequestHandler):
    """The hub's REST API as a server meets it: its version, and the activity it reports."""

    version = "5.5.0"
    activity: list = []

    def do_GET(self):
        self._answer(200, {"version": self.version})

    def do_POST(self):
        self.activity.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self._answer(200, {})

    def _answer(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub_server(image):
    if "jupyterhub" not in image.pip_packages:
        pytest.fail(f"{image.ref} has no jupyterhub: a hub's spawner starts "
                    f"{contract.HUB_SERVER}, which it provides (add jupyterhub, the hub's major "
                    "version, to the image's pip requirements)", pytrace=False)
    _HubApi.version = image.pip_packages["jupyterhub"]
    api = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _HubApi)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    environment = {
        "JUPYTERHUB_API_TOKEN": "check-token", "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{USER}",
        "JUPYTERHUB_API_URL": f"http://host.docker.internal:{api.server_address[1]}/hub/api",
        "JUPYTERHUB_ACTIVITY_URL": f"http://host.docker.internal:{api.server_address[1]}"
                                   f"/hub/api/users/{USER}/activity",
        "JUPYTERHUB_USER": USER, "JUPYTERHUB_SERVER_NAME": "", "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_HOST": HUB_HOST, "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
        "JUPYTERHUB_SERVICE_URL": f"http://0.0.0.0:{IDE_PORT}{PREFIX}",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{PREFIX}oauth_callback",
    }
    try:
        with running(image, environment=environment, publish=[IDE_PORT],
                     extra_hosts={"host.docker.internal": "host-gateway"}) as container:
            yield container
    finally:
        api.shutdown()


def _raw_get(container, path: str) -> tuple[int, str]:
    """One GET, redirects not followed (a browser's first request)."""
    port = container.engine.published_port(container.id, IDE_PORT)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Location") or ""
    finally:
        connection.close()


def test_hub_server_answers_under_the_users_prefix(hub_server):
    """started as a spawner starts it (no command), the server answers /user/NAME/api"""
    status, body = hub_server.get(f"{PREFIX}api")
    assert status == 200, f"{PREFIX}api answered {status}: {body[:300]}\n{hub_server.logs()[-2000:]}"
    assert "version" in json.loads(body)


def test_hub_login_goes_through_the_hubs_oauth(hub_server):
    """a browser without the server's cookie is sent to the hub's OAuth authorize page"""
    hub_server.get(f"{PREFIX}api")  # up
    status, location = _raw_get(hub_server, f"{PREFIX}lab")
    assert status == 302, f"{PREFIX}lab answered {status}, not a redirect to the hub's login"
    assert location.startswith(f"{HUB_HOST}/hub/api/oauth2/authorize?"), location
    assert f"client_id=jupyterhub-user-{USER}" in location, location


def test_hub_mode_serves_nothing_at_the_laptop_url(hub_server):
    """nothing is served at / (laptop JupyterLab there would look up to the hub and 404 for
    the user)"""
    hub_server.get(f"{PREFIX}api")  # up
    status, _ = _raw_get(hub_server, "/lab")
    assert status == 404, f"/lab answered {status} under a hub"


def test_hub_server_reports_to_the_hub(hub_server):
    """the entrypoint ran jupyterhub-singleuser, which checked in with the hub's API"""
    logs = hub_server.logs()
    assert f"JupyterHub mode: {contract.HUB_SERVER} serving {PREFIX}" in logs, logs[-2000:]
    assert "Failed to connect to my Hub" not in logs, logs[-2000:]
