"""Training jobs as users submit them: the SageMaker Python SDK itself (v2 `Estimator`, v3
`ModelTrainer`) in local mode with docker-compose, and the exact hyperparameters the SDK sends
the real service, with the submitted code in S3 (moto's S3 in server mode on loopback).

Each SDK lives in its own virtual environment (they cannot share one), made on first use under
~/.cache/devbox-build and kept between runs. The SDKs try to send telemetry; nothing outside
this machine answers, and that must not fail a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import uuid
from pathlib import Path

import pytest

from .conftest import IN_CI, TINY
from .support.aws import MotoServer

pytestmark = pytest.mark.engine

SDKS = {"v2": "sagemaker==2.257.7", "v3": "sagemaker==3.27.0"}
CACHE = Path.home() / ".cache" / "devbox-build"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
TRAIN = """\
import argparse, json, os, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
args, _ = parser.parse_known_args()
rows = pathlib.Path(os.environ["SM_CHANNEL_TRAIN"], "data.csv").read_text().split()
import six  # from the submitted requirements.txt, when there is one
model = pathlib.Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"), "model.json")
model.write_text(json.dumps({"epochs": args.epochs, "rows": len(rows)}))
print("trained on", len(rows), "rows")
"""
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(autouse=True)
def removes_what_the_sdk_started(engine):
    """The SDKs' local modes leave their compose containers and network behind: remove, by id,
    every container and network that appeared during the test."""
    containers = {c["Id"] for c in engine.api.containers(all=True)}
    networks = {n["Id"] for n in engine.api.networks()}
    yield
    for container in engine.api.containers(all=True):
        if container["Id"] not in containers:
            engine.remove(container["Id"])
    for network in engine.api.networks():
        if network["Id"] not in networks:
            engine.api.remove_network(network["Id"])


def sdk_python(name: str) -> Path:
    """The Python of a virtual environment with that SDK installed."""
    venv = CACHE / f"sdk-{SDKS[name].replace('==', '-')}"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", SDKS[name]],
                                capture_output=True, text=True)
        if result.returncode != 0:
            message = f"cannot install {SDKS[name]}: {result.stderr[-1500:]}"
            if IN_CI:
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
        (venv / ".ready").touch()
    return python


@pytest.fixture
def source(tmp_path) -> Path:
    """An SDK user's source_dir: the program and a hash-locked requirements.txt."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN)
    six = next(text for name, text in _tiny_pins().items() if name == "six")
    (folder / "requirements.txt").write_text(six)
    return folder


def _tiny_pins() -> dict[str, str]:
    from devbox_build import locking

    return {name: pin.text for name, pin in
            locking.read_pins(TINY / "locks" / "linux-amd64" / "pip.txt").items()}


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2\n3,4\n5,6\n")
    return folder


def run_sdk(name: str, script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}-job.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([str(sdk_python(name)), str(path)], cwd=tmp_path,
                          env={**os.environ, **FAKE_AWS, **env}, capture_output=True,
                          text=True, timeout=900)


def model_in(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("model.json"))


# -- SDK v2: Estimator with entry_point / source_dir, local mode -------------------------------


