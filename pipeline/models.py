"""Load a diffusion model from a diffusers pipeline folder on disk (safetensors only).

Two layouts, told apart by the folder's ``model_index.json`` (a folder without one is read as
DDPMPipeline):
- ``DDPMPipeline``: ``unet/`` (UNet2DModel) + ``scheduler/``; the model sees pixels.
- ``StableDiffusionPipeline``: ``unet/`` (UNet2DConditionModel), ``vae/`` (AutoencoderKL),
  ``text_encoder/`` (CLIPTextModel), ``tokenizer/`` (CLIPTokenizer), ``scheduler/``; the model
  sees VAE latents (posterior mean x scaling_factor) and CLIP text embeddings of the captions.
Schedulers must expose ``alphas_cumprod`` (DDPM/DDIM-style); ``epsilon`` and ``v_prediction``
are supported. Optional LoRA adapters (diffusers/peft safetensors) are loaded into the UNet.
Weights are never unpickled: folders without ``*.safetensors`` weights are refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError

PIXEL, LATENT = "DDPMPipeline", "StableDiffusionPipeline"
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class DiffusionModel:
    unet: torch.nn.Module
    scheduler: object
    path: Path
    digest: str
    """sha256 over every component's tensors (name, dtype, shape, bytes) and the scheduler config."""
    pipeline: str = PIXEL
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    lora: Path | None = None

    @property
    def conditional(self) -> bool:
        return self.pipeline == LATENT

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet denoises (pixels, or VAE latents)."""
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the dataset must provide."""
        c, h, w = self.latent_shape
        if not self.conditional:
            return (c, h, w)
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.in_channels, h * scale, w * scale)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


def _digest_module(h, prefix: str, module: torch.nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())


def weights_digest(unet: torch.nn.Module, scheduler_config: dict,
                   others: dict[str, torch.nn.Module] | None = None) -> str:
    h = hashlib.sha256()
    _digest_module(h, "unet", unet)
    for name, module in sorted((others or {}).items()):
        _digest_module(h, name, module)
    relevant = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _build_scheduler(cls, config: dict):
    """``cls(**config)`` restricted to the keys its constructor takes, as ``from_pretrained`` does.

    Built directly because diffusers' ``from_pretrained`` / ``from_config`` import every compatible
    scheduler class to sort the keys (scheduling_euler_discrete pulls in scipy.stats: 0.5-0.8 s of
    every `das` command). Keys the constructor does not take (``_class_name``, a compatible
    scheduler's options such as PNDM's ``skip_prk_steps``) do not reach the constructor but are kept
    in ``scheduler.config``, as diffusers keeps them, so the config (and with it the weights
    digest) equals ``from_pretrained``'s (tests/test_data.py).
    """
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    scheduler = cls(**{k: v for k, v in config.items() if k in accepted})
    # from_pretrained keeps the other keys in .config too (the weights digest reads them)
    scheduler.register_to_config(**{k: v for k, v in config.items() if k not in accepted})
    return scheduler


