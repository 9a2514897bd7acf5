"""Team scale on JupyterHub: a real hub on loopback (JupyterHub, DockerSpawner and
configurable-http-proxy) spawns the default image for two users who log in through its form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .support.hub import Hub
from .support.wait import until

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


# This host has no GPU: bob's spawns go where the GPU request is dropped (as on a node whose
# toolkit hands out devices some other way), so the GPU image itself is seen serving.
WITHOUT_GPUS_FOR_BOB = """
ours = c.Spawner.pre_spawn_hook
def without_gpus_for_bob(spawner):
    ours(spawner)
    if spawner.user.name == "bob":
        spawner.extra_host_config = {key: value for key, value in
                                     spawner.extra_host_config.items() if key != "device_requests"}
c.Spawner.pre_spawn_hook = without_gpus_for_bob
"""


def test_a_user_picks_the_gpu_profile_and_the_engine_is_asked_for_the_gpus(
        engine, default_images, tmp_path):
    """The CPU and GPU images as the spawn page's picker. Alice picks the GPU profile: the
    container is created with a request for every NVIDIA GPU, which this GPU-less engine refuses
    by name; she picks the CPU profile and gets it without any GPU request (one spawner serves
    her every spawn). Bob's GPU profile, with the request dropped, serves JupyterLab."""
    cpu, gpu = default_images["cpu"].content_tag, default_images["gpu"].content_tag
    with Hub(engine, [cpu, gpu], tmp_path, extra_config=WITHOUT_GPUS_FOR_BOB) as hub:
        profiles = {p["slug"]: p["display_name"] for p in json.loads(
            (tmp_path / "devbox" / "devbox-hub.json").read_text())["profiles"]}
        alice, bob = hub.login("alice"), hub.login("bob")
        hub.spawn(alice, "alice", profiles["gpu"])
        until(lambda: 'could not select device driver "nvidia"' in hub.logs()
              and not hub.user("alice").get("servers"), timeout=120,
              what=lambda: f"the GPU request never reached the engine:\n{hub.logs()[-3000:]}")

        assert "JupyterLab" in hub.open_lab(alice, "alice", profile=profiles["cpu"]).text
        attrs = engine.api.inspect_container(f"{hub.prefix}-alice")
        assert attrs["Config"]["Image"] == cpu
        assert not attrs["HostConfig"].get("DeviceRequests"), attrs["HostConfig"]

        assert "JupyterLab" in hub.open_lab(bob, "bob", profile=profiles["gpu"]).text
        attrs = engine.api.inspect_container(f"{hub.prefix}-bob")
        assert attrs["Config"]["Image"] == gpu
        kernel = hub.server_api(bob, "bob", "POST", "/kernels", json={})
        assert kernel.status_code == 201, kernel.text


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

        # An observation window, not a wait: the busy servers must be up at every look for three
        # culler timeouts, and the others' stop times are read off the hub as they happen.
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
    from devbox_build.targets import write
    from devbox_build.targets.hub import Profile, docker_files, docker_settings

    profiles = [Profile("cpu", "datascience (cpu)", "devbox/datascience:cpu-0123456789ab", False),
                Profile("gpu", "datascience (gpu)", "devbox/datascience:gpu-0123456789ab", True)]
    write(tmp_path, docker_files(docker_settings(profiles, "team-net", "2h", 60)))
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

    class Spawned:  # what the hook reads and writes on DockerSpawner, before its start()
        def __init__(self, image, choice=None):
            self.image, self.extra_host_config = image, {"shm_size": "1g"}
            self.user_options = {"image": choice} if choice else {}

    # The picker's choice is in the options (start() resolves it after the hook ran); one
    # spawner serves a user's every spawn, so a CPU spawn after a GPU one drops the GPUs.
    cpu, gpu = Spawned(profiles[0].image), Spawned(profiles[0].image, "datascience (gpu)")
    for spawned in (cpu, gpu):
        config.Spawner.pre_spawn_hook(spawned)
    assert cpu.extra_host_config == {"shm_size": "1g"}
    assert gpu.extra_host_config == {"shm_size": "1g", "device_requests": [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]}
    gpu.user_options = {"image": "datascience (cpu)"}
    config.Spawner.pre_spawn_hook(gpu)
    assert gpu.extra_host_config == {"shm_size": "1g"}
    gpu.user_options = {"image": "datascience (gpu)"}
    config.Spawner.pre_spawn_hook(gpu)
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


