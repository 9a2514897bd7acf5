"""Notebooks as users run them, with real clients, on the default image: inline figures through
the Jupyter server (laptop and Studio modes) and with nbconvert; headless scripts and training
jobs still save figures; pandas writes Parquet.

The server client speaks the Jupyter protocol itself (REST to start a kernel, the kernel's
websocket channel for execute_request), as VS Code's and JupyterLab's clients do.
"""

from __future__ import annotations

import http.cookiejar
import json
import secrets
import time
import urllib.request
import uuid

import pytest
import websocket

from devbox_build.checks.image import ImageUnderTest, running

from .support.jupyter import execute_request

pytestmark = pytest.mark.engine

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()\n"


def execute_through_the_server(base: str, code: str, token: str | None) -> list[dict]:
    """Start a kernel through the server's REST API, run ``code`` on its websocket channel and
    return the iopub messages up to the kernel's idle state."""
    headers = {"Authorization": f"token {token}"} if token else {}
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPCookieProcessor(cookies))
    if not token:
        # As JupyterLab's frontend does behind Studio's proxy: the page sets the _xsrf cookie,
        # and every POST sends it back as X-XSRFToken.
        opener.open(f"http://{base}lab", timeout=60).close()
        headers["X-XSRFToken"] = next(c.value for c in cookies if c.name == "_xsrf")
    request = urllib.request.Request(f"http://{base}api/kernels", data=b"{}", method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    with opener.open(request, timeout=60) as response:
        kernel = json.load(response)["id"]
    cookie = "; ".join(f"{c.name}={c.value}" for c in cookies)
    channel = websocket.create_connection(
        f"ws://{base}api/kernels/{kernel}/channels" + (f"?token={token}" if token else ""),
        timeout=120, http_proxy_host=None, http_no_proxy=["127.0.0.1"],
        **({"cookie": cookie} if cookie else {}))
    try:
        msg_id, frame = execute_request(code)
        channel.send(frame)
        replies = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = json.loads(channel.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            replies.append(message)
            if (message["msg_type"] == "status"
                    and message["content"]["execution_state"] == "idle"):
                return replies
        raise AssertionError(f"the kernel did not finish: {replies}")
    finally:
        channel.close()


@pytest.mark.parametrize("mode", ["laptop", "studio"])
def test_a_notebook_cell_shows_an_inline_figure_through_the_server(engine, default_images, mode):
    image = ImageUnderTest.load(engine, default_images["cpu"].content_tag)
    token = secrets.token_hex(16) if mode == "laptop" else None
    environment = ({"JUPYTER_TOKEN": token} if token
                   else {"SAGEMAKER_APP_TYPE": "JupyterLab"})
    with running(image, environment=environment, publish=[8888]) as container:
        prefix = "/" if token else "/jupyterlab/default/"
        status, _ = container.get(f"{prefix}api/status",
                                  headers={"Authorization": f"token {token}"} if token else None)
        assert status == 200
        base = f"127.0.0.1:{engine.published_port(container.id, 8888)}{prefix}"
        replies = execute_through_the_server(base, PLOT, token)
    errors = [m["content"] for m in replies if m["msg_type"] == "error"]
    assert not errors, errors
    figures = [m for m in replies if m["msg_type"] == "display_data"
               and "image/png" in m["content"]["data"]]
    assert figures, [m["msg_type"] for m in replies]


def test_nbconvert_execute_keeps_the_inline_figure(engine, default_images):
    notebook = json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "plot", "metadata": {},
                   "outputs": [], "source": PLOT}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5})
    script = (
        f"cd /tmp && printf '%s' '{notebook}' > plot.ipynb"
        " && jupyter nbconvert --to notebook --execute plot.ipynb --output done.ipynb >/dev/null 2>&1"
        " && python -c \"import json; nb = json.load(open('done.ipynb'));"
        " print([k for o in nb['cells'][0]['outputs'] for k in o.get('data', {})])\""
    )
    code, out = engine.run(default_images["cpu"].content_tag, ["bash", "-c", script])
    assert code == 0, out
    assert "image/png" in out, out


def test_headless_scripts_and_training_jobs_still_save_figures(engine, default_images):
    ref = default_images["cpu"].content_tag
    code, out = engine.run(ref, ["python", "-c", (
        "import matplotlib, matplotlib.pyplot as plt, os;"
        "plt.plot([1, 2]); plt.savefig('/tmp/f.png');"
        "print(matplotlib.get_backend(), os.path.getsize('/tmp/f.png') > 0)")])
    assert code == 0 and out.split()[-2:] == ["agg", "True"], out
    # A training job: the runner gives it a headless backend whatever the environment says.
    program = ("import matplotlib, matplotlib.pyplot as plt, os\n"
               "plt.plot([1, 2]); plt.savefig(os.path.join(os.environ['SM_MODEL_DIR'], 'f.png'))\n"
               "print('backend', matplotlib.get_backend())\n")
    volume = engine.create_volume(f"devbox-test-ml-{uuid.uuid4().hex[:12]}")
    container = engine.create(ref, ["train"], environment={"SAGEMAKER_PROGRAM": "plot.py"},
                              volumes={volume: "/opt/ml"})
    try:
        engine.copy_into(container, "/opt/ml", {"code/plot.py": program.encode()})
        engine.start_created(container)
        assert engine.wait(container, timeout=120) == 0, engine.logs(container)
        assert "backend agg" in engine.logs(container).lower()
    finally:
        engine.remove(container)
        engine.remove_volume(volume)


def test_pandas_writes_and_reads_parquet(engine, default_images):
    code, out = engine.run(default_images["cpu"].content_tag, ["python", "-c", (
        "import pandas as pd; pd.DataFrame({'x': [1, 2, 3]}).to_parquet('/tmp/t.parquet');"
        "print(pd.read_parquet('/tmp/t.parquet').x.sum())")])
    assert code == 0 and out.strip().endswith("6"), out
