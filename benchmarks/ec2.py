"""`ec2 up` → the image answering, as far as this machine can measure it, and an estimate for EC2.

    python benchmarks/ec2.py             # 3 rounds
    python benchmarks/ec2.py --rounds 5

Measured here, min / median over the rounds:
  ec2 up (CLI), first        volume created, instance launched, volume attached: boto3 against
                             moto's server on loopback (the AWS side is instant here)
  ec2 up (CLI), again        the same box found by its tags, nothing to do
  ec2 move (CLI)             the other box launched, the first stopped, the volume moved
  boot script, first boot    on a stand-in instance (tests/support/aws.py): blank volume
                             formatted and mounted, the image started with the volume as home,
                             until JupyterLab answers
  boot script, next boot     the same, no format, the container started again
The estimate for real EC2 adds what cannot be measured here: instance start, and the image pull
at the given bandwidth for the image's compressed size (measured: the layers gzipped).

Needs root, a running engine and the default CPU image (scripts/provision.sh).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import header, min_median  # noqa: E402

from devbox_build.engine import Engine  # noqa: E402
from devbox_build.targets.ec2 import load_box, user_data  # noqa: E402
from tests.support.aws import VOLUME_ID, MotoServer, StandInInstance, seed_boxes  # noqa: E402

IMAGE = "devbox/datascience:cpu"
KEY_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbOaQj5DuSdW1pHcUSnlRa4Zy6ZtuazpUq2QQLu3Sv bench"
# Assumptions for the estimate, stated so they can be argued with: instance start (pending →
# running, then the OS and cloud-init until the unit runs) and ECR pull bandwidth in the region.
INSTANCE_START_S = 60.0
PULL_MB_PER_S = 100.0


def cli(env: dict, *args: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "devbox_build.cli", "ec2", *args], env={
        **os.environ, **env}, check=True, capture_output=True)
    return time.monotonic() - started


def moto_round(folder: Path) -> tuple[float, float, float]:
    with MotoServer() as aws:
        boxes = seed_boxes(aws, folder, (ROOT / "boxes.toml").read_text())
        key = ["--public-key", str(folder / "id_ed25519.pub")]
        first = cli(aws.env, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image", *key)
        again = cli(aws.env, "up", "--role", "gpu", "--boxes", str(boxes), "--no-wait-image", *key)
        move = cli(aws.env, "move", "--to", "cpu", "--boxes", str(boxes), *key)
    return first, again, move


def stand_in_round(engine: Engine, folder: Path) -> tuple[float, float]:
    name = f"b{uuid.uuid4().hex[:10]}"
    mount = f"/mnt/devbox-{name}"
    boxes = folder / "boxes.toml"
    boxes.write_text((ROOT / "boxes.toml").read_text().replace(
        'name = "datascience"', f'name = "{name}"').replace(
        "[volume]\n", f'[volume]\nmount_point = "{mount}"\n'))
    script = yaml.safe_load(user_data(load_box(boxes), "cpu", IMAGE, VOLUME_ID, KEY_LINE))[
        "write_files"][0]["content"]
    (folder / "instance").mkdir()
    try:
        with StandInInstance(engine, IMAGE, folder / "instance", mount, script) as instance:
            started = time.monotonic()
            instance.boot()
            first = time.monotonic() - started
            engine.api.stop(f"devbox-{name}", timeout=10)
            started = time.monotonic()
            instance.boot()
            again = time.monotonic() - started
    finally:
        engine.remove(engine.api.inspect_container(f"devbox-{name}")["Id"])
    return first, again


def compressed_mb(engine: Engine) -> float:
    """The image's layers gzipped (what a registry stores and a pull downloads), in MB."""
    total = 0
    stream = engine.api.get_image(IMAGE)
    with tempfile.TemporaryFile() as tar:
        for chunk in stream:
            tar.write(chunk)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            manifest = json.load(archive.extractfile("manifest.json"))
            for layer in manifest[0]["Layers"]:
                counter = _Counter()
                with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=6) as packed:
                    source = archive.extractfile(layer)
                    while block := source.read(1 << 20):
                        packed.write(block)
                total += counter.size
    return total / 1e6


class _Counter:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = Engine.connect()
    moto, boots = [], []
    for _ in range(args.rounds):  # interleaved: each round measures both
        with tempfile.TemporaryDirectory() as scratch:
            moto.append(moto_round(Path(scratch)))
        with tempfile.TemporaryDirectory() as scratch:
            boots.append(stand_in_round(engine, Path(scratch)))

    print(header(args.rounds))
    print(f"| `ec2 up`, first (moto) | {min_median([m[0] for m in moto])} |")
    print(f"| `ec2 up`, again (moto) | {min_median([m[1] for m in moto])} |")
    print(f"| `ec2 move --to cpu` (launch, stop, detach, attach; moto) | "
          f"{min_median([m[2] for m in moto])} |")
    print(f"| boot script, first boot (stand-in, until JupyterLab answers) | {min_median([b[0] for b in boots])} |")
    print(f"| boot script, next boot (stand-in, until JupyterLab answers) | {min_median([b[1] for b in boots])} |")
    size = compressed_mb(engine)
    first_boot = statistics.median(b[0] for b in boots)
    estimate = INSTANCE_START_S + size / PULL_MB_PER_S + first_boot
    print(f"| image, compressed layers | {size:.0f} MB |")
    print(f"| estimate for EC2, first `up` → JupyterLab answering | ≈ {estimate:.0f} s "
          f"({INSTANCE_START_S:.0f} s instance start + {size:.0f} MB at {PULL_MB_PER_S:.0f} MB/s "
          f"+ {first_boot:.0f} s boot script) |")


if __name__ == "__main__":
    main()
