"""Factored extraction engine: Kronecker-projected per-sample gradients without forming them.

For a Linear or Conv2d layer y = W a (+ b) the per-sample gradient of a readout R is
G = sum_pos delta_pos a_pos^T (delta = dR/dy at each position / token / patch), so with
per-layer factors P_out (k_out, out) and P_in (k_in, in):

    P_out G P_in^T = sum_pos (P_out delta_pos)(P_in a_pos)^T,   vec(P_out G P_in^T) = (P_out (x) P_in) vec(G)

(row-major vec). P_in is applied to the layer input in a forward hook (a conv with the layer's
kernel, stride, padding and dilation whose weight is P_in), P_out to the output gradient that one
batched ``torch.autograd.grad`` per readout returns for every hooked output. Samples are
independent in a UNet (GroupNorm / LayerNorm act per sample), so the gradient of the batch sum of
a readout w.r.t. a layer output holds each sample's own delta. The outer products are summed per
sample over positions and (timestep, draw) items. No tensor of size B x P is ever allocated, and
no weight gradient is computed at all (only input gradients flow).

Rules (they define the features; ``FactoredPlan.identity`` records them):
- Bias: the layer input is augmented with a constant 1, so P_in has in + 1 columns and the bias
  gradient is column ``in`` of G. A layer whose bias alone is attributed has in = 0, k_in = 1.
- Grouped convs (groups = g): G's row o holds the gradient of W[o] (C_in/g * kh * kw columns);
  one P_in serves every group and P_out mixes all C_out rows: still vec(P_out G P_in^T).
- Dimensions: every attributed module m gets k_m proportional to sqrt(numel of its attributed
  parameters) (or to given per-module ``weights``, e.g. ``energy_weights`` of a calibration
  batch), bounded to [1, numel], summing to ``dim`` exactly (water-filling, then largest
  remainders). A Kronecker layer splits k_m into k_out x k_in with k_out / k_in ~ sqrt(out / in),
  1 <= k_out <= out, 1 <= k_in <= in (+1), k_out * k_in >= k_m (least waste within a factor
  sqrt(2) of the target ratio: ``factor_dims``), and keeps the first k_m entries of
  the row-major k_out x k_in block, scaled by sqrt(k_out k_in / k_m) (folded into P_out) so every
  kept row has entries +-1/sqrt(k_m): standard JL scale, E||block||^2 = ||G||^2.
- Factors: ``kernels.reference.matrix_block`` (Philox, kernels/README.md) with seed
  blake2b("{seed}|{module name}|in" or "out") mod 2**63, scaled by 1/sqrt(k_in), 1/sqrt(k_out).
- Rest: attributed parameters of any other module share one block of dim k_rest (the sum of
  their modules' shares) at the end of the feature vector, projected with ``kernels.project``
  (seed blake2b("{seed}|<rest>|rest")) from their exact per-sample gradients (B x p_rest):
  GroupNorm / LayerNorm affine parameters from forward hooks (dgamma = sum delta * xhat,
  dbeta = sum delta), anything else (embeddings, Fourier features, custom modules) by vmap over
  samples of jacrev restricted to those parameters (a second, slower pass; see ``coverage``).
- Feature layout: Kronecker layers in ``unet.named_modules()`` order, then the rest block.

Hooked (Kronecker) modules: ``nn.Linear`` and ``nn.Conv2d`` (any groups, stride, padding,
padding mode, dilation; subclasses only if they keep the stock forward), including peft's
``lora_A`` / ``lora_B`` submodules. Assumptions, checked where cheap: every hooked module sees
batch-first inputs whose rows are the pass's (sample, item) rows (else ValueError naming the
layer); its output is not modified in place (ValueError); its weight is used only in its own
forward (not checkable: true for diffusers' UNets and plain peft LoRA, which the twin tests
cover; DoRA-like peft variants are refused). Parameters are temporarily set to
requires_grad=False during a pass (restored afterwards): no weight gradient is needed.

Memory: activations of B * items_per_pass rows (as training on that batch), the projected inputs
(k_in channels per hooked layer), R x B x K features and R x B x p_rest rest gradients; nothing
of size B x P.

Slow twin: ``kron_projection_dense`` (the explicit (P, K) matrix); tests/test_factored.py checks
features == (per-sample gradients from a for-loop of backward()) @ that matrix in float64, and
once against ``features.per_sample_gradients`` on ``noised_items`` end to end.

Legend: B samples, I (timestep, draw) items, N = B x items of one pass (sample-major rows),
R readouts, K total dim, P attributed parameters, O layer output channels / features,
A augmented layer input (C_in/g * kh * kw [+ 1]), S positions, G conv groups,
Ko / Ki factor dims, L caption tokens, D text embedding width.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .features import ALL_READOUTS, FeatureSpec, math_attention, noised_items  # noqa: F401 (re-exported)
from .kernels import project
from .kernels.reference import DENSE_KINDS, RNG_VERSION, matrix_block

ENGINE = "factored-kron/v1"
SEED_RULE = "blake2b('{seed}|{module}|{in,out,rest}', 8 bytes, little) mod 2**63"
NORMS = (nn.GroupNorm, nn.LayerNorm)


def derived_seed(seed: int, module: str, side: str) -> int:
    """63-bit seed of one factor: a pure function of (plan seed, module name, side)."""
    digest = hashlib.blake2b(f"{seed}|{module}|{side}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class KronLayer:
    """One hooked Linear / Conv2d; its block is feats[..., offset : offset + k_block]."""

    name: str
    type_name: str
    weight: str | None  # attributed weight's parameter name (None: bias only)
    bias: str | None
    out_dim: int  # O
    in_dim: int  # A, augmented (+1 when the bias is attributed)
    groups: int
    k_out: int
    k_in: int
    k_block: int
    offset: int


@dataclass(frozen=True)
class RestParam:
    """An attributed parameter outside any Kronecker layer: rest vector [offset, offset + numel)."""

    name: str
    module: str
    type_name: str
    path: str  # "norm" (hooked GroupNorm / LayerNorm) or "generic" (vmap of jacrev)
    attr: str  # attribute name on the module ("weight", "bias", ...)
    numel: int
    offset: int


@dataclass
class FactoredPlan:
    """Per-layer Kronecker factors and dimensions for one (UNet, attributed parameters, k, seed).

    Build with ``FactoredPlan.build``; the factors are generated there once (float32, CPU) and
    cast per (device, dtype) on first use, then cached.
    """

    dim: int
    seed: int
    kind: str
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[KronLayer, ...]
    rest: tuple[RestParam, ...]
    rest_dim: int
    allocation: str  # "sqrt-numel" (default rule) or "weights" (given per-module weights)
    _signs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)
    _cache: dict = field(repr=False, default_factory=dict)

    @property
    def rest_offset(self) -> int:
        return self.dim - self.rest_dim

    @property
    def module_names(self) -> list[str]:
        """Attributed modules in allocation order: Kronecker layers, then rest modules."""
        return [lay.name for lay in self.layers] + list(dict.fromkeys(r.module for r in self.rest))

    @property
    def rest_seed(self) -> int:
        return derived_seed(self.seed, "<rest>", "rest")

    @classmethod
    def build(cls, unet: nn.Module, param_names: list[str] | None, dim: int, seed: int,
              kind: str = "rademacher", weights: dict[str, float] | None = None) -> FactoredPlan:
        """Plan the factored projection of ``param_names`` (default: all) to ``dim`` features.

        ``weights``: optional allocation weight per attributed module name (k_m ~ weights[m]
        instead of sqrt(numel)), e.g. from ``energy_weights`` on a calibration batch; every
        attributed module needs one (``FactoredPlan.build(...).module_names`` lists them).

        Raises:
            ValueError: unknown or repeated names, kind not dense, dim outside
                [number of attributed modules, number of attributed parameters], a parameter
                shared by two modules, or a non-vanilla peft LoRA variant (DoRA, ...).
        """
        if kind not in DENSE_KINDS:
            raise ValueError(f"factored projection kind={kind!r}: the per-layer factors must be dense; "
                             f"use one of {DENSE_KINDS} (sjlt is only for the dense engine)")
        if not 0 <= seed < 2**64:
            raise ValueError(f"projection seed={seed} is outside [0, 2**64); pick a smaller seed")
        named = dict(unet.named_parameters())
        names = list(named) if param_names is None else list(param_names)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"attributed parameter {unknown[0]!r} is not a parameter of this UNet; "
                             f"names look like {next(iter(named))!r}")
        if len(set(names)) != len(names):
            raise ValueError("param_names repeats a name; pass each attributed parameter once")
        chosen = set(names)
        first_owner: dict[int, tuple[str, str]] = {}  # id(param) -> (module name, full name)
        units = []  # (module name, module, {attr: full name}) in named_modules order
        for mod_name, mod in unet.named_modules():
            attrs = {}
            for attr, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{attr}" if mod_name else attr
                owner, owner_full = first_owner.setdefault(id(p), (mod_name, full))
                if owner != mod_name and owner_full in chosen:
                    raise ValueError(f"parameter {owner_full!r} is shared by modules {owner!r} and "
                                     f"{mod_name!r}; the factored engine needs one owner per attributed "
                                     f"parameter: leave it out of param_names or use the dense engine")
                if full in chosen:
                    attrs[attr] = full
            if attrs:
                units.append((mod_name, mod, attrs))
        _refuse_lora_variants(unet, chosen)

        kron, rest = [], []
        for mod_name, mod, attrs in units:
            structured = (type(mod).forward in (nn.Linear.forward, nn.Conv2d.forward)
                          and isinstance(mod, (nn.Linear, nn.Conv2d)) and set(attrs) <= {"weight", "bias"})
            if structured:
                kron.append((mod_name, mod, attrs))
            else:
                path = "norm" if isinstance(mod, NORMS) and set(attrs) <= {"weight", "bias"} else "generic"
                rest.append((mod_name, mod, attrs, path))
        sizes = [sum(named[n].numel() for n in attrs.values()) for _, _, attrs in kron]
        sizes += [sum(named[n].numel() for n in attrs.values()) for _, _, attrs, _ in rest]
        if dim < len(sizes) or dim > sum(sizes):
            raise ValueError(f"projection dim={dim}: the factored engine needs dim between the number "
                             f"of attributed modules ({len(sizes)}) and of attributed parameters "
                             f"({sum(sizes)}); choose a dim in that range or attribute other parameters")
        modules = [m for m, *_ in kron] + [m for m, *_ in rest]
        if weights is not None:
            missing = [m for m in modules if m not in weights]
            bad = [m for m in modules if m in weights and not (math.isfinite(weights[m]) and weights[m] >= 0)]
            if missing or bad or not any(weights.get(m, 0) > 0 for m in modules):
                raise ValueError(f"weights: need a finite weight >= 0 (some > 0) for every attributed "
                                 f"module; missing {missing[:3]}, invalid {bad[:3]}; compute them with "
                                 f"energy_weights(...) or pass weights=None (sqrt(numel) rule)")
        shares = allocate(sizes, dim, None if weights is None else [float(weights[m]) for m in modules])

        layers, signs, offset = [], {}, 0
        for (mod_name, mod, attrs), k_m in zip(kron, shares[:len(kron)], strict=True):
            w = mod.weight
            # a bias alone does not see the input: no groups then
            groups = mod.groups if isinstance(mod, nn.Conv2d) and "weight" in attrs else 1
            out_dim = w.shape[0]
            in_dim = (w[0].numel() if "weight" in attrs else 0) + ("bias" in attrs)
            k_out, k_in = factor_dims(k_m, out_dim, in_dim)
            layers.append(KronLayer(mod_name, type(mod).__name__, attrs.get("weight"), attrs.get("bias"),
                                    out_dim, in_dim, groups, k_out, k_in, k_m, offset))
            signs[mod_name] = tuple(
                matrix_block(kind, 0, d, k, derived_seed(seed, mod_name, side)).T.contiguous()
                for d, k, side in ((out_dim, k_out, "out"), (in_dim, k_in, "in")))
            offset += k_m
        # the rest vector follows the attributed-parameter order
        order = {n: i for i, n in enumerate(names)}
        entries = sorted(((full, mod_name, type(mod).__name__, path, attr)
                          for mod_name, mod, attrs, path in rest for attr, full in attrs.items()),
                         key=lambda e: order[e[0]])
        rest_params, at = [], 0
        for full, *info in entries:
            rest_params.append(RestParam(full, *info, named[full].numel(), at))
            at += named[full].numel()
        rest_dim = sum(shares[len(kron):])
        assert offset + rest_dim == dim
        return cls(dim, seed, kind, tuple(names), tuple(tuple(named[n].shape) for n in names),
                   tuple(layers), tuple(rest_params), rest_dim,
                   "sqrt-numel" if weights is None else "weights", signs)

    def factors(self, layer: KronLayer, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out (Ko, O), P_in (Ki, A)) of ``layer`` in ``dtype`` on ``device``, cached.

        P_out carries the truncation factor sqrt(k_out k_in / k_block).
        """
        key = (layer.name, torch.device(device), dtype)
        if key not in self._cache:
            out_signs, in_signs = self._signs[layer.name]
            fix = math.sqrt(layer.k_out * layer.k_in / layer.k_block)
            p_out = out_signs.to(device, dtype) * (fix / math.sqrt(layer.k_out))
            p_in = in_signs.to(device, dtype) * (1.0 / math.sqrt(layer.k_in))
            self._cache[key] = (p_out, p_in)
        return self._cache[key]

    def identity(self) -> dict:
        """What makes two factored projections equal; for the store fingerprint (JSON-ready)."""
        return {"engine": ENGINE, "kind": self.kind, "dim": self.dim, "seed": self.seed,
                "rng": RNG_VERSION, "seed_rule": SEED_RULE, "allocation": self.allocation,
                "layers": [[lay.name, lay.k_out, lay.k_in, lay.k_block] for lay in self.layers],
                "rest": {"dim": self.rest_dim, "tensors": len(self.rest),
                         "params": sum(r.numel for r in self.rest)}}

    def coverage(self) -> dict[str, dict[str, int]]:
        """Attributed modules per path ("kron", "norm", "generic") and module type: {type: count}."""
        out: dict[str, dict[str, int]] = {"kron": {}, "norm": {}, "generic": {}}
        for lay in self.layers:
            out["kron"][lay.type_name] = out["kron"].get(lay.type_name, 0) + 1
        for type_name, path in {r.module: (r.type_name, r.path) for r in self.rest}.values():
            out[path][type_name] = out[path].get(type_name, 0) + 1
        return out


