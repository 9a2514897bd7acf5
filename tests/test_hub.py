"""Team scale on JupyterHub: a real hub on loopback (JupyterHub, DockerSpawner and
configurable-http-proxy) spawns the default image for two users who log in through its form."""

from __future__ import annotations

import pytest

from .support.hub import Hub

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("cmd", [None, ["jupyterhub-singleuser"]],
                         ids=["spawner-default-command", "jupyterhub-singleuser"])
def test_two_users_log_in_spawn_and_keep_their_files(engine, default_images, tmp_path, cmd):
    """DockerSpawner's default (no command: the entrypoint sees the hub's variables) and the
    chart's `jupyterhub-singleuser`: each user reaches /user/NAME/lab through the hub's OAuth,
    runs a kernel, cannot reach the other's server, and finds their files after their server is
    deleted and spawned again (the home is their volume)."""
    with Hub(engine, default_images["cpu"].content_tag, tmp_path, cmd=cmd) as hub:
        sessions = {user: hub.login(user) for user in hub.users}
        for user, session in sessions.items():
            lab = hub.open_lab(session, user)
            assert "JupyterLab" in lab.text, lab.text[:500]
        alice, bob = sessions["alice"], sessions["bob"]

        kernel = hub.server_api(alice, "alice", "POST", "/kernels", json={})
        assert kernel.status_code == 201, kernel.text
        listed = hub.server_api(alice, "alice", "GET", "/kernels").json()
        assert [k["id"] for k in listed] == [kernel.json()["id"]], listed
        assert listed[0]["name"] == "python3"

        denied = bob.get(f"{hub.url}/user/alice/api/contents", timeout=60)
        assert denied.status_code == 403, (denied.status_code, denied.url)

        saved = hub.server_api(alice, "alice", "PUT", "/contents/notes.txt", json={
            "type": "file", "format": "text", "content": "kept across spawns"})
        assert saved.status_code in (200, 201), saved.text
        hub.stop_server("alice")
        hub.open_lab(alice, "alice")
        notes = hub.server_api(alice, "alice", "GET", "/contents/notes.txt").json()
        assert notes["content"] == "kept across spawns", notes
        assert "JupyterHub mode: jupyterhub-singleuser serving /user/alice/" in engine.logs(
            engine.api.inspect_container(f"{hub.prefix}-alice")["Id"])


CULL_AFTER, CULL_EVERY = 20, 5  # jupyterhub-idle-culler's --timeout and --cull-every (s)
QUIT_AFTER = 8  # the quitter's own watcher: DEVBOX_IDLE_TIMEOUT, action stop


def test_the_culler_spares_busy_servers_and_our_watcher_stops_through_the_hub(
        engine, default_images, tmp_path):
    """jupyterhub-idle-culler with a 20 s timeout: a server whose kernel is busy without output
    and one running a nohup job survive three timeouts (their watchers tell the hub's activity
    API); an idle one is culled within the timeout and the culler's interval. A server whose own
    watcher acts (action stop) asks the hub to stop it, so the hub shows it stopped at once."""
    import sys
    import time

    culler = f"""
c.JupyterHub.services.append({{"name": "idle-culler", "command": [
    {sys.executable!r}, "-m", "jupyterhub_idle_culler", "--timeout={CULL_AFTER}",
    "--cull-every={CULL_EVERY}"]}})
c.JupyterHub.load_roles.append({{"name": "idle-culler", "services": ["idle-culler"], "scopes": [
    "list:users", "read:users:activity", "read:servers", "delete:servers"]}})
c.DockerSpawner.environment = {{
    "DEVBOX_IDLE_INTERVAL": "1s", "DEVBOX_IDLE_TIMEOUT": "{QUIT_AFTER}s",
    "DEVBOX_IDLE_ACTION": lambda spawner: "stop" if spawner.user.name == "quitter" else "none"}}
"""
    users = ("busy", "nohup", "idle", "quitter")
    with Hub(engine, default_images["cpu"].content_tag, tmp_path, users=users,
             extra_config=culler) as hub:
        sessions = {user: hub.login(user) for user in users[:3]}
        for user, session in sessions.items():
            hub.open_lab(session, user)
        hub.run_silently_busy_cell(sessions["busy"], "busy")
        job = engine.api.exec_create(f"{hub.prefix}-nohup", [
            "sh", "-c", "nohup python3 -c 'while True: pass' >/dev/null 2>&1 &"], user="1000")
        engine.api.exec_start(job)
        idle_since = time.monotonic()
        quitter = hub.login("quitter")
        hub.open_lab(quitter, "quitter")
        quitter_since = time.monotonic()

        stopped: dict[str, float] = {}
        while time.monotonic() - idle_since < 3 * CULL_AFTER + CULL_EVERY:
            for user in users:
                if user not in stopped and not hub.user(user).get("servers"):
                    stopped[user] = time.monotonic()
            assert not {"busy", "nohup"} & set(stopped), (stopped, hub.logs()[-3000:])
            time.sleep(0.5)
        assert "idle" in stopped and stopped["idle"] - idle_since <= (
            CULL_AFTER + CULL_EVERY + 10), (stopped, idle_since)
        assert "quitter" in stopped, hub.logs()[-3000:]
        assert stopped["quitter"] - quitter_since < CULL_AFTER, "the culler, not the watcher"
        log = hub.logs()
        assert "DELETE /hub/api/users/quitter/server" in log, log[-3000:]
        # The busy ones' last activity at the hub is recent: their watchers reported it.
        for user in ("busy", "nohup"):
            server = hub.user(user)["servers"][""]
            assert server["last_activity"], server


