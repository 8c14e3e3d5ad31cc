"""The built-in LoRA recipe: a fresh LoRA fine-tune of a frozen base UNet, deterministic per seed.

Used by `das lds train` when the config's model has ``[model] lora``: every LDS subset is a new
adapter of the same shape as the configured one, trained on the subset's images (and captions)
with the diffusion loss through the base's VAE and text encoder:
    z0 = VAE posterior mean x scaling factor,  c = text encoder(caption)   (encoded once)
    z_t = scheduler.add_noise(z0, eps, t),  loss = mean_j (unet(z_t, t, c) - target)_j^2
    target = eps, or scheduler.get_velocity(z0, eps, t) for v_prediction schedulers
Only the adapter's parameters are trained (AdamW; linear warm-up over min(100, steps / 10)
steps, then cosine decay);
the adapter's initial values, batches, timesteps and noise all come from the seed.

A LoRA recipe is JSON: {"lora_rank", "lora_alpha", "target_modules", "steps", "batch_size",
"lr"} (LORA_RECIPE_KEYS; an optional "seed" is kept and ignored: subsets carry their own). It is
recorded as das_recipe.json beside the adapters ``save_lora`` writes, so an adapter trained by
this recipe names its recipe. Outputs are diffusers LoRA folders
(``pytorch_lora_weights.safetensors`` with the adapter's rank and alpha in its metadata), which
``[model] lora`` loads.

Legend: N training images, B batch, C latent channels, L caption tokens, D text width.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import EvalError

ADAPTER = "default"
RECIPE_FILE = "das_recipe.json"
WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_RECIPE_KEYS = ("lora_rank", "lora_alpha", "target_modules", "steps", "batch_size", "lr")


def is_lora_recipe(recipe: dict) -> bool:
    """True for a LoRA recipe (it names a rank), False for the pixel DDPM recipe."""
    return "lora_rank" in recipe


def recipe_folder(lora: str | Path) -> Path:
    """The folder of a ``[model] lora`` setting (the file's folder when it names the file)."""
    lora = Path(lora)
    return lora.parent if lora.is_file() else lora


def read_recipe_json(path: str | Path, what: str, why: str) -> tuple[Path, dict]:
    """(file, recipe) of a recipe JSON; a folder means its das_recipe.json. Shared by the pixel
    and the LoRA recipe loaders (each then checks its own keys).

    Raises:
        EvalError: no such file, naming it; ``why`` says what `das lds train` does with it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE_FILE
    if not path.is_file():
        raise EvalError(f"no {what} at {path}: {why}; pass --recipe FILE, or --command TEMPLATE to "
                        f"train with your own script")
    return path, json.loads(path.read_text())


def load_lora_recipe(path: str | Path) -> dict:
    """A LoRA recipe JSON; a folder means its das_recipe.json.

    Raises:
        EvalError: no file, a pixel recipe, missing keys or values of the wrong type.
    """
    path, recipe = read_recipe_json(path, "LoRA recipe", f"`das lds train` fine-tunes a fresh "
                                    f"adapter per subset with the built-in LoRA recipe (JSON with "
                                    f"{list(LORA_RECIPE_KEYS)})")
    if not is_lora_recipe(recipe) and "widths" in recipe:
        raise EvalError(f"recipe {path} is a pixel DDPM recipe (widths, attention, ...) but the "
                       f"config sets [model] lora: LoRA fine-tunes need a LoRA recipe with "
                       f"{list(LORA_RECIPE_KEYS)}")
    missing = [k for k in LORA_RECIPE_KEYS if k not in recipe]
    if missing:
        raise EvalError(f"LoRA recipe {path} lacks {missing}; it needs {list(LORA_RECIPE_KEYS)}")
    targets = recipe["target_modules"]
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise EvalError(f"LoRA recipe {path}: target_modules = {targets!r}; give a list of module "
                       f"names such as [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]")
    for key in ("lora_rank", "steps", "batch_size"):
        if not (isinstance(recipe[key], int) and recipe[key] >= 1):
            raise EvalError(f"LoRA recipe {path}: {key} = {recipe[key]!r}; must be a positive integer")
    return recipe


def add_lora(unet: torch.nn.Module, recipe: dict, seed: int) -> list[torch.nn.Parameter]:
    """Add a fresh adapter (peft's init: kaiming A, zero B) drawn from ``seed``; returns its
    parameters, the only trainable ones."""
    from peft import LoraConfig

    config = LoraConfig(r=recipe["lora_rank"], lora_alpha=recipe["lora_alpha"],
                        target_modules=list(recipe["target_modules"]), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_layout(unet: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """{module name: (rank, alpha)} of the UNet's LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: (int(m.r[ADAPTER]), float(m.lora_alpha[ADAPTER]))
            for name, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.r}


def check_recipe_fits(base: str | Path, lora: str | Path, recipe: dict) -> None:
    """Refuse a recipe whose adapter would differ from the configured one (modules, rank, alpha).

    Raises:
        EvalError: names the first difference and the recipe values that would match.
    """
    from .models import load_model

    have = adapter_layout(load_model(base, lora).unet)
    fresh = load_model(base).unet
    add_lora(fresh, recipe, seed=0)
    want = adapter_layout(fresh)
    if have == want:
        return
    only_cfg, only_recipe = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    if only_cfg or only_recipe:
        detail = (f"the configured adapter also adapts {len(only_cfg)} modules such as "
                  f"{only_cfg[0]!r}" if only_cfg else
                  f"the recipe also adapts {len(only_recipe)} modules such as {only_recipe[0]!r}")
        raise EvalError(f"LoRA recipe target_modules = {recipe['target_modules']} does not match "
                       f"[model] lora = {str(lora)!r} ({detail}); set target_modules to the "
                       f"adapter's modules")
    name = next(n for n in sorted(have) if have[n] != want[n])
    (r, a), (rr, ra) = have[name], want[name]
    key, cfg_value, rec_value = ("lora_rank", r, rr) if r != rr else ("lora_alpha", a, ra)
    raise EvalError(f"LoRA recipe {key} = {rec_value:g} but [model] lora = {str(lora)!r} has "
                   f"{key} = {cfg_value:g} (module {name}); set {key} = {cfg_value:g} in the recipe")


@torch.no_grad()
def encode_rows(model, dataset, rows: list[int], batch: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents (n, C, h, w), caption embeddings (n, L, D) or None) of the dataset's ``rows``,
    encoded as the features encode them (``models.encode_images`` / ``encode_captions``)."""
    from .models import encode_captions, encode_images

    latents, text = [], []
    for lo in range(0, len(rows), batch):
        chunk = rows[lo:lo + batch]
        pixels = torch.cat([dataset.load(i, i + 1) for i in chunk])
        latents.append(encode_images(model, pixels) if model.conditional else pixels.float())
        if model.conditional:
            text.append(encode_captions(model, [dataset.captions[i] for i in chunk]))
    return torch.cat(latents), (torch.cat(text) if model.conditional else None)


def train_lora(model, latents_NCHW: torch.Tensor, text_NLD: torch.Tensor | None, recipe: dict,
               seed: int, show_progress: bool = False) -> dict:
    """Fine-tune a fresh adapter on ``model.unet`` in place; returns (steps, loss EMA, seconds).

    Batches, timesteps and noise come from one ``torch.Generator(seed)``; the adapter's initial
    values from ``seed`` too (``add_lora``).
    """
    from tqdm import tqdm

    from .recipe import warmup_cosine

    unet, scheduler = model.unet, model.scheduler
    params = add_lora(unet, recipe, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)
    sched = warmup_cosine(opt, recipe["steps"], warmup=min(100, max(1, recipe["steps"] // 10)))
    v_prediction = model.prediction_type == "v_prediction"
    n, T = len(latents_NCHW), model.num_train_timesteps
    unet.train()
    ema, started = None, time.perf_counter()
    for _ in tqdm(range(recipe["steps"]), desc="lora", disable=not show_progress, unit="step"):
        idx = torch.randint(0, n, (min(recipe["batch_size"], n),), generator=gen)
        z0 = latents_NCHW[idx]
        t = torch.randint(0, T, (len(idx),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        target = scheduler.get_velocity(z0, eps, t) if v_prediction else eps
        kwargs = {} if text_NLD is None else {"encoder_hidden_states": text_NLD[idx]}
        pred = unet(scheduler.add_noise(z0, eps, t), t, **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
    unet.eval().requires_grad_(False)
    return {"steps": recipe["steps"], "loss_ema": ema, "seconds": time.perf_counter() - started}


def save_lora(unet: torch.nn.Module, folder: str | Path, recipe: dict | None = None) -> Path:
    """Write the UNet's adapter as a diffusers LoRA folder (and the recipe beside it); byte-for-byte
    the same for the same weights (the metadata's sets are sorted)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    meta = {k: sorted(v) if isinstance(v, set) else v
            for k, v in unet.peft_config[ADAPTER].to_dict().items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=meta,
                                              safe_serialization=True)
    _sort_header(folder / WEIGHTS)
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    return folder


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys: safetensors writes its metadata map in hash
    order, which changes from process to process, so equal weights would give other bytes."""
    import struct

    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor offsets count from the header's end
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + size:])


def train_lora_subset(base: str | Path, dataset, rows: list[int], recipe: dict, seed: int,
                      folder: str | Path) -> dict:
    """Load the frozen base, encode ``rows`` of ``dataset``, fine-tune a fresh adapter, save it."""
    from .data import check_matches_model
    from .models import load_model

    model = load_model(base)
    check_matches_model(dataset, model.sample_shape, needs_captions=model.conditional)
    latents, text = encode_rows(model, dataset, rows)
    summary = train_lora(model, latents, text, recipe, seed)
    save_lora(model.unet, folder, recipe)
    return summary
