"""Shared pytest set-up: offline caches in a temp dir, quiet single-threaded torch, Ray auth off."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _promptsweep_cache(tmp_path_factory):
    """Offline datasets and split caches go to one temp dir per test session (unless set by CI)."""
    if "PROMPTSWEEP_CACHE" not in os.environ:
        os.environ["PROMPTSWEEP_CACHE"] = str(tmp_path_factory.mktemp("promptsweep-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_backbone():
    """The random-init tiny CLIP backbone (loaded once per test session)."""
    import torch

    torch.set_num_threads(1)
    from methods.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def mini_backbone(_promptsweep_cache):
    """The project-pretrained ``promptsweep-mini`` with its real settings (``methods.pretrain``): built
    once per session into the session cache (a few minutes on 2 CPU cores), or found in
    ``$PROMPTSWEEP_MODEL_CACHE`` when CI keeps that folder between runs (the file is content-keyed)."""
    from methods.backbone import load_backbone

    return load_backbone("promptsweep-mini", "promptsweep")
