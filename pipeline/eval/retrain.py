"""`das lds train`: retrain the model on each LDS subset (resumable, one subset per process).

LoRA fine-tunes: when the config's model has ``[model] lora``, subset m is a fresh adapter of the
same modules, rank and alpha as the configured one, fine-tuned on the subset's images and
captions from the frozen base (``pipeline/lora_recipe.py``), written as a diffusers LoRA folder
``<out>/<m:04d>/lora`` that ``[model] lora`` loads; its marker also records the base's digest.

Training: one subset is one unit of work, trained by one process and finished when its marker
``<out>/<m:04d>/das_subset.json`` exists (written last). Reruns skip finished subsets; a marker
made with another recipe or subset is refused. Subset m belongs to rank m mod world
(``dist.current``: Slurm array tasks x local processes), and ``--jobs J`` runs J local worker
processes. Training is deterministic per (subset rows, seed, recipe).

Own training scripts: ``--command "python train.py --rows {subset_file} --out {output_dir}"``
runs the template per subset ({subset}, {seed} also available). ``subset_file`` is JSON:
{"subset": m, "seed": s, "rows": [...], "uids": [...]} (rows of the config's [data] train); the
command must leave a diffusers pipeline folder (unet/ and scheduler/, safetensors) in output_dir,
or for LoRA configs the adapter's ``*.safetensors`` (``{base_model}`` names the base pipeline).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EvalError
from ..lora_recipe import RECIPE_FILE, read_recipe_json
from .lds import Subsets

MARKER = "das_subset.json"
RECIPE_KEYS = ("widths", "attention", "num_train_timesteps", "steps", "batch_size", "lr")
PIPELINE_DIR, LORA_DIR = "model", "lora"


def load_recipe(path: str | Path) -> dict:
    """A built-in recipe (JSON with RECIPE_KEYS); a model folder means its das_recipe.json."""
    path, recipe = read_recipe_json(path, "recipe", f"`das lds train` retrains the built-in "
                                    f"recipe, recorded as {RECIPE_FILE} beside models it trained")
    if "lora_rank" in recipe:
        raise EvalError(f"recipe {path} is a LoRA recipe but the config has no [model] lora: set "
                       f"[model] lora to the fine-tune's adapter, or pass a pixel DDPM recipe with "
                       f"{list(RECIPE_KEYS)}")
    missing = [k for k in RECIPE_KEYS if k not in recipe]
    if missing:
        raise EvalError(f"recipe {path} lacks {missing}; it needs {list(RECIPE_KEYS)}")
    return recipe


def train_recipe(recipe: dict, images_NCHW: torch.Tensor, seed: int):
    """Train the built-in tiny DDPM from scratch on ``images``; returns (unet, scheduler, summary)."""
    from ..recipe import ddpm_scheduler, tiny_unet, train_ddpm

    _, c, h, _ = images_NCHW.shape
    unet = tiny_unet(h, c, tuple(recipe["widths"]), recipe["attention"], seed=seed)
    scheduler = ddpm_scheduler(recipe["num_train_timesteps"])
    summary = train_ddpm(unet, scheduler, images_NCHW, recipe["steps"], seed=seed,
                         batch_size=recipe["batch_size"], lr=recipe["lr"], show_progress=False)
    return unet, scheduler, summary


def resolve_recipe(cfg, recipe_path: str | None) -> dict:
    """The built-in recipe of `das lds train CONFIG [--recipe FILE]`: a LoRA recipe that fits the
    configured adapter when ``[model] lora`` is set (default: das_recipe.json beside the adapter),
    else the pixel recipe (default: the model folder's das_recipe.json).

    Raises:
        EvalError: no recipe, a recipe of the other kind, or one that does not fit the adapter.
    """
    if cfg.model.lora is None:
        return load_recipe(recipe_path or cfg.model.path)
    from ..lora_recipe import check_recipe_fits, load_lora_recipe, recipe_folder

    recipe = load_lora_recipe(recipe_path or recipe_folder(cfg.model.lora))
    check_recipe_fits(cfg.model.path, cfg.model.lora, recipe)
    return recipe


def _marker_identity(subsets: Subsets, m: int, recipe: dict | None, command: str | None,
                     base_model: str | None = None) -> dict:
    rows = np.flatnonzero(subsets.mask_MN[m])
    identity = {"subset": m, "seed": int(subsets.seeds_M[m]), "num_rows": len(rows),
                "rows_digest": hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest(),
                "recipe": recipe, "command": command}
    if base_model is not None:  # a fine-tune is only what it is on top of its base
        from ..fingerprint import model_digest

        identity["base"] = model_digest(Path(base_model))
    return identity


def subset_done(folder: Path, identity: dict) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    have = json.loads(marker.read_text())
    if {k: have.get(k) for k in identity} != identity:
        raise EvalError(f"{folder} holds a model of another subset, seed or recipe (or base model) "
                       f"({marker}); use a new --out folder or delete {folder}")
    return True


def train_one(train_source: str, subsets_path: str, m: int, out: str, recipe: dict | None,
              command: str | None, threads: int = 1, options=None,
              base_model: str | None = None) -> dict:
    """Train subset m into <out>/<m:04d>/ (skipped when its marker matches). Picklable entry point.

    ``options``: the config's ``DataOptions``, so the training images are read as the features
    read them. ``base_model``: the base pipeline of LoRA configs (subsets are then adapters).
    """
    from ..dist import torch_threads

    with torch_threads(threads):
        return _train_one(train_source, subsets_path, m, out, recipe, command, options, base_model)


def _train_one(train_source: str, subsets_path: str, m: int, out: str, recipe: dict | None,
               command: str | None, options=None, base_model: str | None = None) -> dict:
    from ..data import open_dataset
    from ..recipe import save_pipeline
    from .lds import load_subsets

    subsets = load_subsets(subsets_path)
    folder = Path(out) / f"{m:04d}"
    identity = _marker_identity(subsets, m, recipe, command, base_model)
    if subset_done(folder, identity):
        return {"subset": m, "skipped": True, "seconds": 0.0}
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.flatnonzero(subsets.mask_MN[m])
    seed = int(subsets.seeds_M[m])
    output = folder / (PIPELINE_DIR if base_model is None else LORA_DIR)
    if command is None and base_model is not None:
        from ..lora_recipe import train_lora_subset

        train = open_dataset("train", train_source, options)
        summary = train_lora_subset(base_model, train, rows.tolist(), recipe, seed, output)
    elif command is None:
        train = open_dataset("train", train_source, options)
        images = train.load(0, len(train))[torch.from_numpy(rows)]
        unet, scheduler, summary = train_recipe(recipe, images, seed)
        save_pipeline(unet, scheduler, output)
    else:
        subset_file = folder / "subset.json"
        subset_file.write_text(json.dumps({"subset": m, "seed": seed, "rows": rows.tolist(),
                                           "uids": [subsets.train_uids[i] for i in rows]}))
        cmd = command.format(subset_file=shlex.quote(str(subset_file)),
                             output_dir=shlex.quote(str(output)), seed=seed, subset=m,
                             base_model=shlex.quote(str(base_model or "")))
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EvalError(f"training command for subset {m} failed (exit {proc.returncode}): {cmd}\n"
                           f"{proc.stderr[-2000:]}")
        if base_model is not None and not list(output.glob("*.safetensors")):
            raise EvalError(f"training command for subset {m} left no LoRA weights in {output}; "
                           f"save the adapter there with save_lora_weights(..., "
                           f"safe_serialization=True)")
        if base_model is None and not (output / "unet").is_dir():
            raise EvalError(f"training command for subset {m} left no diffusers pipeline in "
                           f"{output}; save one there with save_pretrained")
        summary = {}
    seconds = time.perf_counter() - started
    (folder / MARKER).write_text(json.dumps({**identity, "summary": summary, "seconds": seconds}))
    return {"subset": m, "skipped": False, "seconds": seconds}


def run_train(train_source: str, subsets_path: Path, out: Path, recipe: dict | None,
              command: str | None = None, jobs: int = 1, subsets_only: list[int] | None = None,
              threads: int = 1, log=print, options=None, base_model: str | None = None) -> dict:
    """Train this rank's unfinished subsets, ``jobs`` processes at a time; returns a summary.

    ``base_model``: for LoRA configs, the base pipeline every subset's adapter fine-tunes.
    """
    from .. import dist
    from .lds import load_subsets

    subsets = load_subsets(subsets_path)
    if recipe is None and command is None:
        raise EvalError("nothing to train with: pass --recipe (built-in recipe) or --command TEMPLATE")
    if command is not None:
        for key in ("{subset_file}", "{output_dir}"):
            if key not in command:
                raise EvalError(f"--command {command!r} lacks {key}; the template must use "
                               f"{{subset_file}} and {{output_dir}}")
    mine = dist.owned_units(len(subsets.mask_MN), dist.current(device="cpu"))
    if subsets_only is not None:
        mine = [m for m in mine if m in set(subsets_only)]
    started = time.perf_counter()
    base = None if base_model is None else str(base_model)
    args = [(train_source, str(subsets_path), m, str(out), recipe, command, threads, options, base)
            for m in mine]
    results = []
    if jobs <= 1:
        for a in args:
            results.append(train_one(*a))
            log(f"lds train: subset {a[2]} {'skipped' if results[-1]['skipped'] else 'done'} "
                f"({len(results)}/{len(args)}, {results[-1]['seconds']:.1f} s)")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(train_one, *a) for a in args]
            for fut in as_completed(futures):
                results.append(fut.result())
                r = results[-1]
                elapsed = time.perf_counter() - started
                eta = elapsed / len(results) * (len(args) - len(results))
                log(f"lds train: subset {r['subset']} {'skipped' if r['skipped'] else 'done'} "
                    f"({len(results)}/{len(args)}, {r['seconds']:.1f} s, ETA {eta:.0f} s)")
    return {"trained": sum(not r["skipped"] for r in results),
            "skipped": sum(r["skipped"] for r in results), "seconds": time.perf_counter() - started}
