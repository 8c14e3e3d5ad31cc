"""Per-sample gradients: the vmap fast path against a for-loop of backward() (float64)."""

import pytest
import torch

from das_pipeline.features import (
    ALL_READOUTS,
    FeatureSpec,
    item_grid,
    keyed_noise,
    noise_key,
    per_sample_gradients,
    timestep_grid,
)
from das_pipeline.recipe import ddpm_scheduler, tiny_unet
from helpers import loop_gradients

UIDS = ["7", "11", "img_003.png"]


@pytest.fixture(scope="module")
def model64():
    return tiny_unet(8, 1, (8, 16), attention=True, seed=3).double().eval(), ddpm_scheduler(100)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("items_per_pass", [0, 3])
def test_vmap_equals_for_loop_backward(model64, normalize, items_per_pass):
    unet, scheduler = model64
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = FeatureSpec(ALL_READOUTS, timesteps=3, noise_draws=2, seed=5, normalize=normalize,
                       dtype=torch.float64)
    fast = per_sample_gradients(unet, scheduler, x, UIDS, spec, items_per_pass=items_per_pass)
    slow, _ = loop_gradients(unet, scheduler, x, UIDS, spec)
    rel = ((fast.grads_RBP - slow).norm() / slow.norm()).item()
    assert rel < 1e-12, f"vmap vs loop relative error {rel:.2e} (float64, tolerance 1e-12)"


def test_residuals_match_their_definitions(model64):
    unet, scheduler = model64
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(("mean",), timesteps=4, noise_draws=1, seed=0, dtype=torch.float64)
    out = per_sample_gradients(unet, scheduler, x, UIDS[:2], spec)
    ts, draws = item_grid(spec, 100)
    eps = keyed_noise(0, UIDS[:2], ts, draws, (1, 8, 8)).double()
    with torch.no_grad():
        for b in range(2):
            xt = scheduler.add_noise(x[b].expand(4, 1, 8, 8), eps[b].float(), ts).double()
            pred = unet(xt, ts).sample
            r = (pred - eps[b]).pow(2).flatten(1).mean(1).mean().sqrt()
            rho = (pred - eps[b]).flatten(1).mean(1).mean()
            assert torch.allclose(out.residual_B[b], r, rtol=1e-12)
            assert torch.allclose(out.rho_B[b], rho, rtol=1e-10)


def test_features_do_not_depend_on_batch_composition(model64):
    unet, scheduler = model64
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    uids = ["a", "b", "c", "d"]
    spec = FeatureSpec(("loss", "mean"), timesteps=2, noise_draws=1, seed=9, dtype=torch.float64)
    whole = per_sample_gradients(unet, scheduler, x, uids, spec).grads_RBP
    # other batch sizes and another order give the same per-sample features
    pieces = [per_sample_gradients(unet, scheduler, x[[i]], [uids[i]], spec).grads_RBP
              for i in (2, 0, 3, 1)]
    reordered = torch.cat([pieces[1], pieces[3], pieces[0], pieces[2]], dim=1)
    assert torch.allclose(whole, reordered, rtol=1e-10, atol=1e-14)


def test_noise_is_keyed_by_seed_uid_timestep_draw():
    ts, draws = torch.tensor([0, 10, 10]), torch.tensor([0, 0, 1])
    a = keyed_noise(0, ["x", "y"], ts, draws, (1, 2, 2))
    b = keyed_noise(0, ["y"], ts[[1]], draws[[1]], (1, 2, 2))
    assert torch.equal(a[1, 1], b[0, 0])  # same key, same noise, whatever the batch
    assert not torch.equal(a[0, 0], a[1, 0])  # another uid
    assert not torch.equal(a[0, 1], a[0, 2])  # another draw
    assert noise_key(0, "x", 10, 0) != noise_key(1, "x", 10, 0)  # another seed


def test_timestep_grid_is_uniform_and_checked():
    assert timestep_grid(1000, 10).tolist() == list(range(0, 1000, 100))
    assert timestep_grid(100, 3).tolist() == [0, 33, 66]
    with pytest.raises(ValueError, match="timesteps = 200"):
        timestep_grid(100, 200)


def test_bf16_autocast_forward_is_close_and_gradients_stay_float32():
    unet, scheduler = tiny_unet(8, 1, (8, 16), attention=True, seed=3).eval(), ddpm_scheduler(100)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    spec = FeatureSpec(("loss", "mean"), timesteps=2, noise_draws=1, seed=0)
    full = per_sample_gradients(unet, scheduler, x, UIDS[:2], spec).grads_RBP
    mixed = per_sample_gradients(unet, scheduler, x, UIDS[:2], spec, autocast=True,
                                 vmap_chunk_size=1).grads_RBP
    assert mixed.dtype == torch.float32
    rel = ((mixed - full).norm() / full.norm()).item()
    assert 0 < rel < 0.05, f"bf16 autocast relative difference {rel:.3f} (expected (0, 0.05))"


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", ["rademacher", "sjlt"])
def test_projecting_each_tensor_as_produced_equals_projecting_the_flat_gradients(model64, normalize,
                                                                                 kind):
    """The extraction path (``project=``: one copy of per-sample gradients at a time) against the
    flat path (all gradients, then one projection), float64."""
    from das_pipeline.kernels import project

    unet, scheduler = model64
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spec = FeatureSpec(ALL_READOUTS, timesteps=3, noise_draws=1, seed=2, normalize=normalize,
                       dtype=torch.float64)
    flat = per_sample_gradients(unet, scheduler, x, UIDS, spec, items_per_pass=2)
    R, B, P = flat.grads_RBP.shape
    want = project(flat.grads_RBP.reshape(R * B, P), 64, 0, kind, backend="reference").view(R, B, -1)
    streamed = per_sample_gradients(unet, scheduler, x, UIDS, spec, items_per_pass=2,
                                    project=lambda g, off: project(g, 64, 0, kind, row_offset=off,
                                                                   backend="reference"))
    assert streamed.grads_RBP is None
    rel = ((streamed.feats_RBK - want).norm() / want.norm()).item()
    assert rel < 1e-12, f"{kind}, normalize={normalize}: relative error {rel:.2e}"
    torch.testing.assert_close(streamed.residual_B, flat.residual_B)


def test_timestep_grids():
    """uniform is D-TRAK's j (T // K) from t = 0; centered the stratum midpoints; both distinct
    and in range for every K up to T, and the grid enters the store fingerprint."""
    from das_pipeline.config import Config, FeaturesConfig, result_settings
    from das_pipeline.features import timestep_grid

    assert timestep_grid(1000, 10).tolist() == list(range(0, 1000, 100))
    assert timestep_grid(1000, 10, "centered").tolist() == list(range(50, 1000, 100))
    assert timestep_grid(1000, 3, "centered").tolist() == [166, 500, 833]
    for T, K in ((1000, 1000), (1000, 7), (10, 10), (7, 3)):
        for grid in ("uniform", "centered"):
            ts = timestep_grid(T, K, grid)
            assert len(set(ts.tolist())) == K and 0 <= ts.min() and ts.max() < T, (T, K, grid)
    a = result_settings(Config())["schedule"]
    b = result_settings(Config(features=FeaturesConfig(timestep_grid="centered")))["schedule"]
    assert a == "uniform:j*(T//K)" and b != a