def _refuse_lora_variants(unet: nn.Module, chosen: set[str]) -> None:
    # DoRA and other peft variants read lora_B.weight @ lora_A.weight outside the submodules'
    # forward, which hooks cannot see.
    for mod_name, mod in unet.named_modules():
        variants = getattr(mod, "lora_variant", None)
        if not variants:
            continue
        for adapter in variants:
            hit = [n for n in chosen if n.startswith(f"{mod_name}.") and f".{adapter}." in n]
            if hit:
                raise ValueError(f"{mod_name!r} uses a peft LoRA variant ({type(variants[adapter]).__name__})"
                                 f" for adapter {adapter!r}: its forward reads the LoRA weights outside "
                                 f"lora_A/lora_B, so the factored engine cannot hook them; use the dense "
                                 f"engine or plain LoRA")


def allocate(sizes: list[int], dim: int, weights: list[float] | None = None) -> list[int]:
    """Integers k_m in [1, sizes[m]] summing to ``dim``, k_m ~ weights[m] (default sqrt(sizes[m]))
    where unbounded.

    Water-filling: x_m = clamp(c w_m, 1, s_m) with c found by bisection so that sum x_m = dim,
    then floors plus one unit for the largest fractional parts. Pure Python arithmetic: the same
    inputs give the same dims on every machine.
    """
    assert len(sizes) <= dim <= sum(sizes) and min(sizes) >= 1
    if weights is None:
        roots = [math.sqrt(s) for s in sizes]
    else:
        top = max(weights)
        roots = [max(w, 1e-12 * top) for w in weights]

    def filled(c):
        return [min(max(c * r, 1.0), s) for r, s in zip(roots, sizes, strict=True)]

    lo, hi = 0.0, max(s / r for r, s in zip(roots, sizes, strict=True))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(filled(mid)) < dim else (lo, mid)
    x = filled(hi)
    k = [min(max(int(math.floor(v)), 1), s) for v, s in zip(x, sizes, strict=True)]
    order = sorted(range(len(k)), key=lambda m: k[m] - x[m])  # largest fractional part first
    while sum(k) != dim:
        step = 1 if sum(k) < dim else -1
        for m in order if step > 0 else reversed(order):
            if sum(k) == dim:
                break
            if 1 <= k[m] + step <= sizes[m]:
                k[m] += step
    return k


