"""Signed images with provenance: the team's key pair in cosign's format, a signature and an
in-toto SLSA provenance statement stored beside the image in a real registry (cosign's layout),
`verify` (exit 7 for unsigned, tampered or foreign-signed images), and the targets that run only
signed images (the hubs, pinned to the verified digest; EC2 boxes with boxes.toml signed_by).

What checks our signatures independently of our own verifier: OpenSSL's command line
(the ECDSA signature over the payload cosign's layout stores) and securesystemslib (the DSSE
envelope). Debian's cosign-compatible clients cannot: its skopeo and podman are built with
sigstore disabled, for signing and verifying alike, and cosign itself is not packaged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from devbox_build import __version__, signing
from devbox_build.targets.ec2 import Ec2, load_box

from .conftest import HOST_CA_CERTS, ROOT, TINY, assert_clean_error, cli
from .support.registry import LoopbackRegistry

PASSPHRASE = {"DEVBOX_SIGNING_PASSPHRASE": "correct horse battery staple"}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, accept: str = "") -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with OPENER.open(request, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with LoopbackRegistry(tmp_path_factory.mktemp("signing-registry")) as running:
        yield running


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    result = cli("generate-key-pair", "--output-prefix", str(folder / "team"), env=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    return folder / "team.key", folder / "team.pub"


@pytest.fixture
def untagged_after(engine):
    """The tags a test adds (pushed names, a release's tags) are removed after it."""
    def tags() -> set[str]:
        return {tag for image in engine.api.images() for tag in image["RepoTags"] or []}

    before = tags()
    yield
    for tag in tags() - before:
        engine.untag(tag)


def pushed(engine, ref: str, remote: str) -> str:
    engine.tag(engine.image_id(ref), remote)
    for _ in engine.push(remote):
        pass
    return remote


def signed(engine, ref: str, remote: str, private: Path) -> str:
    """``ref`` pushed as ``remote`` and signed there with ``devbox-build sign``."""
    pushed(engine, ref, remote)
    result = cli("sign", remote, "--key", str(private), env=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    return remote


# -- the key pair ------------------------------------------------------------------------------


def test_the_key_pair_is_cosigns_format_and_its_secret_stays_secret(keys, tmp_path):
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600
    text = private.read_text()
    assert text.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    document = json.loads(base64.b64decode(text.split("-----")[2]))
    # What cosign's and containers/image's key readers expect: scrypt, then NaCl secretbox.
    assert document["kdf"]["name"] == "scrypt" and document["cipher"]["name"] == "nacl/secretbox"
    assert document["kdf"]["params"] == {"N": 32768, "r": 8, "p": 1}
    assert subprocess.run(["openssl", "pkey", "-pubin", "-in", str(public), "-noout"],
                          check=False).returncode == 0
    # Never overwritten; a wrong passphrase, a file that is not a key: one error each.
    again = cli("generate-key-pair", "--output-prefix", str(private.with_suffix("")),
                env=PASSPHRASE)
    assert_clean_error(again, "team.key exists", "never overwritten")
    assert again.returncode == 2
    wrong = cli("sign", "127.0.0.1:1/x:y", "--key", str(private),
                env={"DEVBOX_SIGNING_PASSPHRASE": "wrong"})
    assert_clean_error(wrong, "team.key: the passphrase does not open this key")
    assert "wrong" not in wrong.stderr.replace("wrong\n", "")
    (tmp_path / "not.key").write_text("hello\n")
    assert_clean_error(cli("sign", "127.0.0.1:1/x:y", "--key", str(tmp_path / "not.key"),
                           env=PASSPHRASE), "not.key is not a signing key")
    unset = cli("sign", "127.0.0.1:1/x:y", "--key", str(private),
                unset=("DEVBOX_SIGNING_PASSPHRASE",))
    assert_clean_error(unset, "passphrase is not set", "DEVBOX_SIGNING_PASSPHRASE")
    assert signing.load_private_key(private, PASSPHRASE["DEVBOX_SIGNING_PASSPHRASE"].encode())


# -- sign and verify in a real registry ---------------------------------------------------------


@pytest.mark.engine
@pytest.mark.usefixtures("untagged_after")
def test_sign_attaches_a_signature_and_provenance_others_can_check(engine, tiny_images,
                                                                   registry, keys, tmp_path):
    private, public = keys
    _, results = tiny_images
    remote = pushed(engine, results["cpu"].content_tag, f"{registry.host}/team/tiny:cpu")
    digest = "sha256:" + hashlib.sha256(fetch(
        f"http://{registry.host}/v2/team/tiny/manifests/cpu",
        "application/vnd.docker.distribution.manifest.v2+json")).hexdigest()

    unsigned = cli("verify", remote, "--key", str(public))
    assert_clean_error(unsigned, "has no signature by this key", digest)
    assert unsigned.returncode == 7

    signed = cli("sign", remote, "--key", str(private), "--json", env=PASSPHRASE)
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["digest"] == digest
    assert PASSPHRASE["DEVBOX_SIGNING_PASSPHRASE"] not in signed.stdout + signed.stderr

    verified = cli("verify", remote, "--key", str(public), "--json")
    assert verified.returncode == 0, verified.stderr
    facts = json.loads(verified.stdout)
    assert facts["pinned"] == f"{registry.host}/team/tiny@{digest}"
    assert (facts["spec"], facts["variant"]) == ("tiny", "cpu")
    assert facts["builder"]["version"] == {"devbox-build": __version__}
    # The provenance names every lock by the digest of the committed file it was built from.
    locks = {m["uri"]: m["digest"]["sha256"] for m in facts["materials"]
             if m["uri"].startswith("lock:")}
    platform = TINY / "locks" / "linux-amd64"
    assert locks == {"lock:pip": hashlib.sha256((platform / "pip.txt").read_bytes()).hexdigest(),
                     "lock:dev": hashlib.sha256((platform / "dev.txt").read_bytes()).hexdigest()}
    assert any(m["uri"] == "docker-image:debian:bookworm-slim" for m in facts["materials"])

    # cosign's layout, read with plain HTTP, checked by OpenSSL: the signature is ECDSA P-256
    # over the simple-signing payload, which names this repository and digest.
    base = f"http://{registry.host}/v2/team/tiny"
    tag = digest.replace(":", "-")
    manifest = json.loads(fetch(f"{base}/manifests/{tag}.sig",
                                "application/vnd.oci.image.manifest.v1+json"))
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = fetch(f"{base}/blobs/{layer['digest']}")
    assert json.loads(payload)["critical"] == {
        "identity": {"docker-reference": f"{registry.host}/team/tiny"},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature"}
    (tmp_path / "payload").write_bytes(payload)
    (tmp_path / "signature").write_bytes(
        base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"]))
    openssl = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(public), "-signature",
         str(tmp_path / "signature"), str(tmp_path / "payload")],
        capture_output=True, text=True, check=False)
    assert openssl.stdout.strip() == "Verified OK", openssl.stdout + openssl.stderr

    # The attestation: a DSSE envelope that securesystemslib verifies with the public key,
    # whose in-toto statement's subject is this digest.
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    attestation = json.loads(fetch(f"{base}/manifests/{tag}.att",
                                   "application/vnd.oci.image.manifest.v1+json"))
    (layer,) = attestation["layers"]
    assert layer["annotations"]["predicateType"] == "https://slsa.dev/provenance/v1"
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = SSlibKey.from_crypto(load_pem_public_key(public.read_bytes()),
                               scheme="ecdsa-sha2-nistp256")
    document = json.loads(fetch(f"{base}/blobs/{layer['digest']}"))
    for entry in document["signatures"]:  # cosign leaves the key id empty
        entry["keyid"] = key.keyid
    envelope = Envelope.from_dict(document)
    assert key.keyid in envelope.verify([key], 1)
    statement = json.loads(envelope.pae().split(b" ", 4)[4])
    assert statement["subject"] == [{"name": f"{registry.host}/team/tiny",
                                     "digest": {"sha256": digest.removeprefix("sha256:")}}]

    # Signing again adds nothing twice.
    assert cli("sign", remote, "--key", str(private), env=PASSPHRASE).returncode == 0
    assert len(json.loads(fetch(f"{base}/manifests/{tag}.sig",
                                "application/vnd.oci.image.manifest.v1+json"))["layers"]) == 1


@pytest.mark.engine
@pytest.mark.usefixtures("untagged_after")
def test_verify_refuses_a_tampered_a_foreign_and_a_retagged_image(engine, tiny_images, registry,
                                                                 keys, tmp_path):
    private, public = keys
    remote = signed(engine, tiny_images[1]["cpu"].content_tag,
                    f"{registry.host}/team/tamper:cpu", private)
    assert cli("verify", remote, "--key", str(public)).returncode == 0

    # Another team's key.
    other = tmp_path / "other"
    assert cli("generate-key-pair", "--output-prefix", str(other),
               env=PASSPHRASE).returncode == 0
    foreign = cli("verify", remote, "--key", f"{other}.pub")
    assert_clean_error(foreign, "has no signature by this key")
    assert foreign.returncode == 7

    # The signature's payload swapped for one naming another digest (what a registry admin
    # could do): the signature no longer matches it.
    registry_client = signing.Registry(registry.host)
    digest = registry_client.manifest("team/tamper", "cpu")[0]
    tag = digest.replace(":", "-") + ".sig"
    manifest = json.loads(registry_client.manifest("team/tamper", tag)[1])
    forged = signing.simple_signing(f"{registry.host}/team/tamper", "sha256:" + "0" * 64)
    manifest["layers"][0].update(registry_client.put_blob("team/tamper", forged))
    registry_client.put_manifest("team/tamper", tag, manifest)
    tampered = cli("verify", remote, "--key", str(public))
    assert_clean_error(tampered, "has no signature by this key")
    assert tampered.returncode == 7

    # The tag moved to another image after signing: what it names now is unsigned.
    resigned = signed(engine, tiny_images[1]["cpu"].content_tag,
                      f"{registry.host}/team/moved:cpu", private)
    pushed(engine, tiny_images[1]["gpu"].content_tag, resigned)
    moved = cli("verify", resigned, "--key", str(public))
    assert_clean_error(moved, "has no signature by this key")
    assert moved.returncode == 7

    # An image that names no registry, and one its registry does not hold: input errors.
    assert_clean_error(cli("verify", "devbox-test/tiny:cpu", "--key", str(public)),
                       "names no registry")
    assert_clean_error(cli("verify", f"{registry.host}/team/absent:cpu", "--key", str(public)),
                       "is not in its registry")


# -- the targets run only signed images --------------------------------------------------------


@pytest.mark.engine
@pytest.mark.usefixtures("untagged_after")
def test_the_hub_serves_only_signed_images_pinned_to_their_digest(engine, tiny_images, registry,
                                                                 keys, tmp_path):
    private, public = keys
    _, results = tiny_images
    cpu = signed(engine, results["cpu"].content_tag, f"{registry.host}/team/hub:cpu", private)
    gpu = pushed(engine, results["gpu"].content_tag, f"{registry.host}/team/hub:gpu")
    digest = signing.Registry(registry.host).manifest("team/hub", "cpu")[0]
    from devbox_build.checks.image import ImageUnderTest
    from devbox_build.targets.hub import DockerHub, KubernetesHub

    # The unsigned GPU image is named, with exit 7, and nothing is written.
    refused = cli("hub", "docker", cpu, gpu, "--verify-key", str(public),
                  "--output", str(tmp_path / "refused"))
    assert_clean_error(refused, f"not signed by {public}", f"{gpu} (sha256:")
    assert refused.returncode == 7 and not (tmp_path / "refused").exists()

    # Signed: the profiles pull the digest that was verified (the tiny stack has no
    # jupyterhub, so the targets render it directly, past their admission).
    images = [ImageUnderTest.load(engine, cpu)]
    pinned = signing.verify_images(images, public)
    assert pinned == {cpu: f"{registry.host}/team/hub@{digest}"}
    settings = json.loads(DockerHub(pinned=pinned).render(images)["devbox-hub.json"])
    assert settings["profiles"][0]["image"] == f"{registry.host}/team/hub@{digest}"
    import yaml
    values = yaml.safe_load(KubernetesHub(pinned=pinned).render(images)["values.yaml"])
    content_tag = results["cpu"].content_tag.rsplit(":", 1)[1]
    assert values["singleuser"]["image"] == {"name": f"{registry.host}/team/hub",
                                             "tag": f"{content_tag}@{digest}",
                                             "pullPolicy": "IfNotPresent"}
    # The engine's copy must be what the registry holds: after the tag moved, it is refused.
    pushed(engine, results["gpu"].content_tag, f"{registry.host}/team/hub:cpu")
    engine.tag(engine.image_id(results["cpu"].content_tag), cpu)
    with pytest.raises(signing.NotVerified, match="has no signature by this key"):
        signing.verify_images([ImageUnderTest.load(engine, cpu)], public)


def test_an_ec2_box_with_signed_by_pulls_the_verified_digest_and_fails_closed(tmp_path, keys):
    _, public = keys
    boxes = tmp_path / "boxes.toml"
    example = (ROOT / "boxes.toml").read_text()
    boxes.write_text(example.replace("[roles.cpu]", f'signed_by = "{public}"\n\n[roles.cpu]', 1))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop", "-f",
                    str(tmp_path / "ssh")], check=True)
    ssh_key = str(tmp_path / "ssh.pub")
    box = load_box(boxes)
    assert box.signed_by == public
    pinned = f"{box.image}@sha256:{'a' * 64}"
    user_data = Ec2(box, "cpu", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample x", image=pinned
                    ).render()["user-data-cpu.yml"]
    assert f"IMAGE={pinned}" in user_data
    # The registry cannot be reached (here: a proxy that refuses): no user data, exit 4 (the
    # same call `ec2 up` and `move` make before anything is launched).
    refused = cli("ec2", "user-data", "--boxes", str(boxes), "--role", "cpu",
                  "--public-key", ssh_key,
                  env={"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                       "NO_PROXY": "", "no_proxy": ""})
    assert refused.stdout == ""
    assert_clean_error(refused, f"registry {box.image.split('/')[0]} could not be reached")
    assert refused.returncode == 4
    missing = boxes.read_text().replace(str(public), "absent.pub")
    boxes.write_text(missing)
    assert_clean_error(cli("ec2", "user-data", "--boxes", str(boxes), "--role", "cpu",
                           "--public-key", ssh_key),
                       "key 'signed_by'", "absent.pub is not a file")


@pytest.mark.engine
@pytest.mark.usefixtures("untagged_after")
def test_a_release_pushes_signed_tags_with_their_provenance(engine, stack, registry, keys):
    private, public = keys
    target = f"{registry.host}/released"
    # The key is opened before any work: a wrong passphrase builds and pushes nothing.
    wrong = cli("release", str(stack), "--variant", "cpu", "--registry", target, "--push",
                "--sign-key", str(private), env={"DEVBOX_SIGNING_PASSPHRASE": "wrong"})
    assert_clean_error(wrong, "the passphrase does not open this key")
    assert not (stack / "CHANGELOG.md").exists()
    assert_clean_error(cli("release", str(stack), "--sign-key", str(private), env=PASSPHRASE),
                       "--sign-key signs what is pushed: add --push")

    result = cli("release", str(stack), "--variant", "cpu", "--registry", target, "--push",
                 "--sign-key", str(private), "--json", env=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    (tag,) = json.loads(result.stdout)["tags"]
    assert tag.startswith(f"{target}/") and tag.endswith(":1.0.0-cpu")
    verified = cli("verify", tag, "--key", str(public), "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["spec"] == stack.name


@pytest.mark.engine
@pytest.mark.usefixtures("untagged_after")
def test_the_signing_walk_through_and_a_real_hub_runs_the_signed_digest(engine, default_images,
                                                                        registry, tmp_path):
    """docs/building.md's signing block as printed (the registry's port filled in), then a real
    hub configured with --verify-key: alice's server runs the digest that was verified."""
    from .support.hub import Hub
    from .test_readme import SIGNING_WALK_THROUGH, walk_through_commands

    commands = walk_through_commands(SIGNING_WALK_THROUGH)
    assert [c.split()[1] for c in commands] == ["generate-key-pair", "build", "sign", "verify",
                                                "hub"]
    environment = {**os.environ, **PASSPHRASE, "DEVBOX_IMAGES_DIR": str(ROOT / "images"),
                   "DEVBOX_CA_CERTS": " ".join(HOST_CA_CERTS),
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for command in commands:
        result = subprocess.run(["bash", "-c", command.replace("127.0.0.1:5000", registry.host)],
                                cwd=tmp_path, env=environment, capture_output=True, text=True,
                                timeout=900, check=False)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    remote = f"{registry.host}/team/devbox/datascience:cpu"
    digest = signing.Registry(registry.host).manifest("team/devbox/datascience", "cpu")[0]
    pinned = f"{registry.host}/team/devbox/datascience@{digest}"
    settings = json.loads((tmp_path / "devbox" / "devbox-hub.json").read_text())
    assert [p["image"] for p in settings["profiles"]] == [pinned]

    with Hub(engine, remote, tmp_path / "hub", users=("alice",),
             options=["--verify-key", str(tmp_path / "team-signing.pub")]) as hub:
        session = hub.login("alice")
        assert "JupyterLab" in hub.open_lab(session, "alice").text
        container = engine.api.inspect_container(f"{hub.prefix}-alice")
        assert container["Config"]["Image"] == pinned
        assert container["Image"] == engine.image_id(remote)


def test_an_ecr_registry_logs_in_with_the_callers_aws_identity(tmp_path, monkeypatch):
    """No `docker login` for ECR: the registry client asks ECR (here moto's server) for the
    token `aws ecr get-login-password` would print; AWS out of reach is one error, exit 4."""
    from devbox_build.errors import RegistryError
    from devbox_build.registry import _credentials

    from .support.aws import MotoServer

    host = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # no docker login of the user's
    with MotoServer() as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        user, password = _credentials(host)
        assert user == "AWS" and password
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match=f"registry {host}: no ECR login") as raised:
        _credentials(host)
    assert raised.value.exit_code == 4 and "docker login" in raised.value.hint
    assert _credentials("127.0.0.1:5000") is None
