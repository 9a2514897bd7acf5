"""gpu: a CUDA image carries no driver, says what driver it needs, and starts anywhere.

Without a GPU (CI, a laptop) the build-only assertions run and the image must start and report no
device without crashing. With a GPU on the engine's host (the NVIDIA runtime configured) the run
assertions also run: nvidia-smi and the framework see the device.
"""

from __future__ import annotations

import json

import pytest

# Ask the first CUDA framework found how many devices it sees. torch says so itself; for an image
# with only the CUDA runtime wheel, ask libcudart (error 100 is "no device", 35 "no driver").
PROBE = r"""
import ctypes, glob, json, site, sys
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    print(json.dumps({"framework": "torch " + torch.__version__,
                      "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}))
    sys.exit(0)
libraries = [p for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib/libcudart.so*")]
if not libraries:
    print(json.dumps({"framework": None, "devices": 0}))
    sys.exit(0)
cudart = ctypes.CDLL(libraries[0])
count = ctypes.c_int(0)
error = cudart.cudaGetDeviceCount(ctypes.byref(count))
print(json.dumps({"framework": "cudart", "devices": count.value if error == 0 else 0,
                  "error": error}))
"""


@pytest.fixture(scope="module")
def cuda(image):
    if not image.cuda_version:
        pytest.fail(f"{image.ref} has no devbox.cuda.version label: not a GPU image",
                    pytrace=False)
    return image.cuda_version


def probe(image, **options) -> dict:
    code, logs = image.engine.run(image.ref, ["python", "-c", PROBE], **options)
    assert code == 0, f"the CUDA probe crashed ({code}):\n{logs[-1500:]}"
    return json.loads(logs.strip().splitlines()[-1])


def test_labels_name_cuda_and_minimum_driver(image, cuda):
    """labels give the CUDA version and the minimum driver; the NVIDIA runtime is asked for"""
    assert image.labels.get("devbox.cuda.min-driver"), "no devbox.cuda.min-driver label"
    env = image.env
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all", "NVIDIA_VISIBLE_DEVICES is not 'all'"
    assert "compute" in env.get("NVIDIA_DRIVER_CAPABILITIES", ""), (
        "NVIDIA_DRIVER_CAPABILITIES lacks 'compute'"
    )


def test_no_driver_library_is_baked_in(image_root_host, cuda):
    """no libcuda.so in the image: the host's NVIDIA runtime provides the driver"""
    found = image_root_host.run(
        "find / -xdev -name 'libcuda.so*' -not -path '*/stubs/*' 2>/dev/null | head -n 10"
    ).stdout.split()
    assert not found, "driver libraries baked into the image: " + ", ".join(found)


def test_starts_without_a_gpu(image, cuda):
    """without a GPU the image starts and its CUDA framework reports no device, without crashing"""
    result = probe(image)
    if result["framework"] is None:
        pytest.skip("no CUDA framework (torch, libcudart) in the image to ask")
    assert result["devices"] == 0, f"{result['framework']} sees a device without a GPU: {result}"


@pytest.fixture
def gpu_engine(image):
    if not image.engine.has_gpu():
        pytest.skip("this engine's host has no GPU (no NVIDIA runtime): run assertions skipped")
    return image.engine


def test_nvidia_smi_sees_the_gpu(image, gpu_engine, cuda):
    """with --gpus all, nvidia-smi lists a GPU"""
    code, logs = gpu_engine.run(image.ref, ["nvidia-smi", "-L"], gpus=True)
    assert code == 0 and "GPU 0" in logs, f"nvidia-smi failed ({code}):\n{logs[-1500:]}"


def test_framework_sees_the_gpu(image, gpu_engine, cuda):
    """with --gpus all, the CUDA framework sees a device"""
    result = probe(image, gpus=True)
    assert result["devices"] >= 1, f"{result['framework']} sees no GPU: {result}"