def _scheduler(folder: Path):
    import diffusers

    cfg_path = folder / "scheduler_config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} lacks scheduler_config.json")
    config = json.loads(cfg_path.read_text())
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelError(f"scheduler class {name!r} in {cfg_path} is not a diffusers scheduler")
    scheduler = _build_scheduler(cls, config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ModelError(f"scheduler {name} has no alphas_cumprod; use a DDPM-style scheduler "
                         f"(DDPMScheduler, DDIMScheduler)")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ModelError(f"scheduler prediction_type={prediction!r} is not supported; "
                         f"supported: {PREDICTIONS}")
    return scheduler


def _require_safetensors(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelError(f"pipeline component folder {folder} is missing")
    if not list(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no .safetensors weights; das-pipeline never unpickles "
                         f"(.bin/.pt) weights: re-save with save_pretrained(safe_serialization=True)")


def _class_name(folder: Path) -> str | None:
    cfg = folder / "config.json"
    return json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None


def load_model(path: str | Path, lora: str | Path | None = None) -> DiffusionModel:
    """Load a pipeline folder in eval mode, float32, on CPU (optionally with LoRA adapters).

    Raises:
        ModelError: missing folder/components, pickle-only weights, unsupported pipeline or
            scheduler, LoRA weights that do not fit the UNet.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"[model] path = {str(path)!r} is not a folder; point it at a diffusers "
                         f"pipeline folder (unet/ and scheduler/, plus vae/, text_encoder/, "
                         f"tokenizer/ for Stable Diffusion)")
    index = path / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name", PIXEL) if index.is_file() else PIXEL
    if pipeline not in (PIXEL, LATENT):
        raise ModelError(f"{index} names {pipeline}; supported pipelines are {PIXEL} and {LATENT}")
    for sub in ("unet", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelError(f"[model] path = {str(path)!r} lacks {sub}/; save the pipeline with "
                             f"{pipeline}.save_pretrained(...)")
    _require_safetensors(path / "unet")
    scheduler = _scheduler(path / "scheduler")
    want_unet = "UNet2DModel" if pipeline == PIXEL else "UNet2DConditionModel"
    if _class_name(path / "unet") != want_unet:
        raise ModelError(f"{path / 'unet'} holds a {_class_name(path / 'unet')}; a {pipeline} "
                         f"folder needs a {want_unet}")
    import diffusers

    unet = getattr(diffusers, want_unet).from_pretrained(path / "unet", use_safetensors=True)
    others = {}
    model = DiffusionModel(unet, scheduler, path, "", pipeline)
    if pipeline == LATENT:
        from transformers import CLIPTextModel, CLIPTokenizer

        for sub in ("vae", "text_encoder"):
            _require_safetensors(path / sub)
        if not (path / "tokenizer").is_dir():
            raise ModelError(f"{path} lacks tokenizer/ (a CLIPTokenizer saved with save_pretrained)")
        model.vae = diffusers.AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
        model.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
        model.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        others = {"vae": model.vae, "text_encoder": model.text_encoder}
    if lora is not None:
        _load_lora(unet, Path(lora))
        model.lora = Path(lora)
    for module in (unet, *others.values()):
        module.eval().float().requires_grad_(False)
    model.digest = weights_digest(unet, dict(scheduler.config), others)
    return model


def _load_lora(unet: torch.nn.Module, lora: Path) -> None:
    if not hasattr(unet, "load_lora_adapter"):
        raise ModelError(f"[model] lora = {str(lora)!r}: this diffusers version cannot load LoRA "
                         f"adapters into a {type(unet).__name__}")
    folder, weight_name = (lora.parent, lora.name) if lora.is_file() else (lora, None)
    if not folder.is_dir() or (weight_name is None and not list(folder.glob("*.safetensors"))):
        raise ModelError(f"[model] lora = {str(lora)!r}: no .safetensors LoRA weights there; give "
                         f"the file or the folder written by save_lora_weights(...)")
    before = {n for n, _ in unet.named_parameters()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unet.load_lora_adapter(folder, weight_name=weight_name, prefix="unet",
                                   adapter_name="default", use_safetensors=True)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelError(f"[model] lora = {str(lora)!r} does not fit this UNet ({err}); was it "
                         f"trained for another architecture?") from None
    added = [n for n, _ in unet.named_parameters() if n not in before]
    unexpected = [str(w.message) for w in caught if "unexpected" in str(w.message).lower()]
    if not added or unexpected:
        detail = unexpected[0][:300] if unexpected else "no LoRA parameters were added"
        raise ModelError(f"[model] lora = {str(lora)!r} does not fit this UNet ({detail}); was it "
                         f"trained for another architecture?")


def attributed_params(model: DiffusionModel, patterns: tuple[str, ...] = ()) -> list[str]:
    """Names of the attributed UNet parameters, in the order of the flat feature vector.

    Default: every parameter, or only the LoRA parameters when LoRA adapters are loaded.

    Raises:
        ConfigError: a pattern matches no parameter.
    """
    names = [n for n, _ in model.unet.named_parameters()]
    if not patterns:
        return [n for n in names if "lora_" in n] if model.lora is not None else names
    chosen = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(f"[features] params pattern {pattern!r} matches no UNet parameter; "
                             f"names look like {names[0]!r}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


@torch.no_grad()
def encode_images(model: DiffusionModel, images_BCHW: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean of images in [-1, 1], times the VAE's scaling factor (float32)."""
    vae = model.vae
    device = next(vae.parameters()).device
    latents = vae.encode(images_BCHW.to(device, torch.float32)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def encode_captions(model: DiffusionModel, captions: list[str]) -> torch.Tensor:
    """CLIP text-encoder hidden states (B, L, D) of captions padded to the tokenizer's length."""
    tok = model.tokenizer
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    device = next(model.text_encoder.parameters()).device
    return model.text_encoder(ids.to(device))[0].float()
