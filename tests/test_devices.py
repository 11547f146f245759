"""The one device resolver: concrete CUDA indices (mocked CUDA), errors, and set_device."""

from __future__ import annotations

import pytest
import torch

from napari_cellclip import devices
from napari_cellclip.devices import resolve_device, use_device
from napari_cellclip.errors import CellClipError


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible CUDA devices, the current one being cuda:1; set_device calls are recorded."""
    calls = []

    def set_device(dev):
        # the real torch.cuda.set_device raises for a device without an index
        index = torch.device(dev).index if not isinstance(dev, int) else dev
        if index is None:
            raise ValueError(f"Expected a cuda device with a specified index, got {dev}")
        calls.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return calls


def test_cuda_without_index_is_the_current_device(fake_cuda):
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("CUDA:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    # torchrun: one process per GPU, whatever the name
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)  # 3 mod 2 devices
    with pytest.raises(CellClipError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_use_device_sets_a_concrete_index(fake_cuda):
    use_device(resolve_device("cuda"))
    assert fake_cuda == [1]
    with pytest.raises(ValueError):  # what the job did before: set_device(torch.device("cuda"))
        torch.cuda.set_device(torch.device("cuda"))
    assert use_device(torch.device("cpu")) == torch.device("cpu") and fake_cuda == [1]


def test_cpu_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(CellClipError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(CellClipError, match="device must be"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(CellClipError, match="CUDA is not available"):
            resolve_device("cuda")
    assert set(devices.DEVICE_CHOICES) == {"auto", "cuda", "mps", "cpu"}


def test_the_job_and_training_use_the_resolver(fake_cuda, monkeypatch):
    """The embedding job and fit both get a concrete CUDA device for a plain 'cuda'."""
    from training.distributed import Dist, resolve_train_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_train_device("cuda", Dist()) == torch.device("cuda", 0)
    assert fake_cuda[-1] == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert resolve_train_device("cuda", Dist()) == torch.device("cuda", 1)
    assert fake_cuda[-1] == 1