# -- Zero to JupyterHub: the chart's schema, KubeSpawner's rendering, kubernetes-validate --------

Z2JH = Path(__file__).parent / "data" / "z2jh"
KUBERNETES = "1.32"  # the chart's kubeVersion floor


def merged(base: dict, values: dict) -> dict:
    """``values`` over the chart's defaults, as helm merges them."""
    out = dict(base)
    for key, value in values.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return out


def check_values(values: dict) -> None:
    import jsonschema

    schema = yaml.safe_load((Z2JH / "values.schema.yaml").read_text())
    defaults = yaml.safe_load((Z2JH / "values.yaml").read_text())
    jsonschema.validate(merged(defaults, values), schema)


def rendered(values: dict, tmp_path) -> list[dict]:
    """The user pods (one per profile) and the home PVC, as KubeSpawner renders them from the
    values' singleuser section (the chart's hub maps these keys to these traits)."""
    import asyncio

    from jupyterhub.objects import Hub as HubObject
    from jupyterhub.objects import Server
    from kubernetes_asyncio.client import ApiClient
    from kubespawner import KubeSpawner
    from traitlets.config import Config

    single = values["singleuser"]
    config = Config()
    spawner = config.KubeSpawner
    spawner.image = f"{single['image']['name']}:{single['image']['tag']}"
    spawner.uid, spawner.fs_gid, spawner.cmd = single["uid"], single["fsGid"], [single["cmd"]]
    spawner.cpu_guarantee, spawner.cpu_limit = single["cpu"]["guarantee"], single["cpu"]["limit"]
    spawner.mem_guarantee = single["memory"]["guarantee"]
    spawner.mem_limit = single["memory"]["limit"]
    spawner.environment = single["extraEnv"]
    spawner.profile_list = single["profileList"]
    spawner.default_url = single["defaultUrl"]
    spawner.storage_capacity = "10Gi"
    spawner.volumes = [{"name": "home", "persistentVolumeClaim": {"claimName": "claim-{user_server}"}}]
    spawner.volume_mounts = [{"name": "home", "mountPath": single["storage"]["homeMountPath"]}]

    class User:  # what KubeSpawner reads of JupyterHub's user
        name = escaped_name = "alice"
        id, url = 1, "/user/alice/"

        def __init__(self):
            self.spawners, self.server, self.orm_user = {}, Server(), None

    kubeconfig = tmp_path / "kubeconfig"  # no cluster: KubeSpawner only reads a context
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: none, cluster: {server: "
        "'https://127.0.0.1:1'}}]\nusers: [{name: none, user: {token: none}}]\ncontexts: "
        "[{name: none, context: {cluster: none, user: none, namespace: jhub}}]\n"
        "current-context: none\n")

    async def render() -> list[dict]:
        kube = KubeSpawner(config=config, _mock=True, hub=HubObject(), user=User())
        api, documents = ApiClient(), []
        for profile in single["profileList"]:
            kube.user_options = {"profile": profile["slug"]}
            await kube.load_user_options()
            documents.append(api.sanitize_for_serialization(await kube.get_pod_manifest()))
        documents.append(api.sanitize_for_serialization(kube.get_pvc_manifest()))
        await api.close()
        return documents

    from kubernetes_asyncio.config import kube_config

    saved = kube_config.KUBE_CONFIG_DEFAULT_LOCATION  # read from KUBECONFIG at import
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    try:
        return asyncio.run(render())
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved


