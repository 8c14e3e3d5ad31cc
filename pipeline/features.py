"""Per-sample gradient features of diffusion readouts (DESIGN.md section 1), with torch.func.

For each sample x, timestep t on the grid and noise draw s, with keyed noise eps(uid, t, s):
    x_t = scheduler.add_noise(x, eps, t),  pred = eps_theta(x_t, t)
    loss = mean_j (pred - eps)_j^2,  square = mean_j pred_j^2,  mean = mean_j pred_j
    g_R(x) = 1/(K S) sum_{t,s} w_{t,s} grad_theta R,  w = 1 or 1/||grad_theta R|| (normalize)
    r(x) = sqrt(1/(K S) sum loss),  rho(x) = 1/(K S) sum mean_j (pred - eps)_j
All readouts come from one shared forward pass per (sample, item); reverse-mode gives each
readout's gradient from that pass (``jacrev`` over the R readouts).

Legend: B samples, I (timestep, draw) items, R readouts, P attributed parameters, K proj dim.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import functional_call, jacrev, vmap

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


def timestep_grid(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """(K,) int64: t_j = j * (T // K), j = 0..K-1."""
    if not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(f"[features] timesteps = {num_timesteps}: must be in [1, "
                         f"{num_train_timesteps}] (the scheduler's train timesteps)")
    return torch.arange(num_timesteps, dtype=torch.int64) * (num_train_timesteps // num_timesteps)


def item_grid(spec: FeatureSpec, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(I,) timesteps and (I,) draw indices of the K*S items, timestep-major."""
    ts_K = timestep_grid(num_train_timesteps, spec.timesteps)
    ts_I = ts_K.repeat_interleave(spec.noise_draws)
    draws_I = torch.arange(spec.noise_draws).repeat(spec.timesteps)
    return ts_I, draws_I


def noise_key(seed: int, uid: str, t: int, draw: int) -> int:
    """63-bit generator seed for the noise of (run seed, sample uid, timestep, draw)."""
    digest = hashlib.blake2b(f"{seed}|{uid}|{t}|{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_noise(seed: int, uids: list[str], ts_I: torch.Tensor, draws_I: torch.Tensor,
                shape: tuple[int, ...]) -> torch.Tensor:
    """(B, I, *shape) float32 standard normal noise; row (b, i) depends only on its key.

    Drawn on the CPU from a generator seeded by ``noise_key`` so it is the same on any device,
    batch size, rank count and unit order.
    """
    out = torch.empty(len(uids), len(ts_I), *shape)
    gen = torch.Generator(device="cpu")
    for b, uid in enumerate(uids):
        for i, (t, draw) in enumerate(zip(ts_I.tolist(), draws_I.tolist(), strict=True)):
            gen.manual_seed(noise_key(seed, uid, t, draw))
            out[b, i] = torch.randn(shape, generator=gen)
    return out


@contextmanager
def math_attention():
    """torch.func transforms need the math SDPA backend (the fused CPU kernels lack vmap rules)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@dataclass
class BatchFeatures:
    grads_RBP: torch.Tensor
    """Per-sample gradient features g_R (unprojected), readouts in spec order."""
    residual_B: torch.Tensor
    rho_B: torch.Tensor


def _readouts(pred, eps, index):
    pred_f, diff_f = pred.flatten(1), (pred - eps).flatten(1)
    values = torch.stack([diff_f.pow(2).mean(1), pred_f.pow(2).mean(1), pred_f.mean(1)])
    return values[index], (values[0], diff_f.mean(1))


def per_sample_gradients(unet: torch.nn.Module, scheduler, x_BCHW: torch.Tensor, uids: list[str],
                         spec: FeatureSpec, param_names: list[str] | None = None,
                         items_per_pass: int = 0) -> BatchFeatures:
    """Per-sample gradient features of one batch (vmap over samples of jacrev of the readouts).

    Args:
        unet: eval-mode UNet2DModel already on the target device and in ``spec.dtype``.
        scheduler: diffusers scheduler providing ``add_noise`` and ``config.num_train_timesteps``.
        x_BCHW: clean samples in [-1, 1], any dtype/device (moved to the unet's).
        uids: B sample uids (noise keys).
        param_names: attributed parameters (default: all), in the order of the flat vector.
        items_per_pass: (t, draw) items per vmapped pass; 0 = all. Bounds activation memory.
    Returns:
        BatchFeatures with grads (R, B, P) in ``spec.dtype`` on the unet's device.
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
    ts_I, draws_I = item_grid(spec, int(scheduler.config.num_train_timesteps))
    eps_BI = keyed_noise(spec.seed, uids, ts_I, draws_I, tuple(x_BCHW.shape[1:]))
    x_B = x_BCHW.to(torch.float32).cpu()
    B = len(uids)
    # x_t in float32 on the CPU with the scheduler's own add_noise, then cast: device-independent.
    xt_BI = scheduler.add_noise(x_B[:, None].expand_as(eps_BI).reshape(B * num_items, *x_B.shape[1:]),
                                eps_BI.reshape(B * num_items, *x_B.shape[1:]),
                                ts_I.repeat(B)).view_as(eps_BI)
    xt_BI, eps_BI = xt_BI.to(device, dtype), eps_BI.to(device, dtype)
    ts_I = ts_I.to(device)

    def forward(p, xt, t, eps):
        pred = functional_call(unet, (p, frozen), (xt, t)).sample
        return _readouts(pred, eps, index)

    chunk = items_per_pass or num_items
    grads = {n: torch.zeros(len(spec.readouts), B, *p.shape, dtype=dtype, device=device)
             for n, p in params.items()}
    loss_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    rho_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    with math_attention():
        for lo in range(0, num_items, chunk):
            hi = min(num_items, lo + chunk)
            xt, eps, t = xt_BI[:, lo:hi], eps_BI[:, lo:hi], ts_I[lo:hi]
            if not spec.normalize:
                # Gradient of the readouts summed over this sample's items: one jacrev per sample.
                def summed(p, xt_i, eps_i, t=t):
                    values_RI, aux = forward(p, xt_i, t, eps_i)
                    return values_RI.sum(1), aux

                jac, (loss_I, rho_I) = vmap(jacrev(summed, has_aux=True),
                                            in_dims=(None, 0, 0))(params, xt, eps)
                for n in names:
                    grads[n] += jac[n].transpose(0, 1)
            else:
                # One jacrev per (sample, item): needed for the per-item norms.
                n_items = hi - lo

                def single(p, xt_1, t_1, eps_1):
                    values_R1, aux = forward(p, xt_1[None], t_1[None], eps_1[None])
                    return values_R1[:, 0], aux

                jac, (loss_I, rho_I) = vmap(jacrev(single, has_aux=True), in_dims=(None, 0, 0, 0))(
                    params, xt.reshape(B * n_items, *xt.shape[2:]), t.repeat(B),
                    eps.reshape(B * n_items, *eps.shape[2:]))
                sq_norm = sum(j.flatten(2).pow(2).sum(2) for j in jac.values())  # (B*I, R)
                norm = sq_norm.sqrt()
                weight = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
                for n in names:
                    j = jac[n] * weight.view(*weight.shape, *([1] * (jac[n].ndim - 2)))
                    grads[n] += j.view(B, n_items, *j.shape[1:]).sum(1).transpose(0, 1)
                loss_I, rho_I = loss_I.view(B, n_items), rho_I.view(B, n_items)
            loss_sum_B += loss_I.to(torch.float64).sum(-1)
            rho_sum_B += rho_I.to(torch.float64).sum(-1)
    flat_RBP = torch.cat([grads[n].flatten(2) for n in names], dim=2).div_(num_items)
    residual_B = (loss_sum_B / num_items).sqrt().to(dtype)
    rho_B = (rho_sum_B / num_items).to(dtype)
    return BatchFeatures(flat_RBP, residual_B, rho_B)
