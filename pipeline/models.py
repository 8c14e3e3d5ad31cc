"""Load a diffusion model from a diffusers pipeline folder on disk (safetensors only).

Supported now: ``DDPMPipeline`` layout, i.e. ``unet/`` (UNet2DModel) and ``scheduler/`` (any
scheduler with ``alphas_cumprod`` and ``epsilon`` prediction, e.g. DDPMScheduler, DDIMScheduler).
Weights are never unpickled: a folder without ``*.safetensors`` weights is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelError(ValueError):
    """The model folder is missing, incomplete or unsupported."""


@dataclass
class DiffusionModel:
    unet: torch.nn.Module
    scheduler: object
    path: Path
    digest: str
    """sha256 over the UNet's tensors (name, dtype, shape, bytes) and the scheduler config."""

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelError(f"scheduler class {name!r} is not a diffusers scheduler")
    return cls


def weights_digest(unet: torch.nn.Module, scheduler_config: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    relevant = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_model(path: str | Path) -> DiffusionModel:
    """Load UNet + scheduler from a DDPMPipeline-layout folder, in eval mode, float32, on CPU.

    Raises:
        ModelError: missing folder/subfolders, pickle-only weights, unsupported scheduler.
    """
    from diffusers import UNet2DModel

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"[model] path = {str(path)!r} is not a folder; point it at a diffusers "
                         f"pipeline folder holding unet/ and scheduler/")
    unet_dir, sched_dir = path / "unet", path / "scheduler"
    for sub in (unet_dir, sched_dir):
        if not sub.is_dir():
            raise ModelError(f"[model] path = {str(path)!r} lacks {sub.name}/; save the pipeline "
                             f"with DDPMPipeline.save_pretrained(...)")
    if not list(unet_dir.glob("*.safetensors")):
        raise ModelError(f"{unet_dir} has no .safetensors weights; das-pipeline never unpickles "
                         f"(.bin/.pt) weights: re-save with save_pretrained(safe_serialization=True)")
    unet_cfg = json.loads((unet_dir / "config.json").read_text())
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise ModelError(f"{unet_dir} holds a {unet_cfg.get('_class_name')}; only UNet2DModel "
                         f"(DDPMPipeline layout) is supported so far")
    sched_cfg_path = sched_dir / "scheduler_config.json"
    if not sched_cfg_path.is_file():
        raise ModelError(f"{sched_dir} lacks scheduler_config.json")
    sched_cfg = json.loads(sched_cfg_path.read_text())
    scheduler = _scheduler_class(sched_cfg.get("_class_name", "DDPMScheduler")).from_pretrained(
        sched_dir)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ModelError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod; use a "
                         f"DDPM-style scheduler (DDPMScheduler, DDIMScheduler)")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ModelError(f"scheduler prediction_type={prediction!r} is not supported yet; "
                         f"use an epsilon-prediction model")
    unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True).eval().float()
    return DiffusionModel(unet, scheduler, path, weights_digest(unet, dict(scheduler.config)))
