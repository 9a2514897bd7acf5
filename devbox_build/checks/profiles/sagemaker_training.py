"""sagemaker-training: `docker run -v JOB:/opt/ml IMAGE train` behaves like a SageMaker job.

Each job gets a fresh volume at /opt/ml, root-owned as SageMaker mounts it, filled through the
engine (no host folder is shared, so this also works against a remote engine). Every case runs as
root and as the image's default user: SageMaker documents neither as the rule.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

TRAIN = b"""\
import argparse, os, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, required=True)
args = parser.parse_args()
rows = pathlib.Path(os.environ["SM_CHANNEL_TRAIN"], "data.csv").read_text().split()
model = pathlib.Path(os.environ["SM_MODEL_DIR"], "model.json")
model.write_text('{"epochs": %d, "rows": %d}' % (args.epochs, len(rows)))
print("trained")
"""
FAILING = b"""\
import sys
print("loading data")
sys.exit("training diverged: loss is NaN at epoch 2")
"""
SLOW = b"""\
import os, pathlib, signal, sys, time
def checkpoint(*_):
    pathlib.Path(os.environ["SM_MODEL_DIR"], "checkpoint").write_text("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, checkpoint)
print("training", flush=True)
time.sleep(600)
"""
USERS = {"image-user": None, "root": "0"}


def job_files(program: bytes) -> dict[str, bytes]:
    return {
        "code/train.py": program,
        "input/config/hyperparameters.json": json.dumps({"epochs": "3"}).encode(),
        "input/config/inputdataconfig.json": json.dumps({"train": {}}).encode(),
        "input/data/train/data.csv": b"1,2\n3,4\n5,6\n",
    }


class Job:
    """A training container with its /opt/ml volume; both removed on exit."""

    def __init__(self, image, program: bytes, user: str | None):
        self.engine = image.engine
        self.volume = self.engine.create_volume(f"devbox-check-ml-{uuid.uuid4().hex[:12]}")
        self.id = self.engine.create(image.ref, ["train"], user=user,
                                     environment={"SAGEMAKER_PROGRAM": "train.py"},
                                     volumes={self.volume: "/opt/ml"})
        self.engine.copy_into(self.id, "/opt/ml", job_files(program))
        self.engine.start_created(self.id)

    def outputs(self, path: str) -> dict[str, bytes]:
        return self.engine.copy_out(self.id, f"/opt/ml/{path}")

    def close(self) -> None:
        self.engine.remove(self.id)
        self.engine.remove_volume(self.volume)


@pytest.fixture
def run_job(image):
    jobs: list[Job] = []

    def run(program: bytes, user: str | None) -> Job:
        jobs.append(Job(image, program, user))
        return jobs[-1]

    yield run
    for job in jobs:
        job.close()


@pytest.mark.parametrize("user", USERS)
def test_training_job_writes_the_model(run_job, user):
    """`train` runs /opt/ml/code/$SAGEMAKER_PROGRAM with hyperparameters and channels, and the
    model lands in /opt/ml/model"""
    job = run_job(TRAIN, USERS[user])
    code = job.engine.wait(job.id, timeout=120)
    logs = job.engine.logs(job.id)
    assert code == 0, f"train exited {code}:\n{logs[-1500:]}"
    model = job.outputs("model").get("model.json")
    assert model is not None, f"no /opt/ml/model/model.json:\n{logs[-1500:]}"
    assert json.loads(model) == {"epochs": 3, "rows": 3}, model


@pytest.mark.parametrize("user", USERS)
def test_failing_job_leaves_its_reason(run_job, user):
    """a failing program makes `train` exit non-zero and write /opt/ml/output/failure"""
    job = run_job(FAILING, USERS[user])
    code = job.engine.wait(job.id, timeout=120)
    assert code != 0, "a failing training program ended with exit status 0"
    failure = job.outputs("output/failure").get("failure", b"").decode()
    assert "loss is NaN" in failure, f"/opt/ml/output/failure says {failure!r}"


def test_stop_reaches_the_training_program(run_job):
    """`docker stop` passes SIGTERM to the training program, which can checkpoint and exit"""
    job = run_job(SLOW, None)
    deadline = time.monotonic() + 60
    while "training" not in job.engine.logs(job.id) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    code = job.engine.stop(job.id, timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 8, f"docker stop took {elapsed:.1f} s: SIGTERM did not reach the program"
    assert code == 0, f"train exited {code} after SIGTERM:\n{job.engine.logs(job.id)[-1500:]}"
    assert "checkpoint" in job.outputs("model"), "the program's SIGTERM handler did not run"
