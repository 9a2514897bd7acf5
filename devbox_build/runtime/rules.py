"""The idle watcher's rules: one reader and one validation for the spec (host) and the image.

``[idle]`` in image.toml is checked by :func:`validate` when the spec loads, and the image's
watcher reads ``/etc/devbox/idle.toml`` and ``DEVBOX_IDLE_*`` through :func:`load_rules`, so a
value the watcher would refuse never gets into an image.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from . import contract

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
OFF = ("0", "off", "never", "")


class RuleError(Exception):
    """A rule that cannot be read: printed as one line, exit status 2."""


def duration(text: object, name: str) -> float:
    """Seconds from '90', '90s', '30m', '2h', '1h30m'; '0', 'off' or 'never' is 0 (never)."""
    value = str(text).strip().lower()
    if value in OFF:
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise RuleError(f"{name}: {text!r} is not a duration (like '90s', '30m', '2h')")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def percent(text: object, name: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value <= 100:
        raise RuleError(f"{name}: {text!r} is not a percentage from 0 to 100")
    return value


@dataclass(frozen=True)
class Rules:
    timeout: float = duration(contract.IDLE_DEFAULTS["timeout"], "timeout")  # 0: never
    action: str = str(contract.IDLE_DEFAULTS["action"])
    interval: float = duration(contract.IDLE_DEFAULTS["interval"], "interval")
    warn_before: float = duration(contract.IDLE_DEFAULTS["warn_before"], "warn_before")
    cpu_percent: float = float(contract.IDLE_DEFAULTS["cpu_percent"])  # of one core
    gpu_percent: float = float(contract.IDLE_DEFAULTS["gpu_percent"])
    io_bytes: int = 65536  # read or written by one process in the interval
    ignore: tuple = ()

    @property
    def warn_at(self) -> float:
        """Idle seconds at which the warning goes out: warn_before ahead, at most half-way."""
        return self.timeout - min(self.warn_before, self.timeout / 2)

    @property
    def acting(self) -> bool:
        return self.timeout > 0 and self.action != "none"


FIELDS = tuple(Rules.__dataclass_fields__)
_ENVIRONMENT_KEYS = ("timeout", "action", "interval", "warn_before", "cpu_percent", "gpu_percent")
IGNORE_VARIABLE = "DEVBOX_IDLE_IGNORE"
# Each rule a container's environment may override, and the variable that does.
VARIABLES = {key: f"DEVBOX_IDLE_{key.upper()}" for key in _ENVIRONMENT_KEYS}


def validate(table: dict, where: str = "[idle]") -> Rules:
    """Rules from a table of raw values (the spec's [idle], the image's file); one RuleError
    naming the key for the first value that is wrong."""
    _known(table, where)
    sources = {key: (f"{where}: key '{key}'", value) for key, value in table.items()
               if key not in ("ignore", "io_bytes")}
    return _rules(sources, list(table.get("ignore", [])), table.get("io_bytes"))


def _known(table: dict, where: str) -> None:
    unknown = set(table) - set(FIELDS)
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _rules(sources: dict, ignore: list, io_bytes: object) -> Rules:
    values: dict = {}
    for key in ("timeout", "interval", "warn_before"):
        if key in sources:
            values[key] = duration(sources[key][1], sources[key][0])
    for key in ("cpu_percent", "gpu_percent"):
        if key in sources:
            values[key] = percent(sources[key][1], sources[key][0])
    if "action" in sources:
        where, action = sources["action"]
        if action not in contract.IDLE_ACTIONS:
            raise RuleError(f"{where}: {action!r} is not one of "
                            f"{', '.join(contract.IDLE_ACTIONS)}")
        values["action"] = action
    if "interval" in sources and values["interval"] <= 0:
        raise RuleError(f"{sources['interval'][0]}: the interval must be more than 0 "
                        "(to never act, set the timeout to 'off')")
    if io_bytes is not None:
        try:
            values["io_bytes"] = int(io_bytes)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise RuleError(f"key 'io_bytes': {io_bytes!r} is not a number of bytes") from None
    return Rules(**values, ignore=tuple(str(name) for name in ignore))


def read_rules_file(path: str = contract.IDLE_RULES) -> dict:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RuleError(f"{path}: {exc.strerror}") from None
    try:
        import tomllib
    except ImportError:  # a system Python older than 3.11: the file is flat, read it plainly
        return _flat_toml(data.decode(errors="replace"), path)
    try:
        table = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RuleError(f"{path}: {exc}") from None
    return table.get("idle", table)


def _flat_toml(text: str, path: str) -> dict:
    """The file as devbox-build writes it: `key = value` lines whose values are JSON too."""
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        try:
            table[key.strip()] = json.loads(value)
        except ValueError:
            raise RuleError(f"{path}, line {number}: expected key = value") from None
    return table


def load_rules(environ=os.environ, path: str = contract.IDLE_RULES) -> Rules:
    """The rules in force: the image's file, each overridden by its DEVBOX_IDLE_* variable."""
    table = read_rules_file(path)
    _known(table, path)
    sources = {key: (f"{path}: key '{key}'", value) for key, value in table.items()
               if key not in ("ignore", "io_bytes")}
    for key, variable in VARIABLES.items():
        if environ.get(variable, "").strip():
            sources[key] = (variable, environ[variable].strip())
    ignore = list(table.get("ignore", []))
    ignore += [name.strip() for name in environ.get(IGNORE_VARIABLE, "").split(",")
               if name.strip()]
    return _rules(sources, ignore, table.get("io_bytes"))
