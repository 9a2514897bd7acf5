"""What changed between two built images: packages per kind, layers, and the facts a user or a
platform relies on. Pure functions over what ``inspect`` reads (the manifest, the engine's layer
list), so the same comparison serves the terminal, ``--json`` and a pull request's markdown.

    compare(a, b)   {"a", "b", "packages": {kind: {added, removed, changed}}, "layers", "facts"}
    markdown(diff)  the comparison as a pull request comment
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

KINDS = ("apt", "conda", "pip")
# Labels that differ on every build, whatever changed.
VOLATILE_LABELS = ("org.opencontainers.image.created", "devbox.content-hash",
                   "org.opencontainers.image.version")  # a release's label, not its content
SHOWN_AS_FACTS = ("devbox.cuda.version", "devbox.cuda.min-driver")


@dataclass(frozen=True)
class Side:
    """One image as the comparison needs it."""

    ref: str
    manifest: dict  # manifest.read_manifest's document
    layers: list[tuple[str, int, str]]  # Engine.layers: (diff id, bytes, step)
    config: dict  # the image's Config (entrypoint, user, env)


def _versions(manifest: dict, kind: str) -> dict[str, str]:
    return {p["name"]: p["version"] for p in manifest.get("packages", {}).get(kind) or []}


def sizes(manifest: dict, kind: str) -> dict[str, int]:
    """Installed bytes per package (0 where an older manifest did not record them)."""
    return {p["name"]: p.get("size") or 0 for p in manifest.get("packages", {}).get(kind) or []}


def growth(a: dict, b: dict) -> list[tuple[str, str, int]]:
    """(kind, package, bytes it grew) from manifest ``a`` to ``b``, most grown first; an added
    package grows by its size, a removed one shrinks by it."""
    grown = []
    for kind in KINDS:
        old, new = sizes(a, kind), sizes(b, kind)
        for name in old.keys() | new.keys():
            delta = new.get(name, 0) - old.get(name, 0)
            if delta:
                grown.append((kind, name, delta))
    return sorted(grown, key=lambda item: (-item[2], item[0], item[1]))


def bump(old: str, new: str, kind: str = "pip") -> str:
    """major, minor or patch (any later part of the release), or "other" for versions that do
    not compare by their parts. Debian's ``[epoch:]upstream[-revision]``: a new revision of the
    same upstream version is a patch, an upstream move is judged by its numbers."""
    if kind == "apt":
        (old_epoch, old_up, old_rev), (new_epoch, new_up, new_rev) = map(_debian, (old, new))
        if old_epoch == new_epoch and old_up == new_up:
            return "patch"
        if old_epoch != new_epoch:
            return "major"
        old, new = old_up, new_up
    try:
        before, after = Version(old), Version(new)
    except InvalidVersion:
        return "other"
    if kind == "apt" and (before.pre or after.pre or before.local or after.local):
        return "other"  # upstream letters (tzdata 2025a): not a release number
    a, b = (before.release + (0, 0, 0))[:3], (after.release + (0, 0, 0))[:3]
    if a[0] != b[0] or before.epoch != after.epoch:
        return "major"
    if a[1] != b[1]:
        return "minor"
    return "patch"


def _debian(version: str) -> tuple[str, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return epoch or "0", upstream, revision


def _facts(side: Side) -> dict[str, str]:
    manifest, labels = side.manifest, side.manifest.get("image", {}).get("labels", {})
    user = manifest.get("user") or {}
    return {
        "python": manifest.get("python_version", ""),
        "platform": manifest.get("platform", ""),
        "user": f"{user.get('name', '')} {user.get('uid', '')}:{user.get('gid', '')}".strip(),
        "cuda": labels.get("devbox.cuda.version", ""),
        "min driver": labels.get("devbox.cuda.min-driver", ""),
        "entrypoint": " ".join(side.config.get("Entrypoint") or []),
        "command": " ".join(side.config.get("Cmd") or []),
        **{f"label {key}": value for key, value in labels.items()
           if key not in VOLATILE_LABELS + SHOWN_AS_FACTS},
    }


def compare(a: Side, b: Side) -> dict:
    packages = {}
    for kind in KINDS:
        old, new = _versions(a.manifest, kind), _versions(b.manifest, kind)
        was, now = sizes(a.manifest, kind), sizes(b.manifest, kind)
        packages[kind] = {
            "added": [{"name": n, "version": new[n], "size": now.get(n, 0)}
                      for n in sorted(new.keys() - old.keys())],
            "removed": [{"name": n, "version": old[n], "size": was.get(n, 0)}
                        for n in sorted(old.keys() - new.keys())],
            "changed": [{"name": n, "from": old[n], "to": new[n],
                         "bump": bump(old[n], new[n], kind),
                         "size_change": now.get(n, 0) - was.get(n, 0)}
                        for n in sorted(old.keys() & new.keys()) if old[n] != new[n]],
            "bytes": {"a": sum(was.values()), "b": sum(now.values())},
        }
    held = {diff_id for diff_id, _, _ in a.layers}
    fetched = [(diff_id, size, step) for diff_id, size, step in b.layers if diff_id not in held]
    facts_a, facts_b = _facts(a), _facts(b)
    return {
        "a": a.ref,
        "b": b.ref,
        "packages": packages,
        "layers": {
            "a": len(a.layers), "b": len(b.layers),
            "shared": len(b.layers) - len(fetched),
            # What a machine holding A fetches to run B (uncompressed; a registry sends these
            # layers compressed).
            "to_fetch": len(fetched),
            "bytes_to_fetch": sum(size for _, size, _ in fetched),
            "fetched": [{"diff_id": d, "bytes": size, "step": step} for d, size, step in fetched],
        },
        "facts": [{"fact": key, "a": facts_a.get(key, ""), "b": facts_b.get(key, "")}
                  for key in dict.fromkeys([*facts_a, *facts_b])
                  if facts_a.get(key, "") != facts_b.get(key, "")],
    }


def elided(before: str, after: str, keep: int = 24) -> tuple[str, str]:
    """Two long values with their common start cut to its last ``keep`` characters: what
    differs stays in sight (a label's JSON that gained a key at its end)."""
    common = len(os.path.commonprefix([before, after]))
    if common <= keep * 2:
        return before, after
    cut = common - keep
    return (f"…{before[cut:]}" if before else before), (f"…{after[cut:]}" if after else after)


def counts(diff: dict) -> dict[str, int]:
    return {what: sum(len(diff["packages"][kind][what]) for kind in KINDS)
            for what in ("added", "removed", "changed")}


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def signed(size: int) -> str:
    """A size change: +1.2 MB, -0.3 MB, +4 kB."""
    return f"{size / 1e6:+.1f} MB" if abs(size) >= 100_000 else f"{size / 1e3:+.0f} kB"


def changed(entry: dict) -> bool:
    return bool(entry["added"] or entry["removed"] or entry["changed"])


def _cell(value: str) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ") or "–"


def markdown(diff: dict) -> str:
    """The comparison as a pull request comment (GitHub-flavoured markdown)."""
    total = counts(diff)
    layers = diff["layers"]
    layered = (f"; {layers['shared']} of {layers['b']} layers shared, {layers['to_fetch']} to "
               f"fetch ({_megabytes(layers['bytes_to_fetch'])} uncompressed)"
               if layers["b"] else "")
    lines = [f"### `{diff['a']}` → `{diff['b']}`", "",
             f"{total['added']} added, {total['removed']} removed, {total['changed']} "
             f"changed{layered}.", ""]
    for kind in KINDS:
        entry = diff["packages"][kind]
        if not changed(entry):
            continue
        lines += [f"**{kind}** ({signed(entry['bytes']['b'] - entry['bytes']['a'])})", "",
                  "| package | before | after | change | size |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(p['name'])} | – | {_cell(p['version'])} | added | "
                  f"{signed(p['size'])} |" for p in entry["added"]]
        lines += [f"| {_cell(p['name'])} | {_cell(p['version'])} | – | removed | "
                  f"{signed(-p['size'])} |" for p in entry["removed"]]
        lines += [f"| {_cell(p['name'])} | {_cell(p['from'])} | {_cell(p['to'])} | {p['bump']} | "
                  f"{signed(p['size_change'])} |" for p in entry["changed"]]
        lines.append("")
    if diff["facts"]:
        lines += ["**facts**", "", "| fact | before | after |", "|---|---|---|"]
        for fact in diff["facts"]:
            before, after = elided(fact["a"], fact["b"])
            lines.append(f"| {_cell(fact['fact'])} | {_cell(before)} | {_cell(after)} |")
        lines.append("")
    return "\n".join(lines)
