"""JupyterHub with DockerSpawner for the team's devbox images, written by `devbox-build hub
docker`. The settings are data in devbox-hub.json beside this file (regenerate it after a new
image; this file does not change). Include it from your own jupyterhub_config.py, which adds
what is yours (the authenticator, admins, TLS):

    load_subconfig("devbox/jupyterhub_config.py")
    c.JupyterHub.authenticator_class = "github"
"""

import json
import pathlib

c = get_config()  # noqa: F821 (JupyterHub's config loader defines it)
settings = json.loads((pathlib.Path(__file__).parent / "devbox-hub.json").read_text())
profiles = settings["profiles"]

c.JupyterHub.spawner_class = "docker"
# The image's entrypoint sees the spawner's JUPYTERHUB_* variables and runs
# jupyterhub-singleuser; the home is the user's own volume, kept across spawns.
c.DockerSpawner.image = profiles[0]["image"]
if len(profiles) > 1:  # a picker on the spawn page
    c.DockerSpawner.allowed_images = {p["display_name"]: p["image"] for p in profiles}
c.DockerSpawner.network_name = settings["network"]
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.remove = True
c.DockerSpawner.volumes = {settings["home_volume"]: settings["home"]}
c.DockerSpawner.environment = settings["environment"]
# The server's token may report activity and stop its own server: the image's idle watcher
# tells the hub while work runs (the culler spares it) and stops through the hub when idle.
c.Spawner.server_token_scopes = settings["server_token_scopes"]


def request_gpus(spawner):
    """GPU profiles get every GPU of the host (the NVIDIA container toolkit's runtime), other
    profiles none. The hook runs before DockerSpawner resolves the picker's choice (and the
    spawner, with its settings, outlives a server), so the choice is read from the options."""
    chosen = spawner.user_options.get("image") or spawner.image
    profile = next((p for p in profiles if chosen in (p["display_name"], p["image"])),
                   profiles[0])
    host_config = {key: value for key, value in spawner.extra_host_config.items()
                   if key != "device_requests"}
    if profile["gpus"]:
        host_config["device_requests"] = [
            {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    spawner.extra_host_config = host_config


c.Spawner.pre_spawn_hook = request_gpus

if settings["cull"]:
    import sys

    c.JupyterHub.services.append({"name": "idle-culler", "command": [
        sys.executable, "-m", "jupyterhub_idle_culler",
        f"--timeout={settings['cull']['timeout_seconds']}",
        f"--cull-every={settings['cull']['every_seconds']}"]})
    c.JupyterHub.load_roles.append({"name": "idle-culler", "services": ["idle-culler"],
                                    "scopes": ["list:users", "read:users:activity",
                                               "read:servers", "delete:servers"]})
