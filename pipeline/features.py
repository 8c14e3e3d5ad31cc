"""Per-sample gradient features of diffusion readouts (docs/DESIGN.md, "Features"), with torch.func.

For each sample x, timestep t on the grid and noise draw s, with keyed noise eps(key(x), t, s):
    x_t = scheduler.add_noise(x, eps, t),  pred = model(x_t, t [, caption embedding])
    loss = mean_j (pred - target)_j^2,  square = mean_j pred_j^2,  mean = mean_j pred_j
    target = eps for epsilon-prediction schedulers, v = scheduler.get_velocity(x, eps, t) for
    v_prediction ones; `square` and `mean` read the raw model output either way.
    g_R(x) = 1/(K S) sum_{t,s} w_{t,s} grad_theta R,  w = 1 or 1/||grad_theta R|| (normalize)
    r(x) = sqrt(1/(K S) sum loss),  rho(x) = 1/(K S) sum mean_j (pred - target)_j
All readouts come from one shared forward pass per (sample, item); reverse-mode gives each
readout's gradient from that pass (``jacrev`` over the R readouts).

Noise keys (``noise_keys``): with ``noise = "content"`` a sample's key is a hash of its
content (its float32 pixels as loaded on the CPU, and its caption), so two different samples
never share noise whatever their names, splits or file types, and an image queried as itself
gets exactly its training features. With ``noise = "common"`` every sample shares the noise of
(seed, t, draw) (common random numbers, as D-TRAK's code effectively does).

Legend: B samples, I (timestep, draw) items, R readouts, P attributed parameters, K proj dim,
L caption tokens, D text embedding width.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import functional_call, jacrev, vmap

from .errors import ConfigError

ALL_READOUTS = ("loss", "square", "mean")


@dataclass(frozen=True)
class FeatureSpec:
    """The result-affecting settings of feature extraction."""

    readouts: tuple[str, ...]
    timesteps: int
    noise_draws: int
    seed: int
    normalize: bool = False
    dtype: torch.dtype = torch.float32
    grid: str = "uniform"
    """``[features] timestep_grid``: uniform or centered (``timestep_grid``)."""


def timestep_grid(num_train_timesteps: int, num_timesteps: int, grid: str = "uniform") -> torch.Tensor:
    """(K,) int64 timesteps: uniform t_j = j * (T // K), or centered t_j = floor((j + 1/2) T / K),
    j = 0..K-1 (distinct for every K <= T)."""
    if not 1 <= num_timesteps <= num_train_timesteps:
        raise ConfigError(f"[features] timesteps = {num_timesteps}: must be in [1, "
                         f"{num_train_timesteps}] (the scheduler's train timesteps)")
    j = torch.arange(num_timesteps, dtype=torch.int64)
    if grid == "centered":
        return (2 * j + 1) * num_train_timesteps // (2 * num_timesteps)
    assert grid == "uniform", grid
    return j * (num_train_timesteps // num_timesteps)


def item_grid(spec: FeatureSpec, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I,) timesteps and (I,) draw indices of the K*S items, timestep-major."""
    ts_K = timestep_grid(num_train_timesteps, spec.timesteps, spec.grid)
    ts_I = ts_K.repeat_interleave(spec.noise_draws)
    draws_I = torch.arange(spec.noise_draws).repeat(spec.timesteps)
    return ts_I, draws_I


COMMON_KEY = "common"


def content_keys(pixels_BCHW: torch.Tensor, captions: list[str | None] | None = None) -> list[str]:
    """Noise keys of samples from their content: sha256 of each sample's float32 pixels in
    [-1, 1] (shape and bytes, as loaded on the CPU) and its caption. Same image and caption,
    same key, whatever the sample's name, split or file type."""
    pixels = pixels_BCHW.detach().to("cpu", torch.float32).contiguous()
    keys = []
    for b in range(pixels.shape[0]):
        h = hashlib.sha256(str(tuple(pixels.shape[1:])).encode())
        h.update(pixels[b].numpy().tobytes())
        if captions is not None and captions[b] is not None:
            h.update(b"\x00caption\x00" + captions[b].encode())
        keys.append(h.hexdigest()[:32])
    return keys


def noise_keys(mode: str, pixels_BCHW: torch.Tensor, captions: list[str | None] | None = None
               ) -> list[str]:
    """The noise keys of a batch under ``[features] noise`` (``content`` or ``common``)."""
    if mode == "common":
        return [COMMON_KEY] * pixels_BCHW.shape[0]
    assert mode == "content", mode
    return content_keys(pixels_BCHW, captions)


def noise_key(seed: int, key: str, t: int, draw: int) -> int:
    """63-bit generator seed for the noise of (run seed, sample key, timestep, draw)."""
    digest = hashlib.blake2b(f"{seed}|{key}|{t}|{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_noise(seed: int, keys: list[str], ts_I: torch.Tensor, draws_I: torch.Tensor,
                shape: tuple[int, ...]) -> torch.Tensor:
    """(B, I, *shape) float32 standard normal noise; row (b, i) depends only on its key.

    Drawn on the CPU from a generator seeded by ``noise_key`` so it is the same on any device,
    batch size, rank count and unit order.
    """
    out = torch.empty(len(keys), len(ts_I), *shape)
    gen = torch.Generator(device="cpu")
    for b, key in enumerate(keys):
        for i, (t, draw) in enumerate(zip(ts_I.tolist(), draws_I.tolist(), strict=True)):
            gen.manual_seed(noise_key(seed, key, t, draw))
            out[b, i] = torch.randn(shape, generator=gen)
    return out


def noised_items(scheduler, x_BCHW: torch.Tensor, keys: list[str], spec: FeatureSpec
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t (B, I, C, H, W), t (I,), target (B, I, C, H, W)) of the K*S items of each sample.

    x_t and the target (eps, or v for v_prediction schedulers) are computed in float32 on the
    CPU with the scheduler's own formulas, so they are the same on every device.
    """
    ts_I, draws_I = item_grid(spec, int(scheduler.config.num_train_timesteps))
    shape = tuple(x_BCHW.shape[1:])
    eps_BI = keyed_noise(spec.seed, keys, ts_I, draws_I, shape)
    B, num_items = len(keys), len(ts_I)
    x0 = x_BCHW.to(torch.float32).cpu()[:, None].expand_as(eps_BI).reshape(B * num_items, *shape)
    flat_eps, flat_t = eps_BI.reshape(B * num_items, *shape), ts_I.repeat(B)
    xt_BI = scheduler.add_noise(x0, flat_eps, flat_t).view_as(eps_BI)
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        target_BI = scheduler.get_velocity(x0, flat_eps, flat_t).view_as(eps_BI)
    else:
        target_BI = eps_BI
    return xt_BI, ts_I, target_BI


@contextmanager
def math_attention(autocast: bool = False):
    """SDPA backends that work under torch.func transforms.

    float32/float64: the math backend (the fused CPU kernels lack batching rules). Under bf16
    autocast the math backend's batched backward fails on mixed dtypes (torch 2.13), while the
    flash backend runs through functorch's (slower) fallback, so it is allowed there.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION] if autocast else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        yield


@dataclass
class BatchFeatures:
    grads_RBP: torch.Tensor | None
    """Per-sample gradient features g_R (unprojected), readouts in spec order; None when the
    gradients were projected as they were produced (``project`` given)."""
    residual_B: torch.Tensor
    rho_B: torch.Tensor
    feats_RBK: torch.Tensor | None = None
    """The projected features P g_R, when ``project`` was given."""


def _readouts(pred, target, index):
    pred_f, diff_f = pred.flatten(1), (pred - target).flatten(1)
    values = torch.stack([diff_f.pow(2).mean(1), pred_f.pow(2).mean(1), pred_f.mean(1)])
    return values[index], (values[0], diff_f.mean(1))


def per_sample_gradients(unet: torch.nn.Module, scheduler, x_BCHW: torch.Tensor, keys: list[str],
                         spec: FeatureSpec, param_names: list[str] | None = None,
                         items_per_pass: int = 0, cond_BLD: torch.Tensor | None = None,
                         vmap_chunk_size: int = 0, autocast: bool = False,
                         project=None) -> BatchFeatures:
    """Per-sample gradient features of one batch (vmap over samples of jacrev of the readouts).

    With ``project(x_nP, row_offset) -> (n, K)`` (the JL projection of columns starting at
    ``row_offset`` of the flat parameter vector), each parameter tensor's per-sample gradients
    are projected as soon as they are produced and summed into (R, B, K) features: at most one
    copy of the per-sample gradients exists at any time. Projection is linear, so this equals
    projecting the flat vector (to float rounding).

    Args:
        unet: eval-mode UNet already on the target device and in ``spec.dtype``.
        scheduler: diffusers scheduler providing ``add_noise`` (and ``get_velocity`` for
            v_prediction) and ``config.num_train_timesteps``.
        x_BCHW: clean samples (pixels in [-1, 1], or scaled VAE latents), any dtype/device.
        keys: B noise keys (``noise_keys``).
        param_names: attributed parameters (default: all), in the order of the flat vector.
            Gradients are computed for these only; the others are held constant.
        items_per_pass: (t, draw) items per vmapped pass; 0 = all. Bounds activation memory.
        cond_BLD: per-sample caption embeddings for text-conditioned UNets.
        vmap_chunk_size: samples per vmap chunk (0 = all). Bounds gradient memory.
        autocast: run the forward pass under bf16 autocast (gradients stay float32).
    Returns:
        BatchFeatures with grads (R, B, P), or with ``project`` the features (R, B, K), in
        ``spec.dtype`` on the unet's device.
    """
    device = next(unet.parameters()).device
    dtype = spec.dtype
    all_params = dict(unet.named_parameters())
    names = list(all_params) if param_names is None else list(param_names)
    params = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    frozen.update({n: b for n, b in unet.named_buffers()})
    index = torch.tensor([ALL_READOUTS.index(r) for r in spec.readouts])
    num_items = spec.timesteps * spec.noise_draws
    shape = tuple(x_BCHW.shape[1:])
    B = len(keys)
    xt_BI, ts_I, target_BI = noised_items(scheduler, x_BCHW, keys, spec)
    xt_BI, target_BI = xt_BI.to(device, dtype), target_BI.to(device, dtype)
    ts_I = ts_I.to(device)
    cond_BLD = None if cond_BLD is None else cond_BLD.to(device, dtype)

    def forward(p, xt, t, target, cond):
        kwargs = {} if cond is None else {"encoder_hidden_states": cond.expand(len(xt), *cond.shape[-2:])}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = functional_call(unet, (p, frozen), (xt, t), kwargs).sample
        return _readouts(pred.to(dtype), target, index)

    chunk = items_per_pass or num_items
    vmap_kw = {"chunk_size": vmap_chunk_size} if vmap_chunk_size else {}
    cond_dim = None if cond_BLD is None else 0
    R = len(spec.readouts)
    offsets, total = {}, 0
    for n in names:
        offsets[n], total = total, total + params[n].numel()
    feats_RBK = None
    if project is None:
        grads = {n: torch.zeros(R, B, *p.shape, dtype=dtype, device=device) for n, p in params.items()}

    def add(n: str, grad_BR: torch.Tensor) -> None:
        """Accumulate one tensor's per-sample gradients (B, R, *shape), summed over items."""
        nonlocal feats_RBK
        if project is None:
            grads[n] += grad_BR.transpose(0, 1)
            return
        out = project(grad_BR.reshape(B * R, -1), offsets[n]).view(B, R, -1).transpose(0, 1)
        feats_RBK = out.to(dtype) if feats_RBK is None else feats_RBK.add_(out)

    loss_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    rho_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    with math_attention(autocast):
        for lo in range(0, num_items, chunk):
            hi = min(num_items, lo + chunk)
            xt, target, t = xt_BI[:, lo:hi], target_BI[:, lo:hi], ts_I[lo:hi]
            if not spec.normalize:
                # Gradient of the readouts summed over this sample's items: one jacrev per sample.
                def summed(p, xt_i, target_i, cond_i, t=t):
                    values_RI, aux = forward(p, xt_i, t, target_i, cond_i)
                    return values_RI.sum(1), aux

                jac, (loss_I, rho_I) = vmap(jacrev(summed, has_aux=True),
                                            in_dims=(None, 0, 0, cond_dim), **vmap_kw)(
                    params, xt, target, cond_BLD)
                for n in names:
                    add(n, jac.pop(n))
            else:
                # One jacrev per (sample, item): needed for the per-item norms.
                n_items = hi - lo

                def single(p, xt_1, t_1, target_1, cond_1):
                    values_R1, aux = forward(p, xt_1[None], t_1[None], target_1[None], cond_1)
                    return values_R1[:, 0], aux

                cond = None if cond_BLD is None else cond_BLD.repeat_interleave(n_items, dim=0)
                jac, (loss_I, rho_I) = vmap(jacrev(single, has_aux=True),
                                            in_dims=(None, 0, 0, 0, cond_dim), **vmap_kw)(
                    params, xt.reshape(B * n_items, *shape), t.repeat(B),
                    target.reshape(B * n_items, *shape), cond)
                sq_norm = sum(j.flatten(2).pow(2).sum(2) for j in jac.values())  # (B*I, R)
                norm = sq_norm.sqrt()
                weight = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
                for n in names:
                    j = jac.pop(n)
                    j = j * weight.view(*weight.shape, *([1] * (j.ndim - 2)))
                    add(n, j.view(B, n_items, *j.shape[1:]).sum(1))
                loss_I, rho_I = loss_I.view(B, n_items), rho_I.view(B, n_items)
            loss_sum_B += loss_I.to(torch.float64).sum(-1)
            rho_sum_B += rho_I.to(torch.float64).sum(-1)
    residual_B = (loss_sum_B / num_items).sqrt().to(dtype)
    rho_B = (rho_sum_B / num_items).to(dtype)
    if project is not None:
        return BatchFeatures(None, residual_B, rho_B, feats_RBK.div_(num_items))
    flat_RBP = torch.cat([grads[n].flatten(2) for n in names], dim=2).div_(num_items)
    return BatchFeatures(flat_RBP, residual_B, rho_B)
