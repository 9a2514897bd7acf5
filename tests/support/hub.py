"""A real JupyterHub on loopback: JupyterHub with DockerSpawner and configurable-http-proxy
(npm, in .devbox/node), spawning the image into a Docker network of the test's own; users log in
through the hub's login form as a browser does.

Every name it makes (network, containers, home volumes) starts with the hub's prefix, and all
are removed on exit.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from .wait import until

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / ".devbox" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Hub:
    def __init__(self, engine, image: str | list[str], folder: Path,
                 cmd: list[str] | None = None, users=("alice", "bob"), extra_config: str = "",
                 options=()) -> None:
        """``image``: the image, or the images a user picks from (the first is the default)."""
        self.images = [image] if isinstance(image, str) else list(image)
        self.engine, self.folder, self.cmd = engine, folder, cmd
        self.users, self.extra_config, self.options = users, extra_config, list(options)
        self.prefix = f"hub{uuid.uuid4().hex[:8]}"
        self.port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(24)  # a service with admin scopes: the test's own
        self.password = secrets.token_hex(8)

    def __enter__(self) -> Hub:
        if not PROXY.exists():
            raise RuntimeError(f"{PROXY} is missing (scripts/provision.sh installs it)")
        network = self.engine.api.create_network(self.prefix, driver="bridge")
        self.network_id = network["Id"]
        gateway = self.engine.api.inspect_network(self.network_id)["IPAM"]["Config"][0]["Gateway"]
        # What a team's hub gets from devbox-build, included by the hub's own configuration
        # (here: the test's login, database, proxy, and its admin service).
        generated = subprocess.run(
            [sys.executable, "-m", "devbox_build.cli", "hub", "docker", *self.images,
             "--output", str(self.folder / "devbox"), "--network", self.prefix,
             "--home-volume", f"{self.prefix}-home-{{username}}", *self.options],
            capture_output=True, text=True, check=False)
        if generated.returncode != 0:
            raise RuntimeError(f"devbox-build hub docker: {generated.stderr}")
        config = self.folder / "jupyterhub_config.py"
        config.write_text(f"""
c = get_config()  # noqa
load_subconfig({str(self.folder / "devbox" / "jupyterhub_config.py")!r})  # noqa
c.JupyterHub.bind_url = {self.url!r}
c.JupyterHub.hub_bind_url = c.JupyterHub.hub_connect_url = "http://{gateway}:{self.api_port}"
c.JupyterHub.db_url = "sqlite:///{self.folder}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{self.folder}/cookie_secret"
c.JupyterHub.pid_file = "{self.folder}/hub.pid"
c.ConfigurableHTTPProxy.command = [{str(PROXY)!r}]
c.ConfigurableHTTPProxy.pid_file = "{self.folder}/proxy.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {self.password!r}
c.Authenticator.allowed_users = {set(self.users)!r}
c.JupyterHub.services.append({{"name": "test", "api_token": {self.token!r}}})
c.JupyterHub.load_roles.append({{"name": "test-admin", "services": ["test"],
                                 "scopes": ["admin:users", "admin:servers"]}})
c.DockerSpawner.cmd = {self.cmd!r}
c.DockerSpawner.name_template = "{self.prefix}-{{username}}"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 120
{self.extra_config}
""")
        env = {**os.environ, "NO_PROXY": f"127.0.0.1,localhost,{gateway}",
               "no_proxy": f"127.0.0.1,localhost,{gateway}"}
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(name, None)
        self.log = open(self.folder / "hub.log", "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(config)],
            cwd=self.folder, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        until(lambda: requests.get(f"{self.url}/hub/api", timeout=2).ok, timeout=90,
              alive=lambda: self.process.poll() is None,
              what=lambda: f"the hub did not start:\n{self.logs()[-3000:]}")
        return self

    def logs(self) -> str:
        self.log.flush()
        return (self.folder / "hub.log").read_text(errors="replace")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.url}/hub/api{path}", timeout=60, headers={
            "Authorization": f"token {self.token}"}, **kwargs)

    def login(self, user: str) -> requests.Session:
        """The login form, as a browser fills it in; the session's cookies are the user's."""
        session = requests.Session()
        session.trust_env = False
        page = session.get(f"{self.url}/hub/login", timeout=60)
        xsrf = session.cookies.get("_xsrf") or re.search(
            r'name="_xsrf" value="([^"]+)"', page.text).group(1)
        answer = session.post(f"{self.url}/hub/login?next=", timeout=60, data={
            "username": user, "password": self.password, "_xsrf": xsrf}, allow_redirects=False)
        assert answer.status_code == 302, (answer.status_code, answer.text[:500])
        return session

    def spawn(self, session: requests.Session, user: str, profile: str | None = None) -> None:
        """Ask for the user's server as the spawn page does: a GET, or the picker's form."""
        if profile is None:
            session.get(f"{self.url}/hub/spawn/{user}", timeout=120)
            return
        form = session.get(f"{self.url}/hub/spawn/{user}", timeout=120)
        assert f'value="{profile}"' in form.text, form.text[:2000]
        xsrf = session.cookies.get("_xsrf", path="/hub/") or session.cookies.get("_xsrf")
        session.post(f"{self.url}/hub/spawn/{user}", data={"image": profile, "_xsrf": xsrf},
                     timeout=120)

    def open_lab(self, session: requests.Session, user: str, timeout: float = 240,
                 profile: str | None = None) -> requests.Response:
        """Spawn the user's server (the hub's spawn page, with the picker's ``profile``) and
        follow OAuth to /user/NAME/lab."""
        self.spawn(session, user, profile)

        def lab() -> requests.Response | None:
            answer = session.get(f"{self.url}/user/{user}/lab", timeout=60)
            return answer if answer.ok and answer.url.endswith(f"/user/{user}/lab") else None

        return until(lab, timeout=timeout, every=0.5,
                     what=lambda: f"/user/{user}/lab never answered:\n{self.logs()[-3000:]}")

    def server_api(self, session: requests.Session, user: str, method: str, path: str,
                   **kwargs) -> requests.Response:
        """A call to the user's server as JupyterLab makes it: cookies, and the _xsrf cookie
        sent back as X-XSRFToken."""
        xsrf = session.cookies.get("_xsrf", path=f"/user/{user}/") or session.cookies.get(
            "_xsrf")
        return session.request(method, f"{self.url}/user/{user}/api{path}", timeout=60,
                               headers={"X-XSRFToken": xsrf or ""}, **kwargs)

    def run_silently_busy_cell(self, session: requests.Session, user: str) -> str:
        """A kernel, and a cell that runs without output until the container ends; the browser
        tab then closes (the websocket). Returns the kernel's id."""
        import json

        import websocket

        from .jupyter import execute_request

        kernel = self.server_api(session, user, "POST", "/kernels", json={}).json()["id"]
        xsrf = session.cookies.get("_xsrf", path=f"/user/{user}/") or ""
        cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
        channel = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/user/{user}/api/kernels/{kernel}/channels?_xsrf={xsrf}",
            cookie=cookie, timeout=120, http_proxy_host=None, http_no_proxy=["127.0.0.1"])
        try:
            msg_id, frame = execute_request("import time; time.sleep(10 ** 6)")
            channel.send(frame)
            while True:  # until the kernel says it is busy with the cell
                message = json.loads(channel.recv())
                if (message.get("parent_header", {}).get("msg_id") == msg_id
                        and message["msg_type"] == "status"
                        and message["content"]["execution_state"] == "busy"):
                    return kernel
        finally:
            channel.close()

    def stop_server(self, user: str) -> None:
        answer = self.api("DELETE", f"/users/{user}/server")
        assert answer.status_code in (202, 204), answer.text
        until(lambda: not self.user(user).get("servers"), timeout=120,
              what=f"{user}'s server did not stop")

    def user(self, name: str) -> dict:
        return self.api("GET", f"/users/{name}").json()

    def __exit__(self, *_exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        for pid_file in ("proxy.pid",):
            try:
                os.kill(int((self.folder / pid_file).read_text().strip()), 15)
            except (OSError, ValueError):
                pass
        api = self.engine.api
        for container in api.containers(all=True, filters={"name": self.prefix}):
            self.engine.remove(container["Id"])
        for volume in (api.volumes(filters={"name": self.prefix}) or {}).get("Volumes") or []:
            api.remove_volume(volume["Name"], force=True)
        api.remove_network(self.network_id)


def activity(hub: Hub, user: str) -> str | None:
    return hub.user(user).get("last_activity")
