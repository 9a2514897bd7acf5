"""Signed images with provenance, in cosign's formats, with a key the team holds.

- **The key pair** is cosign's: an ECDSA P-256 key, its private half encrypted with a passphrase
  (scrypt, then NaCl secretbox) in an ``ENCRYPTED SIGSTORE PRIVATE KEY`` PEM block, the public
  half a ``PUBLIC KEY`` PEM. ``cosign`` and ``skopeo`` read both.
- **A signature** is a simple-signing payload naming the repository and the image's manifest
  digest, signed with the key, stored as a layer of the tag ``sha256-<hex>.sig`` in the image's
  repository, the signature in the layer's ``dev.cosignproject.cosign/signature`` annotation.
  Verifiers that read this layout: ``cosign verify --key``, and containers/image's
  ``sigstoreSigned`` policy (skopeo, podman, CRI-O) with ``use-sigstore-attachments``.
- **The provenance** is an in-toto statement with a SLSA provenance v1 predicate (the spec, the
  digest of every lock, the base image, the builder's version), in a DSSE envelope signed with
  the same key, stored as a layer of the tag ``sha256-<hex>.att`` (``cosign verify-attestation
  --key --type slsaprovenance1`` reads it).

A signature covers a manifest digest, so pulling by that digest runs exactly what was signed:
``verify`` answers the digest, and the targets pin what they run to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, NotVerified, RegistryError
from .registry import OCI_MANIFEST, Reference, Registry, resolve

PRIVATE_PEM = "ENCRYPTED SIGSTORE PRIVATE KEY"
PRIVATE_PEMS = (PRIVATE_PEM, "ENCRYPTED COSIGN PRIVATE KEY")  # cosign's older name, same format
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
DSSE = "application/vnd.dsse.envelope.v1+json"
IN_TOTO = "application/vnd.in-toto+json"
STATEMENT = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:devbox-build:build:v1"
BUILDER = "urn:devbox-build"
CONFIG = "application/vnd.oci.image.config.v1+json"
SCRYPT = {"N": 32768, "r": 8, "p": 1}  # cosign's parameters


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _scrypt(passphrase: bytes, salt: bytes, params: dict) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=params["N"], r=params["r"], p=params["p"],
                          dklen=32, maxmem=256 * 1024 * 1024)


def generate_key_pair(prefix: Path, passphrase: bytes) -> tuple[Path, Path]:
    """``PREFIX.key`` (mode 0600, encrypted) and ``PREFIX.pub``; never overwrites either."""
    import nacl.secret
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name
                                                                              + ".pub")
    for path in (private, public):
        if path.exists():
            raise InputError(f"{path} exists: a signing key is never overwritten",
                             hint="choose another --output-prefix, or move the old pair away")
    if not passphrase:
        raise InputError("the signing key's passphrase is empty",
                         hint="set DEVBOX_SIGNING_PASSPHRASE, or type one when asked")
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    salt, nonce = os.urandom(32), os.urandom(24)
    sealed = nacl.secret.SecretBox(_scrypt(passphrase, salt, SCRYPT)).encrypt(der, nonce)
    document = json.dumps({
        "kdf": {"name": "scrypt", "params": SCRYPT, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(sealed.ciphertext)}).encode()
    body = base64.encodebytes(document).decode()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"-----BEGIN {PRIVATE_PEM}-----\n{body}-----END {PRIVATE_PEM}-----\n")
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: Path, passphrase: bytes):
    """The key in ``path``: one error naming the file when it is not one, or the passphrase is
    wrong (the secret is never shown)."""
    import nacl.exceptions
    import nacl.secret
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the signing key ({type(exc).__name__})") from None
    for kind in PRIVATE_PEMS:
        begin, end = f"-----BEGIN {kind}-----", f"-----END {kind}-----"
        if begin in text and end in text:
            body = text.split(begin, 1)[1].split(end, 1)[0]
            break
    else:
        raise InputError(f"{path} is not a signing key (no {PRIVATE_PEM} block)",
                         hint="make one with: devbox-build generate-key-pair")
    try:
        document = json.loads(base64.b64decode(body))
        params = document["kdf"]["params"]
        box_key = _scrypt(passphrase, base64.b64decode(document["kdf"]["salt"]), params)
        der = nacl.secret.SecretBox(box_key).decrypt(
            base64.b64decode(document["ciphertext"]),
            base64.b64decode(document["cipher"]["nonce"]))
    except nacl.exceptions.CryptoError:
        raise InputError(f"{path}: the passphrase does not open this key",
                         hint="DEVBOX_SIGNING_PASSPHRASE holds the passphrase") from None
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: the signing key is damaged (its block does not decode)") \
            from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{path}: not an ECDSA key")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the public key ({type(exc).__name__})") from None
    except ValueError:
        raise InputError(f"{path} is not a public key (a PUBLIC KEY PEM block)",
                         hint="the .pub file generate-key-pair wrote beside the .key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"{path}: not an ECDSA public key")
    return key


def _sign(key, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _valid(public_key, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def simple_signing(repository: str, digest: str) -> bytes:
    """The payload a signature covers: the repository (``HOST/path``) and the manifest digest."""
    return json.dumps({
        "critical": {"identity": {"docker-reference": repository},
                     "image": {"docker-manifest-digest": digest},
                     "type": SIGNATURE_TYPE},
        "optional": None}, separators=(",", ":")).encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what an envelope's signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def provenance(manifest: dict, base_id: str | None) -> dict:
    """The SLSA provenance v1 predicate of a devbox image, from its manifest (manifest.read)."""
    dependencies = [{"uri": f"lock:{name}", "digest": {"sha256": digest}}
                    for name, digest in sorted((manifest.get("locks") or {}).items())]
    base = {"uri": f"docker-image:{manifest['base']}"}
    if base_id:
        base["digest"] = {"sha256": base_id.removeprefix("sha256:")}
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"spec": manifest.get("spec"),
                                   "variant": manifest.get("variant"),
                                   "platform": manifest.get("platform")},
            "internalParameters": {"content_hash": manifest.get("content_hash")},
            "resolvedDependencies": [base, *dependencies],
        },
        "runDetails": {"builder": {"id": BUILDER,
                                   "version": {"devbox-build": manifest.get("tool_version")}}},
    }


def statement(repository: str, digest: str, predicate: dict) -> bytes:
    algorithm, _, value = digest.partition(":")
    return json.dumps({"_type": STATEMENT,
                       "subject": [{"name": repository, "digest": {algorithm: value}}],
                       "predicateType": SLSA_PROVENANCE, "predicate": predicate},
                      separators=(",", ":"), sort_keys=True).encode()


def _attach(registry: Registry, reference: Reference, digest: str, suffix: str,
            layer: dict, data: bytes, replaces) -> None:
    """Adds ``layer`` (its blob ``data``) to the artifact tagged ``sha256-<hex>.<suffix>``,
    made when missing, in place of the layers ``replaces(layer, blob)`` says it supersedes
    (this key's own earlier one: signing again adds nothing twice)."""
    tag = digest.replace(":", "-") + "." + suffix
    found = registry.manifest(reference.repository, tag)
    layers = json.loads(found[1]).get("layers", []) if found else []
    layers = [old for old in layers if not replaces(old, _blob(registry, reference, old))]
    layers.append({**layer, **registry.put_blob(reference.repository, data)})
    config = json.dumps({"architecture": "", "os": "", "config": {},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [item["digest"] for item in layers]}},
                        separators=(",", ":")).encode()
    registry.put_manifest(reference.repository, tag, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, **registry.put_blob(reference.repository, config)},
        "layers": layers})