def test_v2_estimator_entry_point_in_local_mode(default_images, source, data, tmp_path):
    image = default_images["cpu"].content_tag
    result = run_sdk("v2", f"""
        from sagemaker.estimator import Estimator
        from sagemaker.local import LocalSession
        session = LocalSession()
        session.config = {{"local": {{"local_code": True}}}}
        estimator = Estimator(
            image_uri={image!r}, role={ROLE!r}, instance_count=1, instance_type="local",
            entry_point="train.py", source_dir={str(source)!r}, hyperparameters={{"epochs": 3}},
            output_path="file://{tmp_path}/output", sagemaker_session=session)
        estimator.fit({{"train": "file://{data}"}})
        print("MODEL", estimator.model_data)
    """, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    archive = next((tmp_path / "output").rglob("model.tar.gz"))
    # Channels arrive as the host user's 0700 copies (root here); the image's user read them.
    assert model_in(archive) == {"epochs": 3, "rows": 3}


MULTI_HOST = """\
import json, os, pathlib, time
host = os.environ["SM_CURRENT_HOST"]
if not host.startswith("algo-1"):  # local mode names them algo-1-<id>, algo-2-<id>
    time.sleep(8)  # the other host's program is slower: algo-1 must not end the job first
pathlib.Path(os.environ["SM_MODEL_DIR"], f"{host}.json").write_text(json.dumps({"host": host}))
print("trained on", host)
"""


def test_v2_two_instances_in_local_mode_each_host_runs_to_its_end(default_images, data,
                                                                  tmp_path):
    """Local mode runs the hosts with docker-compose, which stops every container when the first
    one exits: the image's hosts wait for each other, so the slower one finishes too."""
    image = default_images["cpu"].content_tag
    folder = tmp_path / "multi"
    folder.mkdir()
    (folder / "train.py").write_text(MULTI_HOST)
    result = run_sdk("v2", f"""
        from sagemaker.estimator import Estimator
        from sagemaker.local import LocalSession
        session = LocalSession()
        session.config = {{"local": {{"local_code": True}}}}
        estimator = Estimator(
            image_uri={image!r}, role={ROLE!r}, instance_count=2, instance_type="local",
            entry_point="train.py", source_dir={str(folder)!r},
            output_path="file://{tmp_path}/output", sagemaker_session=session)
        estimator.fit({{"train": "file://{data}"}})
    """, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "trained on algo-2" in output and "every host finished" in output, output[-4000:]
    with tarfile.open(next((tmp_path / "output").rglob("model.tar.gz"))) as tar:
        names = sorted(name.split("-")[0] + "-" + name.split("-")[1] for name in tar.getnames()
                       if name.startswith("algo-"))
    assert names == ["algo-1", "algo-2"], names


# -- SDK v2: what the real service gets (code in S3), against moto's S3 ------------------------


@pytest.fixture
def moto_s3():
    """moto's server on loopback (tests/support/aws.py)."""
    with MotoServer() as server:
        yield server.url


def test_v2_code_submitted_to_s3_runs_as_on_the_service(engine, default_images, source, data,
                                                         moto_s3, tmp_path):
    image = default_images["cpu"].content_tag
    # The SDK uploads source_dir to S3 and computes the hyperparameters it would send to
    # CreateTrainingJob (sagemaker_submit_directory = s3://.../sourcedir.tar.gz, JSON-encoded).
    result = run_sdk("v2", f"""
        import json, boto3, sagemaker
        from sagemaker.estimator import Estimator
        boto3.client("s3").create_bucket(Bucket="devbox-sdk-test")
        session = sagemaker.Session(boto_session=boto3.Session(), default_bucket="devbox-sdk-test")
        estimator = Estimator(
            image_uri={image!r}, role={ROLE!r}, instance_count=1, instance_type="ml.m5.large",
            entry_point="train.py", source_dir={str(source)!r}, hyperparameters={{"epochs": 4}},
            sagemaker_session=session)
        estimator._prepare_for_training(job_name="devbox-sdk-test")
        print("HYPERPARAMETERS " + json.dumps(estimator.hyperparameters()))
    """, tmp_path, AWS_ENDPOINT_URL=moto_s3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    hyperparameters = json.loads(result.stdout.split("HYPERPARAMETERS ", 1)[1].splitlines()[0])
    assert json.loads(hyperparameters["sagemaker_submit_directory"]).startswith("s3://")
    assert json.loads(hyperparameters["sagemaker_program"]) == "train.py"

    volume = engine.create_volume(f"devbox-test-ml-{uuid.uuid4().hex[:12]}")
    container = engine.api.create_container(
        image, command=["train"], environment={**FAKE_AWS, "AWS_ENDPOINT_URL": moto_s3},
        host_config=engine.api.create_host_config(
            network_mode="host", binds={volume: {"bind": "/opt/ml", "mode": "rw"}}))["Id"]
    try:
        engine.copy_into(container, "/opt/ml", {
            "input/config/hyperparameters.json": json.dumps(hyperparameters).encode(),
            "input/config/inputdataconfig.json": b'{"train": {}}',
            "input/data/train/data.csv": (data / "data.csv").read_bytes(),
        })
        engine.start_created(container)
        code = engine.wait(container, timeout=600)
        logs = engine.logs(container)
        assert code == 0, logs
        assert "hash-checked" in logs and "trained on 3 rows" in logs, logs
        model = engine.copy_out(container, "/opt/ml/model")
        assert json.loads(model["model.json"]) == {"epochs": 4, "rows": 3}
    finally:
        engine.remove(container)
        engine.remove_volume(volume)


# -- SDK v3: ModelTrainer in LOCAL_CONTAINER mode ----------------------------------------------


@pytest.mark.parametrize("with_source_code", [True, False], ids=["source-code", "no-command"])
def test_v3_model_trainer_in_a_local_container(default_images, source, data, tmp_path,
                                               with_source_code):
    image = default_images["cpu"].content_tag
    # The compose project is named after this folder: a name of its own.
    root = tmp_path / f"job{uuid.uuid4().hex[:8]}"
    root.mkdir()
    if not with_source_code:
        # Without SourceCode the SDK starts the image with no command at all (the service
        # passes `train`): the entrypoint must see a training job. The program is named by
        # SAGEMAKER_PROGRAM, here the copy that came in with the channel.
        (data / "train.py").write_text(TRAIN.replace("import six", "pass"))
    result = run_sdk("v3", f"""
        import glob, json, os
        from sagemaker.train import ModelTrainer
        from sagemaker.train.configs import Compute, InputData, SourceCode
        from sagemaker.train.model_trainer import Mode
        trainer = ModelTrainer(
            training_image={image!r}, role={ROLE!r},
            compute=Compute(instance_type="local_cpu", instance_count=1),
            training_mode=Mode.LOCAL_CONTAINER, local_container_root={str(root)!r},
            hyperparameters={{"epochs": 5}},
            {"source_code=SourceCode(source_dir=" + repr(str(source)) + ", entry_script='train.py')," if with_source_code else
             "environment={'SAGEMAKER_PROGRAM': '/opt/ml/input/data/train/train.py'},"}
        )
        trainer.train(input_data_config=[InputData(channel_name="train",
                                                   data_source={str(data)!r})], wait=True)
        print("MODELS", glob.glob({str(root)!r} + "/**/model*", recursive=True))
    """, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    models = result.stdout.split("MODELS ", 1)[1]
    assert "model" in models, result.stdout[-3000:]
    found = [json.loads(p.read_text()) for p in root.rglob("model.json")]
    if not found:
        found = [model_in(p) for p in root.rglob("model.tar.gz")]
    assert {"epochs": 5, "rows": 3} in found, (found, result.stdout[-3000:])