def factor_dims(k_block: int, out_dim: int, in_dim: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out <= out, k_in <= in, k_out * k_in >= k_block.

    Target k_out* = sqrt(k_block sqrt(out / in)) (so k_out / k_in ~ sqrt(out / in)); among the
    k_out within a factor sqrt(2) of it (k_in = ceil(k_block / k_out)), the least waste
    k_out * k_in - k_block, then the closest to the target.
    """
    assert 1 <= k_block <= out_dim * in_dim
    target = math.sqrt(k_block * math.sqrt(out_dim / in_dim))
    first, last = -(-k_block // in_dim), min(out_dim, k_block)  # the feasible k_out
    lo = min(max(first, math.floor(target / math.sqrt(2))), last)
    hi = max(min(last, math.ceil(target * math.sqrt(2))), lo)
    best = min(range(lo, hi + 1), key=lambda ko: (ko * -(-k_block // ko) - k_block,
                                                  abs(math.log(ko / target))))
    return best, -(-k_block // best)


def kron_projection_dense(plan: FactoredPlan, dtype=torch.float64) -> torch.Tensor:
    """Slow twin: the explicit (P, K) matrix M with features = grads_P @ M.

    Rows follow ``plan.param_names`` (each tensor flattened row-major), as the flat vectors of
    ``features.per_sample_gradients``; for tests and tiny models only (P x K entries).
    """
    sizes = [math.prod(s) for s in plan.param_shapes]
    starts = dict(zip(plan.param_names, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
    out_PK = torch.zeros(sum(sizes), plan.dim, dtype=dtype)
    for lay in plan.layers:
        p_out, p_in = plan.factors(lay, "cpu", dtype)
        kron_MK = torch.kron(p_out, p_in)[:lay.k_block].T  # M = O * A rows: o * A + j (row-major G)
        num_w = lay.in_dim - (lay.bias is not None)
        aug = torch.arange(lay.out_dim * lay.in_dim).view(lay.out_dim, lay.in_dim)
        cols = slice(lay.offset, lay.offset + lay.k_block)
        if lay.weight is not None:
            rows = starts[lay.weight] + torch.arange(lay.out_dim * num_w)
            out_PK[rows, cols] = kron_MK[aug[:, :num_w].reshape(-1)]
        if lay.bias is not None:
            rows = starts[lay.bias] + torch.arange(lay.out_dim)
            out_PK[rows, cols] = kron_MK[aug[:, num_w]]
    if plan.rest_dim:
        dense = matrix_block(plan.kind, 0, sum(r.numel for r in plan.rest), plan.rest_dim,
                             plan.rest_seed).to(dtype) / math.sqrt(plan.rest_dim)
        for r in plan.rest:
            rows = starts[r.name] + torch.arange(r.numel)
            out_PK[rows, plan.rest_offset:] = dense[r.offset:r.offset + r.numel]
    return out_PK


class FactoredFeatures(NamedTuple):
    feats_RBK: torch.Tensor
    """Projected features, readouts in the order asked for."""
    residual_B: torch.Tensor
    """r = sqrt(mean over items of the loss readout)."""
    rho_B: torch.Tensor
    """rho = mean over items of mean_j (pred - target)_j."""


def _readouts_3N(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, square, mean) per row (3, N) and mean_j (pred - target)_j (N,)."""
    pred_f, diff_f = pred.flatten(1), (pred - target).flatten(1)
    return torch.stack([diff_f.pow(2).mean(1), pred_f.pow(2).mean(1), pred_f.mean(1)]), diff_f.mean(1)


class _Recorder:
    """Forward hooks: project Kronecker-layer inputs with P_in, keep norm inputs, keep outputs."""

    def __init__(self, unet: nn.Module, plan: FactoredPlan, rows: int, device, dtype,
                 keep_inputs: bool = False):
        self.rows, self.calls, self.keep_inputs = rows, [], keep_inputs
        modules = dict(unet.named_modules())
        self.handles = []
        for lay in plan.layers:
            p_out, p_in = plan.factors(lay, device, dtype)
            self.handles.append(modules[lay.name].register_forward_hook(
                lambda m, args, out, lay=lay, p_in=p_in: self._kron(lay, p_in, m, args[0], out)))
        norm_modules = {r.module for r in plan.rest if r.path == "norm"}
        for name in norm_modules:
            self.handles.append(modules[name].register_forward_hook(
                lambda m, args, out, name=name: self._keep(name, m, args[0], out)))
        self.called = {lay.name: 0 for lay in plan.layers} | dict.fromkeys(norm_modules, 0)

    def _check_rows(self, name, module, x):
        if x.shape[0] != self.rows:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) got input of shape "
                             f"{tuple(x.shape)} whose first dim is not the batch ({self.rows} rows): "
                             f"the factored engine needs batch-first, per-sample layers; leave its "
                             f"parameters out of param_names or use the dense engine")

    def _record(self, path, what, aux, out):
        self.called[what.name if path == "kron" else what] += 1
        if out.requires_grad:
            self.calls.append((path, what, aux, out, out._version))
            return None
        # Nothing upstream needs a gradient: start the graph at this output. The model gets a
        # copy, so in-place ops downstream cannot touch the leaf whose gradient is read.
        out.requires_grad_(True)
        self.calls.append((path, what, aux, out, out._version))
        return out.clone()

    def _kron(self, lay: KronLayer, p_in, module, x, out):
        self._check_rows(lay.name, module, x)
        a = _project_input(lay, p_in, module, x, out)
        return self._record("kron", lay, (a, module, x if self.keep_inputs else None), out)

    def _keep(self, name, module, x, out):
        self._check_rows(name, module, x)
        return self._record("norm", name, (module, [x, None]), out)

    def check_versions(self):
        for _, what, _, out, version in self.calls:
            if out._version != version:
                name = what.name if isinstance(what, KronLayer) else what
                raise ValueError(f"the output of layer {name!r} is modified in place later in the "
                                 f"forward pass, so its gradient cannot be read; leave its parameters "
                                 f"out of param_names or use the dense engine")

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _project_input(lay: KronLayer, p_in, module, x, out):
    """P_in applied to each position's (augmented) input: Linear (N, S, Ki), Conv2d (N, G, Ki, S)."""
    rows = out.shape[0]
    has_bias = lay.bias is not None
    num_w = lay.in_dim - has_bias
    bias = p_in[:, -1] if has_bias else None
    if isinstance(module, nn.Linear):
        a = bias.expand(*out.shape[:-1], 1) if lay.weight is None else F.linear(x, p_in[:, :num_w], bias)
        return a.reshape(rows, -1, lay.k_in)
    if lay.weight is None:
        return bias.view(1, 1, 1, 1).expand(rows, 1, 1, out[0, 0].numel())
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    g = lay.groups
    w_in = p_in[:, :num_w].reshape(lay.k_in, *module.weight.shape[1:]).repeat(g, 1, 1, 1)
    a = F.conv2d(x, w_in, None if bias is None else bias.repeat(g), module.stride, padding,
                 module.dilation, g)
    return a.reshape(rows, g, lay.k_in, -1)


