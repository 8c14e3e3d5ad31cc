"""The built-in tiny DDPM recipe: model from config, deterministic training, DDPM sampling.

Used by the demo, the tests and the LDS benchmark; users with their own models never need it.
Everything is seeded explicitly; nothing touches the global RNG state.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm


def tiny_unet(sample_size: int = 8, channels: int = 1, widths: tuple[int, ...] = (16, 32),
              attention: bool = False, seed: int = 0):
    """A small UNet2DModel built from config (no download); ``attention`` adds one attention level."""
    from diffusers import UNet2DModel

    down = ["DownBlock2D"] * len(widths)
    up = ["UpBlock2D"] * len(widths)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                           layers_per_block=1, block_out_channels=tuple(widths),
                           down_block_types=tuple(down), up_block_types=tuple(up),
                           norm_num_groups=min(8, widths[0]), attention_head_dim=8)


def ddpm_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True)


def save_pipeline(unet, scheduler, folder: str | Path) -> Path:
    """Write a DDPMPipeline-layout folder with safetensors weights."""
    from diffusers import DDPMPipeline

    folder = Path(folder)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


def warmup_cosine(opt, steps: int, warmup: int = 100):
    """The recipes' learning-rate schedule: linear warm-up over ``warmup`` steps times a cosine
    decay over ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def train_ddpm(unet, scheduler, images_NCHW: torch.Tensor, steps: int, seed: int = 0,
               batch_size: int = 128, lr: float = 2e-3, show_progress: bool = True,
               time_budget_s: float | None = None) -> dict:
    """Train ``unet`` in place on images in [-1, 1] with the epsilon loss; deterministic per seed.

    Batches, timesteps and noise come from one ``torch.Generator(seed)``. Returns a summary
    (steps run, final loss EMA, seconds). ``time_budget_s`` stops early, keeping determinism
    only up to the step reached (the summary says which).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    unet.train()
    n = len(images_NCHW)
    T = scheduler.config.num_train_timesteps
    ema, started = None, time.perf_counter()
    done = 0
    for _ in tqdm(range(steps), desc="train", disable=not show_progress, unit="step"):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x = images_NCHW[idx]
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        pred = unet(scheduler.add_noise(x, eps, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        done += 1
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break
    unet.eval()
    return {"steps": done, "loss_ema": ema, "seconds": time.perf_counter() - started}


@torch.no_grad()
def sample_keyed(unet, scheduler, seeds: list[int], num_inference_steps: int) -> torch.Tensor:
    """(Q, C, H, W) ancestral DDPM samples in [-1, 1]; row q uses only torch.Generator(seeds[q]),
    so a row is the same whatever the batch it is drawn in."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    c, size = unet.config.in_channels, unet.config.sample_size
    x = torch.cat([torch.randn((1, c, size, size), generator=g) for g in gens])
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, generator=gens).prev_sample
    return x.clamp(-1, 1)


def save_pngs(images_NCHW: torch.Tensor, folder: str | Path, prefix: str = "q") -> list[Path]:
    """Save images as 8-bit PNGs (L or RGB) named so that sorted order equals row order."""
    from PIL import Image

    from .data import to_uint8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images_NCHW)):
        path = folder / f"{prefix}{i:05d}.png"
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths
