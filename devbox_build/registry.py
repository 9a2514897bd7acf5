"""A registry, through the OCI distribution API: what the engine cannot do for us.

The engine pushes and pulls images. A signature and a provenance statement are artifacts stored
beside an image (cosign's layout: the tags ``sha256-<hex>.sig`` and ``.att`` in the image's own
repository), which the engine can neither read nor write. This client can: it resolves a tag to
its digest, and reads and writes manifests and blobs.

It logs in the way the engine's client does: docker's config.json, credential helpers included
(``docker login``, ``aws ecr get-login-password | docker login``), answering the registry's
token challenge. It trusts this host's extra CAs, like every command that reaches the network.
A loopback registry is plain HTTP, as the engine treats it; any other registry is HTTPS.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass

from .errors import InputError, RegistryError
from .refs import check_reference, names_registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
TIMEOUT = 60
# An ECR registry's host: without a `docker login`, a token comes from the caller's AWS identity.
ECR_HOST = re.compile(r"(?P<account>[0-9]{12})\.dkr\.ecr\.(?P<region>[a-z]{2}(-gov)?-[a-z]+-[0-9])"
                      r"\.amazonaws\.com(\.cn)?")


@dataclass(frozen=True)
class Reference:
    host: str
    repository: str  # without the host
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str, what: str = "image") -> Reference:
        """``HOST[:PORT]/path[:tag][@digest]``; an image that names no registry is refused (a
        signature lives in a registry, beside the image)."""
        check_reference(ref, what)
        name, _, digest = ref.partition("@")
        repository, tag = name, None
        if ":" in name.rsplit("/", 1)[-1]:
            repository, tag = name.rsplit(":", 1)
        if not names_registry(repository):
            raise InputError(f"{what}: {ref} names no registry: signatures are stored beside an "
                             "image in its registry",
                             hint="push it first (build --registry HOST/NAMESPACE --push) and "
                                  "name it as pushed")
        host, _, path = repository.partition("/")
        return cls(host, path, tag, digest or None)

    @property
    def name(self) -> str:
        """``HOST/path``, the repository as users and signatures name it."""
        return f"{self.host}/{self.repository}"

    def at(self, digest: str) -> str:
        return f"{self.name}@{digest}"


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in ("localhost", "[::1]") or name.startswith("127.")


def _credentials(host: str) -> tuple[str, str] | None:
    """The user and password ``docker login`` stored for ``host`` (a credential helper's too)."""
    from docker import auth, errors

    try:
        entry = auth.load_config().resolve_authconfig(host) or {}
    except (errors.DockerException, OSError, ValueError) as exc:  # a broken config or helper
        raise RegistryError(f"reading docker's credentials for {host} failed: {exc}") from None
    user = entry.get("Username") or entry.get("username")
    password = entry.get("Password") or entry.get("password")
    if entry.get("IdentityToken"):
        return ("<token>", entry["IdentityToken"])
    if user and password:
        return (user, password)
    ecr = ECR_HOST.fullmatch(host)
    return _ecr_credentials(host, ecr["account"], ecr["region"]) if ecr else None


def _ecr_credentials(host: str, account: str, region: str) -> tuple[str, str]:
    """ECR's user and password for ``host``, from the caller's AWS identity (what `aws ecr
    get-login-password | docker login` would store)."""
    import base64

    import boto3
    import botocore.exceptions

    try:
        answer = boto3.client("ecr", region_name=region).get_authorization_token(
            registryIds=[account])
        token = answer["authorizationData"][0]["authorizationToken"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise RegistryError(f"registry {host}: no ECR login ({exc})",
                            hint=f"aws ecr get-login-password --region {region} | docker login "
                                 f"--username AWS --password-stdin {host}") from None
    user, _, password = base64.b64decode(token).decode().partition(":")
    return user, password


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class Registry:
    """One registry host. Each call names the repository; tokens are kept per scope."""

    def __init__(self, host: str) -> None:
        import requests

        self.host = host
        self.base = f"{'http' if _loopback(host) else 'https'}://{host}/v2"
        self.session = requests.Session()
        self.session.trust_env = not _loopback(host)  # no proxy for loopback
        from .hostca import ca_bundle

        bundle = ca_bundle()
        if bundle is not None:
            # Kept open (and so on disk) as long as the session that reads it.
            self._bundle = tempfile.NamedTemporaryFile(prefix="devbox-ca-", suffix=".pem")  # noqa: SIM115
            self._bundle.write(bundle)
            self._bundle.flush()
            self.session.verify = self._bundle.name
        self._authorization: dict[str, str] = {}

    def _request(self, method: str, url: str, repository: str, *, push: bool = False, **kwargs):
        import requests

        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        headers = dict(kwargs.pop("headers", {}))
        for attempt in range(2):
            if scope in self._authorization:
                headers["Authorization"] = self._authorization[scope]
            try:
                response = self.session.request(method, url, headers=headers, timeout=TIMEOUT,
                                                **kwargs)
            except requests.RequestException as exc:
                raise RegistryError(f"registry {self.host} could not be reached: "
                                    f"{type(exc).__name__}") from None
            if response.status_code != 401 or attempt:
                return response
            self._authorization[scope] = self._authorize(response, scope)
        return response

    def _authorize(self, response, scope: str) -> str:
        import requests

        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        credentials = _credentials(self.host)
        if scheme == "basic":
            if credentials is None:
                raise RegistryError(f"registry {self.host} needs a login",
                                    hint=f"docker login {self.host}")
            return requests.auth._basic_auth_str(*credentials)
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.host} asked for an unknown login "
                                f"({scheme or 'no challenge'})")
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        try:
            answer = self.session.get(params["realm"], params=query, auth=credentials,
                                      timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise RegistryError(f"registry {self.host}'s login service could not be reached: "
                                f"{type(exc).__name__}") from None
        if answer.status_code != 200:
            raise RegistryError(f"registry {self.host} refused the login ({answer.status_code})",
                                hint=f"docker login {self.host}")
        token = answer.json().get("token") or answer.json().get("access_token")
        return f"Bearer {token}"

    def _fail(self, response, what: str) -> RegistryError:
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(e.get("message", e.get("code", "")) for e in errors)
        except ValueError:
            detail = ""
        return RegistryError(f"registry {self.host}: {what} failed ({response.status_code}"
                             + (f": {detail}" if detail else "") + ")")

    def manifest(self, repository: str, reference: str) -> tuple[str, bytes, str] | None:
        """The manifest ``reference`` (a tag or a digest) names: its digest, bytes and media
        type; None when there is none."""
        response = self._request("GET", f"{self.base}/{repository}/manifests/{reference}",
                                 repository, headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"reading {repository}:{reference}")
        data = response.content
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and reference != digest:
            raise RegistryError(f"registry {self.host} answered {repository}@{reference} with "
                                f"other bytes ({digest})")
        return digest, data, response.headers.get("Content-Type", "").split(";")[0]

    def blob(self, repository: str, digest: str) -> bytes:
        response = self._request("GET", f"{self.base}/{repository}/blobs/{digest}", repository)
        if response.status_code != 200:
            raise self._fail(response, f"reading blob {digest} of {repository}")
        if "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
            raise RegistryError(f"registry {self.host}: blob {digest} of {repository} does not "
                                "match its digest")
        return response.content

    def put_blob(self, repository: str, data: bytes) -> dict:
        """Uploads ``data`` (monolithic; a no-op when the registry has it); its descriptor's
        digest and size."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        head = self._request("HEAD", f"{self.base}/{repository}/blobs/{digest}", repository,
                             push=True)
        if head.status_code != 200:
            start = self._request("POST", f"{self.base}/{repository}/blobs/uploads/",
                                  repository, push=True)
            if start.status_code != 202:
                raise self._fail(start, f"starting an upload to {repository}")
            location = start.headers["Location"]
            if location.startswith("/"):
                location = self.base[: -len("/v2")] + location
            put = self._request("PUT", location, repository, push=True,
                                params={"digest": digest}, data=data,
                                headers={"Content-Type": "application/octet-stream"})
            if put.status_code != 201:
                raise self._fail(put, f"uploading blob {digest} to {repository}")
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repository: str, tag: str, manifest: dict) -> str:
        data = json.dumps(manifest, separators=(",", ":")).encode()
        response = self._request("PUT", f"{self.base}/{repository}/manifests/{tag}", repository,
                                 push=True, data=data,
                                 headers={"Content-Type": manifest["mediaType"]})
        if response.status_code != 201:
            raise self._fail(response, f"writing {repository}:{tag}")
        return "sha256:" + hashlib.sha256(data).hexdigest()


def resolve(ref: str, what: str = "image") -> tuple[Registry, Reference, str]:
    """The registry that holds ``ref``, the reference, and the digest it names there."""
    reference = Reference.parse(ref, what)
    registry = Registry(reference.host)
    found = registry.manifest(reference.repository, reference.digest or reference.tag or "latest")
    if found is None:
        raise InputError(f"{what}: {ref} is not in its registry", hint="push it first")
    return registry, reference, found[0]



def join(target: str, images: list[str]) -> tuple[str, list[dict]]:
    """Writes ``target`` as a multi-platform index of ``images`` (pushed images of one
    repository, each of another platform), so a pull gets the puller's own platform; the
    index's digest and its entries."""
    reference = Reference.parse(target, "TARGET")
    registry = Registry(reference.host)
    entries, seen = [], {}
    for ref in images:
        image = Reference.parse(ref, "IMAGES")
        if image.name != reference.name:
            raise InputError(f"IMAGES: {ref} is not in {reference.name}: an index names "
                             "manifests of its own repository")
        found = registry.manifest(image.repository, image.digest or image.tag or "latest")
        if found is None:
            raise InputError(f"IMAGES: {ref} is not in its registry", hint="push it first")
        digest, data, media_type = found
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise InputError(f"IMAGES: {ref} is an index already: name each platform's image "
                             "(its content tag, or REPOSITORY@DIGEST)")
        config = json.loads(registry.blob(image.repository, json.loads(data)["config"]["digest"]))
        platform = {"architecture": config["architecture"], "os": config["os"],
                    **({"variant": config["variant"]} if config.get("variant") else {})}
        key = "/".join(filter(None, (config["os"], config["architecture"], config.get("variant"))))
        if key in seen:
            raise InputError(f"IMAGES: {ref} and {seen[key]} are both {key}: one image per "
                             "platform")
        seen[key] = ref
        entries.append({"mediaType": media_type, "digest": digest, "size": len(data),
                        "platform": platform})
    docker = all(entry["mediaType"] == DOCKER_MANIFEST for entry in entries)
    index = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX,
             "manifests": entries}
    return registry.put_manifest(reference.repository, reference.tag or "latest", index), entries