def _kron_block(lay: KronLayer, p_out, a, delta, num_samples):
    """(B, k_block): sum over items and positions of (P_out delta)(P_in a)^T, row-major.

    One (Ko, S) x (S, Ki) product per row (and group), then a sum over each sample's rows: no
    permuted copies of the activations.
    """
    rows = a.shape[0]
    if a.ndim == 3:  # Linear: a (N, S, Ki), delta (N, ..., O)
        d = delta.reshape(rows, -1, lay.out_dim) @ p_out.T  # (N, S, Ko)
        block = torch.bmm(d.transpose(1, 2), a)  # (N, Ko, Ki)
    else:  # Conv2d: a (N, G, Ki, S), delta (N, O, H', W')
        g = lay.groups
        delta = delta.reshape(rows, g, lay.out_dim // g, -1)
        if g == 1:
            d = torch.matmul(p_out, delta[:, 0])  # (N, Ko, S)
            block = torch.bmm(d, a[:, 0].transpose(1, 2))
        else:
            d = torch.einsum("kgc,ngcs->ngks", p_out.view(lay.k_out, g, -1), delta)
            block = torch.einsum("ngks,ngis->nki", d, a)
    return block.reshape(num_samples, -1, lay.k_out * lay.k_in).sum(1)[:, :lay.k_block]


def _kron_sqnorm(lay: KronLayer, module, x, delta, max_numel: int = 2**24) -> torch.Tensor:
    """(N,) exact ||G_n||_F^2 of each row's (augmented) gradient block, never all rows' G at once.

    Linear: the Gram identity sum_{s,s'} (delta_s . delta_s')(a_s . a_s') when S^2 (O + A) is the
    cheaper count, else G per row; Conv2d: unfolded patches times delta per row. Rows are taken
    in chunks so that no transient exceeds about ``max_numel`` elements.
    """
    rows = delta.shape[0]
    out_N = torch.zeros(rows, dtype=delta.dtype, device=delta.device)
    linear = isinstance(module, nn.Linear)
    if lay.bias is not None:
        bias_grad = delta.reshape(rows, -1, lay.out_dim).sum(1) if linear else delta.flatten(2).sum(2)
        out_N += bias_grad.pow(2).sum(1)
    if lay.weight is None:
        return out_N
    num_w = lay.in_dim - (lay.bias is not None)
    if linear:
        x_NSA, d_NSO = x.reshape(rows, -1, num_w), delta.reshape(rows, -1, lay.out_dim)
        S = x_NSA.shape[1]
        gram = S * S * (lay.out_dim + num_w) < S * lay.out_dim * num_w
        step = max(1, max_numel // (S * S if gram else lay.out_dim * num_w))
        for lo in range(0, rows, step):
            x_c, d_c = x_NSA[lo:lo + step], d_NSO[lo:lo + step]
            if gram:
                out_N[lo:lo + step] += ((d_c @ d_c.transpose(1, 2)) * (x_c @ x_c.transpose(1, 2))).sum((1, 2))
            else:
                out_N[lo:lo + step] += (d_c.transpose(1, 2) @ x_c).pow(2).sum((1, 2))
        return out_N
    g = lay.groups
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    positions = delta[0, 0].numel()
    step = max(1, max_numel // (num_w * g * positions))
    for lo in range(0, rows, step):
        x_c = F.pad(x[lo:lo + step], module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(x_c, module.kernel_size, module.dilation, 0, module.stride)
        patches = patches.view(len(x_c), g, num_w, positions)  # (n, G, A - bias, S)
        d_c = delta[lo:lo + step].reshape(len(x_c), g, lay.out_dim // g, positions)
        out_N[lo:lo + step] += (d_c @ patches.transpose(2, 3)).pow(2).sum((1, 2, 3))
    return out_N


def _norm_grads(module, aux: list, delta, num_samples) -> dict[str, torch.Tensor]:
    """Per-sample {"weight": (B, C...), "bias": ...} of a GroupNorm / LayerNorm call.

    ``aux`` = [module input, cached normalised input or None]; xhat is computed on first use
    and kept for the other readouts.
    """
    x, xhat = aux
    if xhat is None:
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x.detach(), module.num_groups, eps=module.eps)
        else:
            xhat = F.layer_norm(x.detach(), module.normalized_shape, eps=module.eps)
        aux[1] = xhat
    if isinstance(module, nn.GroupNorm):
        reduce = (delta * xhat).flatten(2).sum(2), delta.flatten(2).sum(2)  # (N, C)
    else:
        shape = (x.shape[0], -1, *module.normalized_shape)
        reduce = (delta * xhat).reshape(shape).sum(1), delta.reshape(shape).sum(1)
    return {k: v.reshape(num_samples, -1, *v.shape[1:]).sum(1).flatten(1)
            for k, v in zip(("weight", "bias"), reduce, strict=True)}


def _generic_grads(unet, plan, index, xt, t, target, cond):
    """(R, B, p_generic) per-sample gradients of the generic-path parameters (vmap of jacrev)."""
    generic = [r for r in plan.rest if r.path == "generic"]
    all_params = dict(unet.named_parameters())
    params = {r.name: all_params[r.name].detach() for r in generic}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    frozen.update(dict(unet.named_buffers()))

    def summed(p, xt_i, target_i, cond_i):
        kwargs = {} if cond_i is None else {"encoder_hidden_states": cond_i.expand(len(xt_i), *cond_i.shape)}
        pred = functional_call(unet, (p, frozen), (xt_i, t), kwargs).sample
        return _readouts_3N(pred, target_i)[0][index].sum(1)

    with math_attention():
        jac = vmap(jacrev(summed), in_dims=(None, 0, 0, None if cond is None else 0))(
            params, xt, target, cond)
    return generic, torch.cat([jac[r.name].transpose(0, 1).flatten(2) for r in generic], 2)


def factored_features(unet: nn.Module, plan: FactoredPlan, xt_BI: torch.Tensor, ts_I: torch.Tensor,
                      target_BI: torch.Tensor, readouts: tuple[str, ...] = ALL_READOUTS,
                      cond_BLD: torch.Tensor | None = None, items_per_pass: int = 0,
                      dtype: torch.dtype = torch.float32, normalize: bool = False) -> FactoredFeatures:
    """Factored projected features of B samples: the replacement of ``per_sample_gradients`` +
    ``project`` (same readouts, residuals and 1/I average; another, Kronecker-structured, JL).

    Args:
        unet: eval-mode UNet in ``dtype`` on its device, the one ``plan`` was built for.
        plan: ``FactoredPlan.build(unet, param_names, dim, seed)``.
        xt_BI: (B, I, C, H, W) noised inputs (any float dtype / device; see ``noised_items``).
        ts_I: (I,) int64 timesteps of the items.
        target_BI: (B, I, C, H, W) readout target (eps or v).
        readouts: names from ``features.ALL_READOUTS``, in the order of the output.
        cond_BLD: (B, L, D) per-sample text embeddings for text-conditioned UNets, else None.
        items_per_pass: items per forward/backward pass (0 = all I); bounds activation memory to
            about that of a training step on B * items_per_pass images.
        dtype: torch.float32 or torch.float64 (features and all arithmetic).
        normalize: divide each item's gradient by its exact norm before the average (as
            ``FeatureSpec.normalize``): ||G||^2 per item and layer from the layer's raw input and
            delta (Gram identity or one layer's G per row at a time, in row chunks), never all
            of them at once; costs about one weight-gradient computation per readout more.
    Returns:
        FactoredFeatures(feats_RBK (R, B, plan.dim), residual_B (B,), rho_B (B,)) in ``dtype`` on
        the unet's device. Features do not depend on B or on ``items_per_pass`` (to rounding).
    Raises:
        ValueError (before any work) for unsupported settings or mismatched inputs, and during
        the first pass for layers that break the engine's assumptions (naming the layer).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype}: the factored engine computes in torch.float32 or torch.float64")
    bad = [r for r in readouts if r not in ALL_READOUTS]
    if bad or not readouts:
        raise ValueError(f"readouts={readouts!r}: choose a non-empty subset of {ALL_READOUTS}")
    if unet.training:
        raise ValueError("the UNet is in training mode (dropout would make features random); call "
                         "unet.eval() first")
    named = dict(unet.named_parameters())
    mismatch = [n for n, s in zip(plan.param_names, plan.param_shapes, strict=True)
                if n not in named or tuple(named[n].shape) != s]
    if mismatch:
        raise ValueError(f"plan does not fit this UNet (parameter {mismatch[0]!r}); rebuild it with "
                         f"FactoredPlan.build for this model")
    wrong = {named[n].dtype for n in plan.param_names} - {dtype}
    if wrong:
        raise ValueError(f"attributed parameters are {wrong.pop()}, dtype={dtype}: call unet.to({dtype})")
    if xt_BI.shape != target_BI.shape or xt_BI.ndim < 3 or ts_I.shape != (xt_BI.shape[1],):
        raise ValueError(f"shapes xt_BI {tuple(xt_BI.shape)}, target_BI {tuple(target_BI.shape)}, ts_I "
                         f"{tuple(ts_I.shape)}: need (B, I, ...), the same, and (I,)")
    if cond_BLD is not None and (cond_BLD.ndim != 3 or len(cond_BLD) != len(xt_BI)):
        raise ValueError(f"cond_BLD has shape {tuple(cond_BLD.shape)}: need (B, L, D) with B = {len(xt_BI)}")
    if normalize and any(r.path == "generic" for r in plan.rest):
        generic = next(r.name for r in plan.rest if r.path == "generic")
        raise ValueError(f"normalize = true with generic-path parameters ({generic!r}) is not supported "
                         f"by the factored engine; use normalize = false, leave them out of param_names, "
                         f"or use the dense engine")
    device = next(unet.parameters()).device
    B, num_items = xt_BI.shape[:2]
    index = torch.tensor([ALL_READOUTS.index(r) for r in readouts], device=device)
    R = len(readouts)
    xt_BI, target_BI = xt_BI.to(device, dtype), target_BI.to(device, dtype)
    ts_I = ts_I.to(device)
    cond_BLD = None if cond_BLD is None else cond_BLD.to(device, dtype)
    feats_RBK = torch.zeros(R, B, plan.dim, dtype=dtype, device=device)
    rest_RBP = torch.zeros(R, B, sum(r.numel for r in plan.rest), dtype=dtype, device=device)
    loss_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    rho_sum_B = torch.zeros(B, dtype=torch.float64, device=device)
    norm_rest = {}
    for r in plan.rest:
        if r.path == "norm":
            norm_rest.setdefault(r.module, []).append(r)
    chunk = items_per_pass or num_items
    flags = {n: p.requires_grad for n, p in named.items()}
    try:
        unet.requires_grad_(False)  # only input gradients are needed: no weight-gradient work
        for lo in range(0, num_items, chunk):
            hi = min(num_items, lo + chunk)
            n_items, rows = hi - lo, B * (hi - lo)
            # accumulate per sample, or per (sample, item) row when each item is normalised
            groups = rows if normalize else B
            feats_RXK = torch.zeros(R, rows, plan.dim, dtype=dtype, device=device) if normalize else feats_RBK
            rest_RXP = torch.zeros(R, rows, rest_RBP.shape[2], dtype=dtype, device=device) \
                if normalize else rest_RBP
            sqnorm_RN = torch.zeros(R, rows, dtype=dtype, device=device)
            if any(r.path == "generic" for r in plan.rest):
                generic, grads_RBQ = _generic_grads(unet, plan, index, xt_BI[:, lo:hi], ts_I[lo:hi],
                                                    target_BI[:, lo:hi], cond_BLD)
                at = 0
                for r in generic:
                    rest_RBP[:, :, r.offset:r.offset + r.numel] += grads_RBQ[:, :, at:at + r.numel]
                    at += r.numel
            xt = xt_BI[:, lo:hi].reshape(rows, *xt_BI.shape[2:])
            target = target_BI[:, lo:hi].reshape(rows, *xt_BI.shape[2:])
            kwargs = {} if cond_BLD is None else {"encoder_hidden_states":
                                                  cond_BLD.repeat_interleave(n_items, dim=0)}
            recorder = _Recorder(unet, plan, rows, device, dtype, keep_inputs=normalize)
            try:
                with torch.enable_grad():
                    pred = unet(xt, ts_I[lo:hi].repeat(B), **kwargs).sample
            finally:
                recorder.remove()
            recorder.check_versions()
            silent = [n for n, c in recorder.called.items() if c == 0]
            if silent and lo == 0:
                warnings.warn(f"attributed layers never called in the forward pass get zero features "
                              f"(as their gradient, unless their weights are used outside their "
                              f"forward): {silent[:5]}", RuntimeWarning, stacklevel=2)
            repeated = [lay.name for lay in plan.layers if recorder.called[lay.name] > 1]
            if normalize and repeated:
                raise ValueError(f"normalize = true: layer {repeated[0]!r} is called more than once per "
                                 f"forward pass, so its per-item gradient norm is not a sum of calls; use "
                                 f"normalize = false or the dense engine")
            values_3N, diff_N = _readouts_3N(pred, target)
            loss_sum_B += values_3N[0].detach().view(B, n_items).to(torch.float64).sum(1)
            rho_sum_B += diff_N.detach().view(B, n_items).to(torch.float64).sum(1)
            outputs = [c[3] for c in recorder.calls]
            for ri in range(R):
                deltas = torch.autograd.grad(values_3N[index[ri]].sum(), outputs, retain_graph=ri < R - 1,
                                             allow_unused=True)
                for (path, what, aux, _, _), delta in zip(recorder.calls, deltas, strict=True):
                    if delta is None:
                        continue
                    if path == "kron":
                        p_out, _ = plan.factors(what, device, dtype)
                        a, module, x = aux
                        feats_RXK[ri, :, what.offset:what.offset + what.k_block] += _kron_block(
                            what, p_out, a, delta, groups)
                        if normalize:
                            sqnorm_RN[ri] += _kron_sqnorm(what, module, x, delta)
                    else:
                        for attr, g_XC in _norm_grads(aux[0], aux[1], delta, groups).items():
                            for r in norm_rest[what]:
                                if r.attr == attr:
                                    rest_RXP[ri, :, r.offset:r.offset + r.numel] += g_XC
            del outputs, recorder, pred, values_3N
            if normalize:
                sqnorm_RN += rest_RXP.pow(2).sum(2)
                if plan.rest_dim:
                    feats_RXK[:, :, plan.rest_offset:] = project(
                        rest_RXP.view(R * rows, -1), plan.rest_dim, plan.rest_seed, plan.kind
                    ).view(R, rows, -1).to(dtype)
                norm_RN = sqnorm_RN.sqrt()
                weight_RN = torch.where(norm_RN > 0, 1.0 / norm_RN, torch.zeros_like(norm_RN))
                feats_RBK += (feats_RXK * weight_RN[..., None]).view(R, B, n_items, -1).sum(2)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
    if plan.rest_dim and not normalize:
        feats_RBK[:, :, plan.rest_offset:] = project(
            rest_RBP.view(R * B, -1), plan.rest_dim, plan.rest_seed, plan.kind).view(R, B, -1).to(dtype)
    feats_RBK /= num_items
    residual_B = (loss_sum_B / num_items).sqrt().to(dtype)
    rho_B = (rho_sum_B / num_items).to(dtype)
    return FactoredFeatures(feats_RBK, residual_B, rho_B)


def energy_weights(unet: nn.Module, plan: FactoredPlan, xt_BI: torch.Tensor, ts_I: torch.Tensor,
                   target_BI: torch.Tensor, readouts: tuple[str, ...] = ALL_READOUTS,
                   cond_BLD: torch.Tensor | None = None, items_per_pass: int = 0) -> dict[str, float]:
    """Allocation weights from a calibration batch: each module's share of the feature energy.

    w_m = sum over readouts of mean_b ||block_m||^2 / mean_b ||feats||^2, estimated with ``plan``
    (a JL block preserves squared norms in expectation); the rest modules split the rest block's
    share in proportion to sqrt(numel). For a block-diagonal JL, k_m ~ ||g_m||^2 minimises the
    variance of ||feats||^2 (Lagrange), which the sqrt(numel) rule ignores. Pass the result to
    ``FactoredPlan.build(..., weights=...)``; store the numbers (not the batch) for other ranks.

    Returns:
        {module name: weight} for ``plan.module_names``, Python floats summing to len(readouts).
    """
    dtype = next(unet.parameters()).dtype
    feats_RBK = factored_features(unet, plan, xt_BI, ts_I, target_BI, readouts, cond_BLD,
                                  items_per_pass, dtype).feats_RBK.to(torch.float64)
    energy_RK = feats_RBK.pow(2).mean(1)
    share_RK = energy_RK / energy_RK.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    weights = {lay.name: share_RK[:, lay.offset:lay.offset + lay.k_block].sum().item() for lay in plan.layers}
    rest_sizes = {}
    for r in plan.rest:
        rest_sizes[r.module] = rest_sizes.get(r.module, 0) + r.numel
    rest_share = share_RK[:, plan.rest_offset:].sum().item()
    roots = {m: math.sqrt(n) for m, n in rest_sizes.items()}
    weights.update({m: rest_share * root / sum(roots.values()) for m, root in roots.items()})
    return weights