def test_chart_values_validate_and_render_valid_pods(engine, default_images, tmp_path):
    import kubernetes_validate

    from .conftest import cli

    out = tmp_path / "values.yaml"
    result = cli("hub", "k8s", "devbox/datascience:cpu", "devbox/datascience:gpu",
                 "--gpu-node-selector", "node.kubernetes.io/instance-type=g6.xlarge",
                 "--idle-timeout", "2h", "--cull-minutes", "60", "--output", str(out))
    assert result.returncode == 0, result.stderr
    values = yaml.safe_load(out.read_text())
    check_values(values)
    documents = rendered(values, tmp_path)
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    cpu, gpu, pvc = documents
    for pod in (cpu, gpu):
        assert pod["spec"]["securityContext"]["fsGroup"] == 100
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["runAsUser"] == 1000
        assert container["args"] == ["jupyterhub-singleuser"], container
        assert {"mountPath": "/home/sagemaker-user", "name": "home"} in container["volumeMounts"]
    assert "nvidia.com/gpu" not in cpu["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "g6.xlarge"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "spec"]["tolerations"]
    assert pvc["kind"] == "PersistentVolumeClaim"

    # The test can fail: a typo in a key is the chart's schema's error, a wrong type Kubernetes'.
    import jsonschema

    typo = merged(values, {"singleuser": {"fsGID": 100}})
    with pytest.raises(jsonschema.ValidationError, match="fsGID"):
        check_values(typo)
    broken = json.loads(json.dumps(gpu))
    broken["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_image_under_the_charts_pod_defaults(engine, default_images):
    """What the chart's user pods impose: uid 1000 with fsGroup 100 (the PVC home root:users
    2775), all capabilities dropped and allowPrivilegeEscalation false (no-new-privileges). The
    server starts and the home is writable; sudo fails, as the README says."""
    import uuid

    import requests

    ref = default_images["cpu"].content_tag
    volume = f"hubhome{uuid.uuid4().hex[:8]}"
    api = engine.api
    engine.api.create_volume(volume)
    prepared = api.create_container(ref, entrypoint=["sh", "-c", "chown root:100 /h && chmod "
                                                     "2775 /h && stat -c '%U:%G %a' /h"],
                                    user="0", host_config=api.create_host_config(
                                        binds={volume: {"bind": "/h", "mode": "rw"}}))["Id"]
    container = None
    try:
        api.start(prepared)
        api.wait(prepared, timeout=60)
        assert api.logs(prepared).decode().strip() == "root:users 2775"
        container = api.create_container(
            ref, user="1000:100", environment={"JUPYTER_TOKEN": "chart"}, ports=[8888],
            host_config=api.create_host_config(
                binds={volume: {"bind": "/home/sagemaker-user", "mode": "rw"}},
                port_bindings={8888: ("127.0.0.1", None)}, cap_drop=["ALL"],
                security_opt=["no-new-privileges"]))["Id"]
        api.start(container)
        url = f"http://127.0.0.1:{engine.published_port(container, 8888)}/api/status"
        until(lambda: requests.get(url, headers={"Authorization": "token chart"}, timeout=5,
                                   proxies={"http": None}).ok, timeout=120,
              alive=lambda: engine.state(container)["Running"],
              what=lambda: engine.logs(container)[-2000:])

        def run(command: str) -> int:
            exec_id = api.exec_create(container, ["sh", "-c", command])
            api.exec_start(exec_id)
            return api.exec_inspect(exec_id)["ExitCode"]

        assert run("touch ~/written && test -f ~/written") == 0
        assert run("sudo -n true") != 0  # no-new-privileges: setuid does not raise privileges
    finally:
        for created in (prepared, container):
            if created:
                engine.remove(created)
        api.remove_volume(volume, force=True)
