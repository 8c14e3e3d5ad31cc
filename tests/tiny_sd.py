"""A tiny Stable-Diffusion-layout pipeline, LoRA weights and a captioned image folder, all built
locally from config (no downloads) for the latent/text-conditioned tests."""

import json
from pathlib import Path

import numpy as np
import torch

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "gold": (230, 190, 40)}


def _byte_unicode() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: the 256 single-character BPE symbols."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tokenizer(folder: Path, max_length: int = 12):
    """A character-level CLIPTokenizer (no merges): every word splits into its characters."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_unicode()
    vocab = {c: i for i, c in enumerate(symbols)}
    vocab.update({c + "</w>": len(symbols) + i for i, c in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=max_length)


def tiny_cond_unet(widths=(16, 32), cross_dim=16, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8)


def build_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a StableDiffusionPipeline folder: 16x16 RGB images <-> 4x8x8 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        norm_num_groups=8, sample_size=16)
    tokenizer = build_tokenizer(folder / "_tokenizer_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_cond_unet(seed=seed), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_lora(unet, folder: Path, rank: int = 4, seed: int = 0) -> Path:
    """Add LoRA adapters to the attention projections, give them trained-looking (non-zero)
    weights, and save them in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def build_captioned_folder(folder: Path, num: int, size: int = 16, seed: int = 0,
                           drop_caption: int | None = None) -> Path:
    """RGB images of a coloured digit on black, with metadata.jsonl captions naming both."""
    from PIL import Image

    from das_pipeline.data import digits_array, digits_labels

    folder.mkdir(parents=True, exist_ok=True)
    digits, labels = digits_array()[:, 0], digits_labels()
    names = list(COLORS)
    rows = []
    rng = np.random.default_rng(seed)
    for i in range(num):
        color = names[int(rng.integers(len(names)))]
        d = np.kron(digits[i], np.ones((size // 8, size // 8), np.uint8)).astype(np.float32) / 255
        rgb = (d[..., None] * np.array(COLORS[color])[None, None]).astype(np.uint8)
        name = f"img_{i:03d}.png"
        Image.fromarray(rgb).save(folder / name)
        row = {"file_name": name, "text": f"a {color} digit {labels[i]}"}
        if i == drop_caption:
            del row["text"]
        rows.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder
