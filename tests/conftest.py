"""Shared fixtures: a tiny diffusers model folder and tiny datasets, built locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_config

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline folder with a tiny UNet (8x8, 1 channel, attention) trained for 60 steps
    on 64 digits, so its gradients are those of a model that has learnt something."""
    from das_pipeline.data import open_dataset
    from das_pipeline.recipe import ddpm_scheduler, save_pipeline, tiny_unet, train_ddpm

    folder = tmp_path_factory.mktemp("tiny_model")
    unet = tiny_unet(8, 1, (8, 16), attention=True, seed=0)
    scheduler = ddpm_scheduler(100)
    data = open_dataset("train", "digits[0:64]")
    train_ddpm(unet, scheduler, data.load(0, 64), steps=60, seed=0, batch_size=32,
               show_progress=False)
    return save_pipeline(unet, scheduler, folder / "model")


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """Write a tiny TOML config into tmp_path and return its path (see helpers.write_config)."""

    def make(name: str = "cfg.toml", **overrides) -> Path:
        overrides.setdefault("store", tmp_path / "store.zarr")
        return write_config(tmp_path / name, tiny_model_dir, **overrides)

    return make


@pytest.fixture
def digits_npy(tmp_path) -> Path:
    """The first 40 digits as a uint8 (N, 1, 8, 8) .npy file."""
    from das_pipeline.data import digits_array

    path = tmp_path / "digits40.npy"
    np.save(path, digits_array()[:40])
    return path
