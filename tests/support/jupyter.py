"""The Jupyter messaging protocol as a client speaks it on a kernel's websocket channel."""

from __future__ import annotations

import json
import uuid


def execute_request(code: str) -> tuple[str, str]:
    """An execute_request for ``code``: its msg_id (replies carry it as their parent's) and the
    frame to send."""
    msg_id = uuid.uuid4().hex
    return msg_id, json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    })
