"""Factored (Kronecker) engine against its slow twin: explicit Kronecker matrix x per-sample
gradients from a for-loop of backward() (float64), on every layer type of the tiny diffusers
UNets, with and without LoRA; plus determinism, memory and error checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from das_pipeline.factored import (
    FactoredPlan,
    allocate,
    derived_seed,
    energy_weights,
    factor_dims,
    factored_features,
    kron_projection_dense,
    noised_items,
)
from das_pipeline.features import ALL_READOUTS, FeatureSpec, per_sample_gradients
from das_pipeline.kernels.reference import matrix_block
from das_pipeline.recipe import ddpm_scheduler, tiny_unet
from tiny_sd import tiny_cond_unet

GEN = torch.Generator().manual_seed(0)


def loop_reference(unet, names, xt_BI, ts_I, target_BI, cond_BLD=None, readouts=ALL_READOUTS,
                   normalize=False):
    """(R, B, P) per-sample gradients g_R = 1/I sum_items grad R (each item's divided by its norm
    when ``normalize``) by a for-loop of backward(), plus residual r and rho (B,), in float64."""
    params = dict(unet.named_parameters())
    chosen = [params[n] for n in names]
    B, num_items = xt_BI.shape[:2]
    grads = torch.zeros(len(readouts), B, sum(p.numel() for p in chosen), dtype=torch.float64)
    loss, rho = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for i in range(num_items):
            kwargs = {} if cond_BLD is None else {"encoder_hidden_states": cond_BLD[b:b + 1]}
            pred = unet(xt_BI[b, i:i + 1], ts_I[i:i + 1], **kwargs).sample
            diff = pred - target_BI[b, i:i + 1]
            values = {"loss": diff.pow(2).mean(), "square": pred.pow(2).mean(), "mean": pred.mean()}
            for r, name in enumerate(readouts):
                g = torch.autograd.grad(values[name], chosen, retain_graph=True, allow_unused=True)
                flat = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if gi is None
                                  else gi.flatten() for gi, p in zip(g, chosen, strict=True)])
                grads[r, b] += flat / flat.norm() if normalize else flat
            loss[b] += values["loss"].item()
            rho[b] += diff.mean().item()
    return grads / num_items, (loss / num_items).sqrt(), rho / num_items


def random_items(B, num_items, shape, t_lo=0, t_hi=100):
    xt = torch.randn(B, num_items, *shape, generator=GEN, dtype=torch.float64)
    target = torch.randn(B, num_items, *shape, generator=GEN, dtype=torch.float64)
    ts = torch.randint(t_lo, t_hi, (num_items,), generator=GEN)
    return xt, ts, target


def add_lora(unet, targets, rank=2, seed=0):
    """peft LoRA adapters with non-zero (trained-looking) weights; returns the LoRA names."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return [n for n, _ in unet.named_parameters() if "lora_" in n]


class Toy(nn.Module):
    """A non-diffusers model with the awkward layer settings: grouped, strided, dilated and
    reflect-padded convs, a Linear on (N, L, D) tokens called twice, LayerNorm, a bias-only
    layer, and a Fourier-style parameter used functionally (generic path)."""

    def __init__(self, twice: bool = True):
        super().__init__()
        self.twice = twice
        self.conv_a = nn.Conv2d(2, 6, 3, padding=1, padding_mode="reflect")
        self.conv_g = nn.Conv2d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.norm = nn.LayerNorm(4)
        self.tok = nn.Linear(4, 4)
        self.head = nn.Conv2d(4, 2, 1)
        self.freq = nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t, **_):
        h = torch.tanh(self.conv_g(torch.tanh(self.conv_a(x))))  # (N, 4, 4, 4)
        tokens = self.norm(h.flatten(2).transpose(1, 2))  # (N, 16, 4)
        tokens = tokens + torch.sin(t.to(x.dtype)[:, None, None] * self.freq)
        tokens = self.tok(torch.tanh(self.tok(tokens))) if self.twice else self.tok(tokens)
        h = tokens.transpose(1, 2).reshape_as(h)
        return SimpleNamespace(sample=nn.functional.interpolate(self.head(h), size=x.shape[-2:]))


