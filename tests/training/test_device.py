"""Each data-parallel process on a node takes its own GPU (``LOCAL_RANK``), never GPU 0 for all."""

from __future__ import annotations

import pytest
import torch

from meddiff.config import Params, apply_overrides
from meddiff.training.loop import resolve_device


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_torchrun_rank_takes_its_local_gpu(fake_gpus: list, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    config = apply_overrides(Params(), [f"train.device={setting}"]).train
    assert resolve_device(config) == torch.device("cuda", 3)
    assert fake_gpus == [torch.device("cuda", 3)]


def test_single_process_keeps_the_default_gpu(fake_gpus: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device(Params().train) == torch.device("cuda")
    assert fake_gpus == []


def test_cpu_stays_cpu_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(Params().train) == torch.device("cpu")
