"""devbox-healthcheck, the image's HEALTHCHECK: is the IDE server this container started
answering?

The entrypoint records the server's URL when it starts the IDE (laptop or Studio mode, so the base
URL differs). A container that runs something else (a training job, a shell) has no server and
is healthy by definition. `<base>api` answers without a token in both modes. Proxies are bypassed:
a corporate HTTP_PROXY must not see, or break, a request to the container itself.
"""

from __future__ import annotations

import json
import sys
import urllib.request

from . import contract
from .log import account_housekeeping


def main(argv: list) -> int:
    try:
        return check()
    finally:
        account_housekeeping(contract.HOUSEKEEPING_CPU)


def check() -> int:
    try:
        with open(contract.IDE_MARKER) as marker:
            url = json.load(marker)["url"] + "api"
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{contract.IDE_MARKER}: {exc}", file=sys.stderr)
        return 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