def models():
    """(label, unet, attributed names or None, sample shape, cond shape or None, dim)."""
    plain = tiny_unet(8, 1, (8, 16), attention=False, seed=1).double().eval()
    attn = tiny_unet(8, 1, (8, 16), attention=True, seed=2).double().eval()
    cond = tiny_cond_unet(seed=3).double().eval()
    cond_lora = tiny_cond_unet(seed=4).double().eval()
    lora_names = add_lora(cond_lora, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
    attn_lora = tiny_unet(8, 1, (8, 16), attention=True, seed=5).double().eval()
    conv_lora_names = add_lora(attn_lora, ["conv1", "conv2", "to_q", "to_v", "time_emb_proj"])
    toy = Toy().double().eval()
    toy_names = [n for n, _ in toy.named_parameters() if n != "head.weight"]  # head: bias only
    return [("UNet2DModel", plain, None, (1, 8, 8), None, 120),
            ("UNet2DModel+attention", attn, None, (1, 8, 8), None, 200),
            ("UNet2DConditionModel", cond, None, (4, 8, 8), (5, 16), 300),
            ("UNet2DConditionModel+LoRA", cond_lora, lora_names, (4, 8, 8), (5, 16), 150),
            ("UNet2DModel+attention+LoRA(conv)", attn_lora, conv_lora_names, (1, 8, 8), None, 100),
            ("toy (groups, reflect, dilation, tokens, shared Linear, bias only, generic)", toy,
             toy_names, (2, 8, 8), None, 40)]


@pytest.mark.parametrize("case", models(), ids=lambda c: c[0])
def test_features_equal_kronecker_projection_of_per_sample_gradients(case):
    label, unet, names, shape, cond_shape, dim = case
    plan = FactoredPlan.build(unet, names, dim, seed=11)
    names = list(plan.param_names)
    xt, ts, target = random_items(2, 3, shape)
    cond = None if cond_shape is None else torch.randn(2, *cond_shape, generator=GEN, dtype=torch.float64)
    out = factored_features(unet, plan, xt, ts, target, ALL_READOUTS, cond, dtype=torch.float64)
    grads_RBP, residual_B, rho_B = loop_reference(unet, names, xt, ts, target, cond)
    want_RBK = grads_RBP @ kron_projection_dense(plan)
    rel = ((out.feats_RBK - want_RBK).norm() / want_RBK.norm()).item()
    cov = plan.coverage()
    assert rel < 1e-10, f"{label}: factored vs dense Kronecker relative error {rel:.2e} (tolerance " \
                        f"1e-10, float64); coverage {cov}"
    assert torch.allclose(out.residual_B, residual_B, rtol=1e-12)
    assert torch.allclose(out.rho_B, rho_B, rtol=1e-10, atol=1e-14)
    assert cov["kron"], f"{label}: nothing went through the Kronecker path: {cov}"
    print(f"{label}: coverage {cov}, rest dim {plan.rest_dim}, relative error {rel:.1e}")


def test_gaussian_factors_equal_their_dense_twin():
    toy = Toy().double().eval()
    plan = FactoredPlan.build(toy, None, 40, seed=2, kind="gaussian")
    xt, ts, target = random_items(2, 2, (2, 8, 8))
    out = factored_features(toy, plan, xt, ts, target, ("square",), dtype=torch.float64)
    grads_RBP, _, _ = loop_reference(toy, list(plan.param_names), xt, ts, target, readouts=("square",))
    want_RBK = grads_RBP @ kron_projection_dense(plan)
    rel = ((out.feats_RBK - want_RBK).norm() / want_RBK.norm()).item()
    assert rel < 1e-10, f"gaussian factors: relative error {rel:.2e} (float64, tolerance 1e-10)"


def test_normalized_features_on_awkward_layers():
    """Per-item norms through grouped / strided / dilated / reflect-padded convs, LayerNorm,
    tokens and a bias-only layer, against the for-loop of backward()."""
    toy = Toy(twice=False).double().eval()
    names = [n for n, _ in toy.named_parameters() if n not in ("freq", "head.weight")]
    plan = FactoredPlan.build(toy, names, 40, seed=2)
    xt, ts, target = random_items(2, 3, (2, 8, 8))
    out = factored_features(toy, plan, xt, ts, target, dtype=torch.float64, normalize=True)
    grads_RBP, _, _ = loop_reference(toy, names, xt, ts, target, normalize=True)
    want_RBK = grads_RBP @ kron_projection_dense(plan)
    rel = ((out.feats_RBK - want_RBK).norm() / want_RBK.norm()).item()
    assert rel < 1e-10, f"normalised toy: relative error {rel:.2e} (float64, tolerance 1e-10)"


@pytest.mark.parametrize("max_numel", [7, 2**24])
def test_exact_row_norms_of_linear_and_conv_blocks(max_numel):
    """||G_n||^2 from (input, delta) equals the norm of the explicit per-row gradient, for the
    Gram and the per-row-G paths of Linear and for convs, in row chunks or not."""
    from das_pipeline.factored import KronLayer, _kron_sqnorm

    layers = [(nn.Linear(5, 3), (4, 5)), (nn.Linear(40, 30), (4, 3, 40)), (nn.Linear(3, 2), (4, 10, 3)),
              (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), (4, 4, 7, 7)),
              (nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"), (4, 2, 6, 6))]
    for module, shape in layers:
        module = module.double()
        x = torch.randn(shape, generator=GEN, dtype=torch.float64)
        out = module(x)
        delta = torch.randn(out.shape, generator=GEN, dtype=torch.float64)
        want = torch.stack([sum(g.pow(2).sum() for g in torch.autograd.grad(
            module(x[n:n + 1]), [module.weight, module.bias], delta[n:n + 1])) for n in range(len(x))])
        groups = getattr(module, "groups", 1)
        lay = KronLayer("m", type(module).__name__, "m.weight", "m.bias", module.weight.shape[0],
                        module.weight[0].numel() + 1, groups, 1, 1, 1, 0)
        got = _kron_sqnorm(lay, module, x, delta, max_numel=max_numel)
        assert torch.allclose(got, want, rtol=1e-12), (type(module).__name__, shape, got, want)


def test_expected_coverage_of_diffusers_layer_types():
    cov = {label: FactoredPlan.build(unet, names, dim, 0).coverage()
           for label, unet, names, _, _, dim in models()}
    assert cov["UNet2DModel+attention"] == {"kron": {"Conv2d": 25, "Linear": 26},
                                            "norm": {"GroupNorm": 21}, "generic": {}}, cov
    cond = cov["UNet2DConditionModel"]
    assert set(cond["kron"]) == {"Conv2d", "Linear"} and set(cond["norm"]) == {"GroupNorm", "LayerNorm"} \
        and not cond["generic"], cov
    # 4 transformers x (attn1, attn2: q, k, v, out; ff.net.2) Linear + proj_in (1x1 Conv2d), A and B each
    assert cov["UNet2DConditionModel+LoRA"]["kron"] == {"Linear": 4 * 9 * 2, "Conv2d": 4 * 2}, cov
    assert cov["UNet2DModel+attention+LoRA(conv)"]["kron"]["Conv2d"] > 0, cov
    assert cov["toy (groups, reflect, dilation, tokens, shared Linear, bias only, generic)"]["generic"] \
        == {"Toy": 1}, cov


def test_end_to_end_equals_per_sample_gradients_then_kronecker_matrix():
    """noised_items + factored_features == features.per_sample_gradients @ explicit matrix."""
    unet = tiny_unet(8, 1, (8, 16), attention=True, seed=3).double().eval()
    scheduler = ddpm_scheduler(100)
    x = torch.rand(3, 1, 8, 8, generator=GEN) * 2 - 1
    uids = ["7", "11", "img_003.png"]
    spec = FeatureSpec(("mean", "loss"), timesteps=3, noise_draws=2, seed=5, dtype=torch.float64)
    plan = FactoredPlan.build(unet, None, 256, seed=0)
    xt, ts, target = noised_items(scheduler, x, uids, spec)
    out = factored_features(unet, plan, xt, ts, target, spec.readouts, items_per_pass=4,
                            dtype=torch.float64)
    ref = per_sample_gradients(unet, scheduler, x, uids, spec)
    want = ref.grads_RBP @ kron_projection_dense(plan)
    rel = ((out.feats_RBK - want).norm() / want.norm()).item()
    assert rel < 1e-10, f"relative error {rel:.2e} (float64, tolerance 1e-10)"
    assert torch.allclose(out.residual_B, ref.residual_B, rtol=1e-12)
    assert torch.allclose(out.rho_B, ref.rho_B, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("conditional", [False, True], ids=["UNet2DModel+attention", "UNet2DConditionModel"])
def test_normalized_features_equal_the_dense_engine_normalized(conditional):
    """normalize=True: per-item exact norms (Gram identity / per-row G / unfolded patches) equal
    features.per_sample_gradients(normalize=True) @ the explicit Kronecker matrix (float64)."""
    if conditional:
        unet, shape = tiny_cond_unet(seed=7).double().eval(), (4, 8, 8)
        cond = torch.randn(2, 5, 16, generator=GEN, dtype=torch.float64)
    else:
        unet, shape, cond = tiny_unet(8, 1, (8, 16), attention=True, seed=7).double().eval(), (1, 8, 8), None
    scheduler = ddpm_scheduler(100)
    x = torch.rand(2, *shape, generator=GEN) * 2 - 1
    spec = FeatureSpec(ALL_READOUTS, timesteps=3, noise_draws=1, seed=1, normalize=True, dtype=torch.float64)
    plan = FactoredPlan.build(unet, None, 256, seed=5)
    xt, ts, target = noised_items(scheduler, x, ["a", "b"], spec)
    out = factored_features(unet, plan, xt, ts, target, cond_BLD=cond, items_per_pass=2,
                            dtype=torch.float64, normalize=True)
    ref = per_sample_gradients(unet, scheduler, x, ["a", "b"], spec, cond_BLD=cond)
    want = ref.grads_RBP @ kron_projection_dense(plan)
    rel = ((out.feats_RBK - want).norm() / want.norm()).item()
    assert rel < 1e-10, f"normalised: relative error {rel:.2e} (float64, tolerance 1e-10)"


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_features_do_not_depend_on_batch_or_item_chunking(dtype, rtol):
    unet = tiny_cond_unet(seed=6).to(dtype).eval()
    plan = FactoredPlan.build(unet, None, 512, seed=3)
    xt, ts, target = random_items(4, 5, (4, 8, 8))
    cond = torch.randn(4, 5, 16, generator=GEN, dtype=torch.float64)
    whole = factored_features(unet, plan, xt, ts, target, cond_BLD=cond, dtype=dtype)
    scale = whole.feats_RBK.abs().max()
    for items_per_pass in (2, 5):
        parts = [factored_features(unet, plan, xt[i:i + 2], ts, target[i:i + 2], cond_BLD=cond[i:i + 2],
                                   items_per_pass=items_per_pass, dtype=dtype) for i in (0, 2)]
        feats = torch.cat([p.feats_RBK for p in parts], 1)
        err = ((feats - whole.feats_RBK).abs().max() / scale).item()
        assert err < rtol, f"items_per_pass={items_per_pass}, batch 2+2 vs 4: max error {err:.1e} " \
                           f"relative to the largest feature (tolerance {rtol:.0e}, {dtype})"
        assert torch.allclose(torch.cat([p.residual_B for p in parts]), whole.residual_B, rtol=rtol)
    again = factored_features(unet, FactoredPlan.build(unet, None, 512, seed=3), xt, ts, target,
                              cond_BLD=cond, dtype=dtype)
    assert torch.equal(again.feats_RBK, whole.feats_RBK), "a rebuilt plan gives other features"


def test_plan_dimensions_identity_and_factors():
    unet = tiny_unet(8, 1, (16, 32), attention=True, seed=0)
    plan = FactoredPlan.build(unet, None, 2048, seed=4)
    ident = plan.identity()
    assert ident["dim"] == 2048 == sum(lay.k_block for lay in plan.layers) + plan.rest_dim
    assert ident["engine"] == "factored-kron/v1" and ident["rng"] == "philox4x32-10/v1"
    assert ident["layers"][0] == ["conv_in", plan.layers[0].k_out, plan.layers[0].k_in,
                                  plan.layers[0].k_block]
    offsets = [lay.offset for lay in plan.layers]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for lay in plan.layers:
        assert 1 <= lay.k_out <= lay.out_dim and 1 <= lay.k_in <= lay.in_dim
        assert lay.k_block <= lay.k_out * lay.k_in < lay.k_block + max(lay.k_out, lay.k_in)
    # the factors are the reference Philox matrices with the documented per-layer seeds
    lay = plan.layers[3]
    p_out, p_in = plan.factors(lay, "cpu", torch.float64)
    want_in = matrix_block("rademacher", 0, lay.in_dim, lay.k_in, derived_seed(4, lay.name, "in")).T
    assert torch.equal(p_in, want_in.double() / lay.k_in ** 0.5)
    assert torch.equal(p_out.abs().unique(), torch.tensor([(lay.k_out * lay.k_in / lay.k_block) ** 0.5
                                                           / lay.k_out ** 0.5], dtype=torch.float64))
    assert plan.factors(lay, "cpu", torch.float64)[0] is p_out  # cached, not regenerated
    # block sizes grow like sqrt(numel) where unbounded
    big = max(plan.layers, key=lambda lay: lay.out_dim * lay.in_dim)
    small = min(plan.layers, key=lambda lay: lay.out_dim * lay.in_dim)
    numel_ratio = (big.out_dim * big.in_dim) / (small.out_dim * small.in_dim)
    ratio = (big.k_block / small.k_block) / numel_ratio ** 0.5
    assert 0.8 < ratio < 1.25, f"k_block ratio / sqrt(numel) ratio = {ratio:.2f}"


def test_energy_weights_track_exact_gradient_energy_and_drive_the_allocation():
    unet = tiny_unet(8, 1, (8, 16), attention=True, seed=2).double().eval()
    plan = FactoredPlan.build(unet, None, 600, seed=0)
    xt, ts, target = random_items(4, 3, (1, 8, 8))
    weights = energy_weights(unet, plan, xt, ts, target, ("loss", "mean"))
    assert list(weights) == plan.module_names and abs(sum(weights.values()) - 2) < 1e-9
    grads_RBP, _, _ = loop_reference(unet, list(plan.param_names), xt, ts, target, readouts=("loss", "mean"))
    sizes = [p.numel() for p in unet.parameters()]
    start = dict(zip(plan.param_names, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
    total_R = grads_RBP.pow(2).sum(2).mean(1)
    exact = []
    for lay in plan.layers:
        idx = torch.cat([torch.arange(start[n], start[n] + sizes[list(plan.param_names).index(n)])
                         for n in (lay.weight, lay.bias) if n])
        exact.append((grads_RBP[:, :, idx].pow(2).sum(2).mean(1) / total_R).sum().item())
    est = torch.tensor([weights[lay.name] for lay in plan.layers])
    corr = torch.corrcoef(torch.stack([est, torch.tensor(exact, dtype=est.dtype)]))[0, 1].item()
    assert corr > 0.9, f"estimated vs exact per-layer energy shares: correlation {corr:.3f}"
    weighted = FactoredPlan.build(unet, None, 600, seed=0, weights=weights)
    assert weighted.identity()["allocation"] == "weights" and plan.identity()["allocation"] == "sqrt-numel"
    top = max(plan.layers, key=lambda lay: weights[lay.name])
    assert next(lay for lay in weighted.layers if lay.name == top.name).k_block > top.k_block
    with pytest.raises(ValueError, match="weight >= 0.*for every attributed module.*energy_weights"):
        FactoredPlan.build(unet, None, 600, seed=0, weights={plan.module_names[0]: 1.0})


def test_allocate_and_factor_dims_properties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        num = int(torch.randint(1, 30, (1,), generator=gen))
        sizes = torch.randint(1, 5000, (num,), generator=gen).tolist()
        dim = int(torch.randint(len(sizes), sum(sizes) + 1, (1,), generator=gen))
        k = allocate(sizes, dim)
        assert sum(k) == dim and all(1 <= km <= s for km, s in zip(k, sizes, strict=True)), (sizes, dim, k)
    assert allocate([100, 400, 1], 7) == [2, 4, 1]
    for k_block, out_dim, in_dim in [(1, 1, 1), (7, 32, 9), (2022, 1, 2507), (97, 128, 1153), (6, 3, 2)]:
        k_out, k_in = factor_dims(k_block, out_dim, in_dim)
        assert k_out <= out_dim and k_in <= in_dim and k_out * k_in >= k_block, (k_block, k_out, k_in)


class _PeakNumel(TorchDispatchMode):
    """Largest tensor numel any op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.peak = max(self.peak, t.numel())
        return out


def test_no_tensor_of_size_batch_times_params():
    """Every intermediate of the engine is at most the widest activation or the rest block's JL
    matrix (p_rest x 128 ceil(k_rest / 128), GroupNorm parameters only), far below B x P; the
    same probe sees the dense engine's B x P per-sample gradients (so the probe can fail)."""
    unet = tiny_unet(8, 1, (16, 32), attention=True, seed=0).eval()
    num_params = sum(p.numel() for p in unet.parameters())
    B, num_items = 8, 2
    plan = FactoredPlan.build(unet, None, 256, seed=0)
    xt, ts, target = random_items(B, num_items, (1, 8, 8))
    with _PeakNumel() as probe:
        factored_features(unet, plan, xt, ts, target)
    activation = B * num_items * 48 * 8 * 8  # widest activation: the 8x8 up block's 48-channel concat
    rest_matrix = sum(r.numel for r in plan.rest) * 128 * -(-plan.rest_dim // 128)
    bound = max(activation, rest_matrix)
    assert probe.peak <= bound < B * num_params / 8, \
        f"peak intermediate {probe.peak:,}, activation {activation:,}, rest matrix {rest_matrix:,}, " \
        f"B x P {B * num_params:,}"
    spec = FeatureSpec(ALL_READOUTS, num_items, 1, 0)
    with _PeakNumel() as dense:
        per_sample_gradients(unet, ddpm_scheduler(100), xt[:, 0, :1], [str(i) for i in range(B)], spec)
    assert dense.peak >= B * num_params, (dense.peak, B * num_params)


def test_errors_name_the_setting_or_layer_and_the_fix():
    unet = tiny_unet(8, 1, (8, 16), attention=True, seed=0).eval()
    names = [n for n, _ in unet.named_parameters()]
    with pytest.raises(ValueError, match="kind='sjlt'.*rademacher"):
        FactoredPlan.build(unet, None, 64, 0, kind="sjlt")
    with pytest.raises(ValueError, match="dim=10.*between"):
        FactoredPlan.build(unet, None, 10, 0)
    with pytest.raises(ValueError, match="dim=99999999.*between"):
        FactoredPlan.build(unet, None, 99999999, 0)
    with pytest.raises(ValueError, match="'nope' is not a parameter"):
        FactoredPlan.build(unet, ["nope"], 64, 0)
    plan = FactoredPlan.build(unet, names, 128, 0)
    xt, ts, target = random_items(2, 2, (1, 8, 8))
    toy = Toy().eval()
    with pytest.raises(ValueError, match="normalize = true with generic-path parameters \\('freq'\\)"):
        factored_features(toy, FactoredPlan.build(toy, None, 40, 0), xt[:, :, :1].expand(2, 2, 2, 8, 8),
                          ts, target[:, :, :1].expand(2, 2, 2, 8, 8), normalize=True)
    toy_plan = FactoredPlan.build(toy, [n for n, _ in toy.named_parameters() if n != "freq"], 40, 0)
    with pytest.raises(ValueError, match="layer 'tok' is called more than once.*normalize = false"):
        factored_features(toy, toy_plan, xt[:, :, :1].expand(2, 2, 2, 8, 8), ts,
                          target[:, :, :1].expand(2, 2, 2, 8, 8), normalize=True)
    with pytest.raises(ValueError, match=r"unet.to\(torch.float64\)"):
        factored_features(unet, plan, xt, ts, target, dtype=torch.float64)
    with pytest.raises(ValueError, match="readouts"):
        factored_features(unet, plan, xt, ts, target, readouts=("dtrak",))
    with pytest.raises(ValueError, match=r"unet.eval\(\)"):
        factored_features(unet.train(), plan, xt, ts, target)
    unet.eval()
    with pytest.raises(ValueError, match="plan does not fit"):
        factored_features(tiny_unet(8, 1, (16, 32), seed=0).eval(), plan, xt, ts, target)

    class Mixer(nn.Module):  # a Linear applied across the batch: samples are not independent
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

        def forward(self, x, t, **_):
            return SimpleNamespace(sample=self.mix(x.reshape(1, -1, 4)).reshape_as(x))

    with pytest.raises(ValueError, match="layer 'mix' .*first dim is not the batch.*leave its param"):
        factored_features(Mixer().eval(), FactoredPlan.build(Mixer(), None, 4, 0), xt[..., :4], ts,
                          target[..., :4])

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 1, 1)

        def forward(self, x, t, **_):
            return SimpleNamespace(sample=self.b(self.a(self.pre(x)).relu_()))

    model = InPlace().eval()
    with pytest.raises(ValueError, match="output of layer 'a' is modified in place.*leave its param"):
        factored_features(model, FactoredPlan.build(model, None, 6, 0), xt, ts, target)

    dora = tiny_cond_unet(seed=0)
    from peft import LoraConfig

    dora.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="LoRA variant.*plain LoRA"):
        FactoredPlan.build(dora, [n for n, _ in dora.named_parameters() if "lora_" in n], 32, 0)


def test_das_run_with_the_factored_engine(make_config, tmp_path):
    """`[projection] engine = "factored"` end to end: the store's features are the engine's own
    (same noise keys and items), its fingerprint names the engine, and the plan with its
    per-layer dims is recorded beside it."""
    from das_pipeline.cli import main
    from das_pipeline.config import load_config
    from das_pipeline.data import open_dataset
    from das_pipeline.extract import feature_spec
    from das_pipeline.features import noise_keys
    from das_pipeline.models import load_model
    from das_pipeline.store import Store

    cfg_path = make_config(dim=96)
    cfg_path.write_text(cfg_path.read_text().replace("[projection]", '[projection]\nengine = "factored"'))
    assert main(["run", str(cfg_path), "--quiet"]) == 0
    cfg = load_config(cfg_path)
    store = Store.open_existing(cfg.store.path)
    assert store.fingerprint["settings"]["projection"]["engine"] == "factored-kron/v1"
    plan_id = store.root.attrs["model_info"]["projection_plan"]
    assert plan_id["dim"] == 96 and plan_id["layers"]
    model = load_model(cfg.model.path)
    plan = FactoredPlan.build(model.unet, None, 96, seed=0)
    assert plan.identity() == plan_id
    ds = open_dataset("val", cfg.data.queries["val"])
    x = ds.load(0, len(ds))
    spec = feature_spec(cfg)
    xt, ts, target = noised_items(model.scheduler, x, noise_keys(cfg.features.noise, x), spec)
    want = factored_features(model.unet, plan, xt, ts, target, spec.readouts)
    for i, r in enumerate(spec.readouts):
        got = store.split("val").group["features"][r][:]
        np.testing.assert_allclose(got, want.feats_RBK[i].numpy(), rtol=1e-4, atol=1e-6)
