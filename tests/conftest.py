"""Shared fixtures: a tiny diffusers model folder and tiny datasets, built locally (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_TOML = """
[model]
path = "{model}"

[data]
train = "{train}"
[data.queries]
{queries}

[features]
readouts = {readouts}
timesteps = {timesteps}
noise_draws = {noise_draws}
seed = 0
normalize = {normalize}
dtype = "{dtype}"
batch_size = {batch_size}

[projection]
dim = {dim}
seed = 0

[store]
path = "{store}"
rows_per_unit = {rows_per_unit}

[score]
methods = {methods}
damping = {damping}
topk = 5
"""


def _toml_list(items) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


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
    """Write a tiny TOML config and return its path; keyword arguments override defaults."""

    def make(name: str = "cfg.toml", **overrides) -> Path:
        values = dict(model=tiny_model_dir, train="digits[0:40]", queries={"val": "digits[100:106]"},
                      readouts=("loss", "square", "mean"), timesteps=4, noise_draws=1,
                      normalize="false", dtype="float32", batch_size=8, dim=64,
                      store=tmp_path / "store.zarr", rows_per_unit=16,
                      methods=("trak", "dtrak", "das"), damping=0.01)
        values.update(overrides)
        values["queries"] = "\n".join(f'{k} = "{v}"' for k, v in values["queries"].items())
        values["readouts"] = _toml_list(values["readouts"])
        values["methods"] = _toml_list(values["methods"])
        path = tmp_path / name
        path.write_text(TINY_TOML.format(**values))
        return path

    return make


@pytest.fixture
def digits_npy(tmp_path) -> Path:
    """The first 40 digits as a uint8 (N, 1, 8, 8) .npy file."""
    from das_pipeline.data import digits_array

    path = tmp_path / "digits40.npy"
    np.save(path, digits_array()[:40])
    return path