def _signed_payload(layer: dict, blob: bytes, public_key) -> bytes | None:
    """A signature layer's payload, when ``public_key`` signed it; else None."""
    signature = (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
    if layer.get("mediaType") != SIMPLE_SIGNING or not signature:
        return None
    try:
        return blob if _valid(public_key, base64.b64decode(signature), blob) else None
    except ValueError:
        return None


def _claims(payload: bytes) -> tuple | None:
    """What a simple-signing payload claims: (its type, the digest, the repository)."""
    try:
        critical = json.loads(payload)["critical"]
        return (critical["type"], critical["image"]["docker-manifest-digest"],
                critical["identity"]["docker-reference"])
    except (ValueError, KeyError, TypeError):
        return None


def _signed_statement(layer: dict, blob: bytes, public_key) -> dict | None:
    """An attestation layer's in-toto statement, when ``public_key`` signed its envelope."""
    if layer.get("mediaType") != DSSE:
        return None
    try:
        envelope = json.loads(blob)
        body = base64.b64decode(envelope["payload"])
        if envelope["payloadType"] != IN_TOTO or not any(
                _valid(public_key, base64.b64decode(s["sig"]), pae(IN_TOTO, body))
                for s in envelope["signatures"]):
            return None
        return json.loads(body)
    except (ValueError, KeyError, TypeError):
        return None


def sign(ref: str, key, predicate: dict | None) -> str:
    """Signs the image ``ref`` names in its registry (and attaches ``predicate`` as its
    provenance); the digest signed."""
    registry, reference, digest = resolve(ref)
    public_key = key.public_key()
    payload = simple_signing(reference.name, digest)
    _attach(registry, reference, digest, "sig",
            {"mediaType": SIMPLE_SIGNING,
             "annotations": {SIGNATURE_ANNOTATION: _b64(_sign(key, payload))}}, payload,
            lambda old, blob: _signed_payload(old, blob, public_key) == payload)
    if predicate is not None:
        body = statement(reference.name, digest, predicate)
        envelope = json.dumps({"payloadType": IN_TOTO, "payload": _b64(body),
                               "signatures": [{"keyid": "",
                                               "sig": _b64(_sign(key, pae(IN_TOTO, body)))}]},
                              separators=(",", ":")).encode()
        _attach(registry, reference, digest, "att",
                {"mediaType": DSSE, "annotations": {SIGNATURE_ANNOTATION: "",
                                                    "predicateType": SLSA_PROVENANCE}}, envelope,
                lambda old, blob: _signed_statement(old, blob, public_key) is not None)
    return digest


@dataclass(frozen=True)
class Verified:
    ref: str
    digest: str
    pinned: str  # HOST/path@sha256:...: what runs exactly what was signed
    provenance: dict | None


def _blob(registry: Registry, reference: Reference, layer: dict) -> bytes:
    """A signature's or attestation's layer blob; b"" when the registry cannot give it (a
    layer that does not verify, like any other damage: the image is then not verified)."""
    try:
        return registry.blob(reference.repository, str(layer.get("digest")))
    except RegistryError:
        return b""


def _layers(registry: Registry, reference: Reference, digest: str, suffix: str) -> list:
    found = registry.manifest(reference.repository, digest.replace(":", "-") + "." + suffix)
    if found is None:
        return []
    try:
        return json.loads(found[1]).get("layers") or []
    except ValueError:
        return []


def verify(ref: str, public_key, want_provenance: bool = True) -> Verified:
    """The image ``ref`` names, verified: a signature by ``public_key`` over its digest and
    repository, and (``want_provenance``) a provenance statement signed by it whose subject is
    that digest. Anything else is :class:`NotVerified`, saying what is missing."""
    registry, reference, digest = resolve(ref)
    wanted = (SIGNATURE_TYPE, digest, reference.name)
    for layer in _layers(registry, reference, digest, "sig"):
        payload = _signed_payload(layer, _blob(registry, reference, layer), public_key)
        if payload and _claims(payload) == wanted:
            break
    else:
        raise NotVerified(f"{ref} ({digest}) has no signature by this key",
                          hint="sign it: devbox-build sign REF --key KEY (or release --push "
                               "--sign-key KEY)")
    found = None
    algorithm, _, value = digest.partition(":")
    for layer in _layers(registry, reference, digest, "att") if want_provenance else []:
        document = _signed_statement(layer, _blob(registry, reference, layer), public_key) or {}
        if (document.get("predicateType") == SLSA_PROVENANCE and any(
                subject.get("digest", {}).get(algorithm) == value
                for subject in document.get("subject", []))):
            found = document["predicate"]
            break
    if want_provenance and found is None:
        raise NotVerified(f"{ref} ({digest}) is signed but has no provenance signed by this key",
                          hint="sign it again with devbox-build sign, which attaches one")
    return Verified(ref, digest, reference.at(digest), found)


def verify_images(images, public_key_path: Path) -> dict[str, str]:
    """For a target that runs only signed images: each image as REPOSITORY@DIGEST, by ``image.ref``
    (checks.image.ImageUnderTest, a reference that names its registry). The engine's copy must
    be the image the registry holds (the one the target's checks looked at); one NotVerified
    lists every image that fails."""
    public_key = load_public_key(public_key_path)
    digests, problems = {}, []
    for image in images:
        try:
            verified = verify(image.ref, public_key, want_provenance=False)
        except NotVerified as exc:
            problems.append(str(exc))
            continue
        if verified.pinned not in (image.attrs.get("RepoDigests") or []):
            problems.append(f"{image.ref}: this engine's image is not the one its registry "
                            f"holds ({verified.digest}): docker pull {verified.pinned}")
            continue
        digests[image.ref] = verified.pinned
    if problems:
        raise NotVerified(f"not signed by {public_key_path}:\n  " + "\n  ".join(problems),
                          hint="sign them (devbox-build sign REF --key KEY), or leave out "
                               "--verify-key")
    return digests
