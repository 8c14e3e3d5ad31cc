"""LDS suite member `digits_lora`: a LoRA fine-tune of a tiny text-conditioned latent model.

    python benchmarks/lds_suite/lora_member.py --out runs/lds_lora [--truth-check 100]
    python benchmarks/lds_suite/lora_member.py --out /tmp/lds_lora_mini --mini  # a smoke run (~1 min)

(16 min on this project's 2 shared CPU cores, 8 more with --truth-check 100; LORA.md has the
results.)

A tiny Stable-Diffusion-layout pipeline built from config (no downloads): 16x16 RGB images <->
4x8x8 latents through an AutoencoderKL trained here as an autoencoder on the base digits, a
frozen random CLIP text encoder over tests/tiny_sd.py's character tokenizer, a DDPM scheduler
(1000 steps, scaled_linear) and a UNet2DConditionModel with cross-attention. Images are
scikit-learn digits upscaled to 16x16 (grey in RGB), captioned "a digit d". FULL: base digits
[500:1500], N = 128 train digits [0:128], val digits [1500:1564], 64 generated; UNet widths
(16, 32) with rank-4 LoRA on to_q/to_k/to_v/to_out.0; truth at 25 timesteps (the pixel suite
uses 100; --truth-check measures what that changes).

Stages (resumable, each timed): VAE -> base UNet on the base digits with captions -> the full
LoRA fine-tune on the N train digits (the built-in LoRA recipe; this is `[model] lora`) ->
generated queries from base + full LoRA with captions -> `das lds subsets` (M = 32, alpha =
0.5) -> `das lds train` (a fresh LoRA fine-tune of the base per subset) -> `das lds truth` ->
`das extract` at the defaults but the kind (common noise, K = 10, k = 2048, `--kind`, default
rademacher: the kind LORA.md's main table was measured with) -> `das reduce`,
`das score` and `das lds eval` at the default damping, once with `[score] residual = "r"` and
once with "rho" (methods trak, dtrak, das, das_signed) -> `das lds eval --sweep` over the
sweep grid plus the default c. Every number is reported on the report half of each query set
(the sweep's seeded halves; the best damping is chosen on the other half), as mean LDS x 100
with a bootstrap 95% interval. Writes results.json, results.md and times.json (each stage's
time in the run that did its work; use a new --out to measure again) into --out. With
--truth-check T the held-out queries are also evaluated against a truth of T timesteps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import das, stage_timer, store_complete  # noqa: E402

# Sized for this project's 2 shared CPU cores (a UNet step at batch 32 took 0.5 s there).
FULL = {"base_rows": (500, 1500), "train_rows": (0, 128), "val_rows": (1500, 1564),
        "num_generated": 64, "num_subsets": 32, "alpha": 0.5, "dim": 2048, "timesteps": 10,
        "truth_timesteps": 25, "widths": [16, 32], "vae_widths": [8, 16], "vae_steps": 300,
        "base_steps": 600, "gen_steps": 50, "batch_size": 32,
        "lora": {"lora_rank": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                 "steps": 80, "batch_size": 16, "lr": 5e-3}}
MINI = {**FULL, "base_rows": (500, 600), "train_rows": (0, 24), "val_rows": (1500, 1508),
        "num_generated": 6, "num_subsets": 4, "dim": 64, "timesteps": 2, "truth_timesteps": 5,
        "widths": [16, 32], "vae_steps": 20, "base_steps": 20, "gen_steps": 5,
        "lora": {**FULL["lora"], "steps": 5, "batch_size": 8}}
METHODS = ("trak", "dtrak", "das", "das_signed")
RESIDUALS = ("r", "rho")
DEFAULT_C = 0.03  # the `das score` default (ScoreConfig.damping)


def digit_images(lo: int, hi: int) -> tuple[np.ndarray, list[str]]:
    """(n, 16, 16, 3) uint8 digits (grey in RGB) and their captions "a digit d"."""
    from das_pipeline.data import digits_array, digits_labels

    d = digits_array()[lo:hi, 0]
    big = np.kron(d, np.ones((1, 2, 2), np.uint8))
    return np.repeat(big[..., None], 3, axis=-1), [f"a digit {y}" for y in digits_labels()[lo:hi]]


def write_folder(folder: Path, images: np.ndarray, captions: list[str], prefix: str) -> Path:
    """PNGs (sorted name order = row order) and a metadata.jsonl with the captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        name = f"{prefix}{i:05d}.png"
        Image.fromarray(img).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": cap}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def to_unit(images_NHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_base(out: Path, s: dict) -> Path:
    """Train the VAE and the base UNet on the base digits; save a StableDiffusionPipeline folder."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO / "tests"))
    from das_pipeline.recipe import warmup_cosine
    from tiny_sd import build_tokenizer

    folder = out / "base"
    if (folder / "model_index.json").is_file():
        return folder
    images, captions = digit_images(*s["base_rows"])
    x = to_unit(images)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=tuple(s["vae_widths"]),
                        norm_num_groups=8, sample_size=16)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    sched = warmup_cosine(opt, s["vae_steps"])
    for step in range(s["vae_steps"]):
        b = x[torch.randint(0, len(x), (s["batch_size"],), generator=gen)]
        post = vae.encode(b).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        loss = (vae.decode(z).sample - b).pow(2).mean() + 1e-4 * post.kl().mean() / b[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        recon = vae.decode(z[:256]).sample
    print(f"vae: reconstruction MSE {float((recon - x[:256]).pow(2).mean()):.4f} (images in [-1, 1]), "
          f"latent std {float(z.std()):.3f}", flush=True)
    tokenizer = build_tokenizer(out / "_tokenizer_src")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)).eval()
    w = tuple(s["widths"])
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=w,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        z0 = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
        z0 = z0 * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    sched = warmup_cosine(opt, s["base_steps"])
    unet.train()
    for step in range(s["base_steps"]):
        idx = torch.randint(0, len(z0), (s["batch_size"],), generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        eps = torch.randn(z0[idx].shape, generator=gen)
        pred = unet(scheduler.add_noise(z0[idx], eps, t), t, encoder_hidden_states=text[idx]).sample
        loss = (pred - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"base unet step {step}: loss {loss.item():.4f}", flush=True)
    unet.eval()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def train_full_lora(out: Path, base: Path, s: dict) -> Path:
    """The configured adapter: the built-in LoRA recipe on all N train digits (seed 0)."""
    from das_pipeline.data import open_dataset
    from das_pipeline.lora_recipe import WEIGHTS, train_lora_subset

    folder = out / "full_lora"
    if not (folder / WEIGHTS).is_file():
        ds = open_dataset("train", str(out / "train_images"))
        summary = train_lora_subset(base, ds, list(range(len(ds))), s["lora"], 0, folder)
        print(f"full LoRA: {summary}", flush=True)
    return folder


def generate(out: Path, base: Path, lora: Path, s: dict) -> Path:
    """Queries generated by base + full LoRA (DDIM, no guidance), prompt "a digit (q mod 10)",
    image q from torch.Generator(1000 + q)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = out / "gen_images"
    if (folder / "metadata.jsonl").is_file():
        return folder
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    n = s["num_generated"]
    prompts = [f"a digit {q % 10}" for q in range(n)]
    images = []
    for lo in range(0, n, 16):
        hi = min(n, lo + 16)
        gens = [torch.Generator().manual_seed(1000 + q) for q in range(lo, hi)]
        res = pipe(prompts[lo:hi], num_inference_steps=s["gen_steps"], guidance_scale=1.0,
                   generator=gens, output_type="np", height=16, width=16)
        images.append((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return write_folder(folder, np.concatenate(images), prompts, "gen")


def write_config(out: Path, s: dict, residual: str, kind: str = "rademacher") -> Path:
    """examples/sd_lora.toml with this member's model, adapter, data, k and projection kind, at
    the defaults otherwise (K = 10, common noise, damping 0.03, gamma 0) and [score] residual."""
    import tomllib

    from das_pipeline.config import dump_toml, merge

    raw = tomllib.loads((REPO / "examples" / "sd_lora.toml").read_text())
    raw["data"].pop("center_crop", None)
    raw["data"]["queries"] = {"val": "val_images", "gen": "gen_images"}
    for key in ("timesteps", "autocast"):
        raw["features"].pop(key, None)
    raw = merge(raw, {
        "model": {"path": "base", "lora": "full_lora"},
        "data": {"train": "train_images", "resize": False},
        "features": {"batch_size": 32, "vmap_chunk_size": 0, "timesteps": s["timesteps"]},
        "projection": {"dim": s["dim"], "kind": kind},
        "store": {"path": f"store{kind_tag(kind)}.zarr", "rows_per_unit": 64},
        "score": {"methods": list(METHODS), "residual": residual}})
    path = out / f"lora_{residual}{kind_tag(kind)}.toml"
    path.write_text(dump_toml(raw))
    return path


def kind_tag(kind: str) -> str:
    """File-name suffix of a projection kind ("" for rademacher, the kind LORA.md's table used)."""
    return "" if kind == "rademacher" else f"_{kind}"


def variant_name(method: str, residual: str) -> str:
    """The `das lds eval --sweep` name of a method at gamma 0 and this residual."""
    return method if method in ("trak", "dtrak") else f"{method} g0 {residual}"


def analyse(out: Path, s: dict, tag: str = "") -> dict:
    """Per split and variant: report-half LDS at the default damping and at the best swept one,
    and the report-half mean LDS at every damping of the grid (shown, never used to choose)."""
    from das_pipeline.eval.lds import summarize

    sweep = json.loads((out / f"sweep{tag}.json").read_text())
    rows = []
    for split in ("val", "gen"):
        if split not in sweep:
            continue
        report = np.asarray(sweep[split]["report"])
        by = next(iter(sweep[split]["by_k"].values()))
        for residual in RESIDUALS:
            defaults = json.loads((out / f"defaults_{residual}{tag}.json").read_text())[split]
            for method in METHODS:
                if residual == "rho" and method in ("trak", "dtrak"):
                    continue  # no residual in trak / dtrak
                name = variant_name(method, residual)
                per_q = np.asarray(defaults[method]["per_query"], dtype=np.float64)
                d = summarize(per_q[report]).as_dict()
                b = by[name]
                rows.append({"split": split, "variant": name, "default": d, "best": b["report"],
                             "chosen_c": b["chosen"], "all_queries_default": defaults[method]["summary"],
                             "grid": b["grid"], "report_curve": b["report_curve"]})
    return {"rows": rows, "settings": s}


def markdown(res: dict) -> str:
    def f(x):
        return f"{x['mean'] * 100:.1f} [{x['lo'] * 100:.1f}, {x['hi'] * 100:.1f}]"

    lines = ["| queries | variant | LDS at the default c = 0.03 | best swept | chosen c |",
             "| --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['split']} | {r['variant']} | {f(r['default'])} | {f(r['best'])} | "
                     f"{r['chosen_c']:.2g} |")
    shown = (1e-4, 1e-3, 1e-2, DEFAULT_C, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4)
    lines += ["", "Report-half mean LDS x 100 at each relative damping c (not used to choose):", "",
              "| queries | variant | " + " | ".join(f"{c:g}" for c in shown) + " |",
              "| --- | --- | " + " | ".join("---" for _ in shown) + " |"]
    for r in res["rows"]:
        at = {round(float(np.log10(g)), 6): v for g, v in zip(r["grid"], r["report_curve"], strict=True)}
        cells = [f"{at[round(float(np.log10(c)), 6)] * 100:.1f}" for c in shown]
        lines.append(f"| {r['split']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(das_q, cfgs: dict, subsets: Path, truth: Path, out: Path, tag: str = "") -> None:
    """`das score` + `das lds eval` per residual at the defaults, then one `--sweep` of every
    variant over the sweep grid plus the default c; JSON files named with ``tag``."""
    from das_pipeline.eval.sweep import DEFAULT_GRID

    for r, path in cfgs.items():
        das_q(f"score residual={r}", ["score", str(path)])
        das_q(f"lds eval residual={r}{tag}", ["lds", "eval", str(path), "--subsets", str(subsets),
                                              "--truth", str(truth), "--json",
                                              str(out / f"defaults_{r}{tag}.json")])
    grid = sorted({*DEFAULT_GRID, DEFAULT_C})
    methods = [a for m in METHODS for a in ("--method", m)]
    das_q(f"lds eval --sweep{tag}", ["lds", "eval", str(cfgs["r"]), "--subsets", str(subsets),
                                     "--truth", str(truth), "--sweep", *methods, "--gamma", "0",
                                     "--residual", *RESIDUALS, "--grid", *map(str, grid), "--json",
                                     str(out / f"sweep{tag}.json")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/lds_lora", help="output folder (resumable)")
    ap.add_argument("--mini", action="store_true", help="a smoke run (seconds to minutes)")
    ap.add_argument("--jobs", type=int, default=1, help="`das lds train` processes (default 1)")
    ap.add_argument("--truth-check", type=int, default=0, metavar="T",
                    help="also evaluate the held-out queries against a truth of T timesteps")
    ap.add_argument("--kind", default="rademacher", choices=("rademacher", "sjlt"),
                    help="[projection] kind of the features (default rademacher, as LORA.md's table "
                    "was measured; sjlt: its own store and results_sjlt.md, same models and truth)")
    args = ap.parse_args(argv)
    s = MINI if args.mini else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # the first run's time: a resumed stage only checks its outputs
    stage = stage_timer(out / "times.json", keep_first=True)
    times = stage.times

    for name, rows in (("train_images", s["train_rows"]), ("val_images", s["val_rows"])):
        if not (out / name / "metadata.jsonl").is_file():
            write_folder(out / name, *digit_images(*rows), prefix="img")
    base = stage("base model (VAE + UNet)", build_base, out, s)
    lora = stage("full LoRA", train_full_lora, out, base, s)
    stage("generate queries", generate, out, base, lora, s)
    cfgs = {r: write_config(out, s, r, args.kind) for r in RESIDUALS}
    ktag = kind_tag(args.kind)
    cfg = str(cfgs["r"])
    subsets, models, truth = out / "subsets.npz", out / "models", out / "truth"
    q = ["--quiet"]
    if not subsets.is_file():
        stage("lds subsets", das, ["lds", "subsets", cfg, "--num", str(s["num_subsets"]), "--alpha",
                                   str(s["alpha"]), "--out", str(subsets), *q])
    stage("lds train", das, ["lds", "train", cfg, "--subsets", str(subsets), "--out", str(models),
                             "--jobs", str(args.jobs), *q])
    if not all((truth / f"{x}.npz").is_file() for x in ("val", "gen")):
        stage("lds truth", das, ["lds", "truth", cfg, "--subsets", str(subsets), "--models",
                                 str(models), "--out", str(truth), "--timesteps",
                                 str(s["truth_timesteps"]), *q])
    if not store_complete(cfgs["r"]):
        stage("extract", das, ["extract", cfg, *q])
    stage("reduce", das, ["reduce", cfg, *q])

    def das_q(key, argv):
        stage(key, das, [*argv, *q])

    evaluate(das_q, cfgs, subsets, truth, out, ktag)
    md = ""
    if args.truth_check and not ktag:  # the same evaluation against a finer truth of the held-out queries
        tag, fine = f"_t{args.truth_check}", out / f"truth_t{args.truth_check}"
        if not (fine / "val.npz").is_file():
            stage(f"lds truth val, {args.truth_check} timesteps", das,
                  ["lds", "truth", cfg, "--subsets", str(subsets), "--models", str(models), "--out",
                   str(fine), "--query-set", "val", "--timesteps", str(args.truth_check), *q])
        evaluate(das_q, cfgs, subsets, fine, out, tag)
        check = analyse(out, s, tag)
        (out / f"results{tag}.json").write_text(json.dumps(check, indent=1))
        md = f"\n### The held-out queries against a truth of {args.truth_check} timesteps\n\n" + \
            markdown(check)
    res = analyse(out, s, ktag)
    res["times"] = times
    (out / f"results{ktag}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res) + md
    (out / f"results{ktag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