def run_config(folder):
    """The generated jupyterhub_config.py, loaded as JupyterHub's config loader loads it."""
    import runpy

    from traitlets.config import Config

    config = Config()
    runpy.run_path(str(folder / "jupyterhub_config.py"), init_globals={
        "get_config": lambda: config})
    return config


def test_the_generated_config_offers_each_image_and_gives_gpu_profiles_the_gpus(tmp_path):
    from devbox_build.targets.hub import Profile, docker_settings, write_docker

    profiles = [Profile("cpu", "datascience (cpu)", "devbox/datascience:cpu-0123456789ab", False),
                Profile("gpu", "datascience (gpu)", "devbox/datascience:gpu-0123456789ab", True)]
    write_docker(tmp_path, docker_settings(profiles, "team-net", "2h", 60))
    config = run_config(tmp_path)
    spawner = config.DockerSpawner
    assert spawner.image == profiles[0].image
    assert spawner.allowed_images == {"datascience (cpu)": profiles[0].image,
                                      "datascience (gpu)": profiles[1].image}
    assert spawner.network_name == "team-net" and spawner.remove is True
    assert spawner.volumes == {"devbox-home-{username}": "/home/sagemaker-user"}
    assert spawner.environment == {"DEVBOX_IDLE_TIMEOUT": "2h", "DEVBOX_IDLE_ACTION": "stop"}
    assert "servers!server" in config.Spawner.server_token_scopes
    services = config.JupyterHub.services.get_value([])  # appended to: a lazy value
    culler = [s for s in services if s["name"] == "idle-culler"]
    assert culler and "--timeout=3600" in culler[0]["command"], services

    class Spawned:  # what the hook reads and writes on DockerSpawner
        def __init__(self, image):
            self.image, self.extra_host_config = image, {}

    cpu, gpu = Spawned(profiles[0].image), Spawned(profiles[1].image)
    for spawned in (cpu, gpu):
        config.Spawner.pre_spawn_hook(spawned)
    assert cpu.extra_host_config == {}
    assert gpu.extra_host_config == {"device_requests": [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]}
    # The docker-py form DockerSpawner hands it to: a valid device request.
    import docker

    docker.types.HostConfig(version="1.41", **gpu.extra_host_config)


def test_hub_docker_refuses_what_a_hub_cannot_start(engine, tmp_path):
    from .conftest import assert_clean_error, cli

    result = cli("hub", "docker", "debian:bookworm-slim", "--output", str(tmp_path / "out"))
    assert_clean_error(result, "debian:bookworm-slim: not built by devbox-build")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    result = cli("hub", "docker", "devbox/datascience:cpu", "--home-volume", "shared-home")
    assert_clean_error(result, "has no {username}")
    result = cli("hub", "docker", "devbox/datascience:cpu", "--idle-timeout", "soon")
    assert_clean_error(result, "'soon' is not a duration")
