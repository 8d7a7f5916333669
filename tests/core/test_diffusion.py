"""Checks of core.diffusion against independent closed forms (float64 reference maths)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from core.diffusion import GaussianDiffusion

T = 1000


def ref_schedule(T=T, b0=1e-4, b1=0.02):
    betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return betas, ac, ac_prev


def col(v, t):
    return v[t].view(-1, 1, 1, 1)


def make_batch(B=6, C=2, H=4, W=4, seed=0, t=None):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if t is None:
        t = torch.randint(1, T, (B,), generator=g)
    return x0, noise, t


def test_q_sample_matches_closed_form():
    d = GaussianDiffusion()
    x0, noise, t = make_batch()
    t[0], t[1] = 0, T - 1
    _, ac, _ = ref_schedule()
    expected = col(ac, t).sqrt() * x0 + (1 - col(ac, t)).sqrt() * noise
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)
    # float32 inputs give float32 outputs
    assert d.q_sample(x0.float(), t, noise.float()).dtype == torch.float32


def test_mse_zero_iff_eps_is_noise():
    d = GaussianDiffusion()
    x0, noise, t = make_batch()
    x_t = d.q_sample(x0, t, noise)
    v = torch.zeros_like(x0)
    out = d.training_losses(torch.cat([noise, v], 1), x0, x_t, t, noise)
    assert out["mse"].shape == (x0.shape[0],)
    assert torch.all(out["mse"] == 0)
    out2 = d.training_losses(torch.cat([noise + 0.5, v], 1), x0, x_t, t, noise)
    torch.testing.assert_close(out2["mse"], torch.full_like(out2["mse"], 0.25))


def test_vb_is_kl_to_true_posterior_and_minimal_at_truth():
    d = GaussianDiffusion()
    x0, noise, t = make_batch(B=8)
    x_t = d.q_sample(x0, t, noise)
    betas, ac, ac_prev = ref_schedule()
    alphas = 1 - betas
    post_var = betas * (1 - ac_prev) / (1 - ac)

    def posterior_mean(x0_):
        c1 = col(betas * ac_prev.sqrt() / (1 - ac), t)
        c2 = col((1 - ac_prev) * alphas.sqrt() / (1 - ac), t)
        return c1 * x0_ + c2 * x_t

    # The model predicting the true noise and v = -1 (the true posterior variance): vb ~ 0.
    true_out = torch.cat([noise, -torch.ones_like(x0)], 1)
    vb_true = d.training_losses(true_out, x0, x_t, t, noise)["vb"]
    assert vb_true.abs().max() < 1e-9

    # Arbitrary prediction: vb equals KL(q || p) in bits/dim, computed independently.
    g = torch.Generator().manual_seed(1)
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    vb = d.training_losses(torch.cat([eps, v], 1), x0, x_t, t, noise)["vb"]
    x0_hat = (x_t - col((1 - ac).sqrt(), t) * eps) / col(ac.sqrt(), t)
    frac = (v + 1) / 2
    model_logvar = frac * col(betas.log(), t) + (1 - frac) * col(post_var.log(), t)
    q = Normal(posterior_mean(x0), col(post_var, t).sqrt().expand_as(x0))
    p = Normal(posterior_mean(x0_hat), (0.5 * model_logvar).exp())
    expected = kl_divergence(q, p).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb, expected, rtol=1e-9, atol=1e-12)
    assert torch.all(vb > vb_true)

    # Moving v away from -1 in either direction increases vb (v=-1 is the minimum; v<-1
    # extrapolates below the posterior variance). Small t, where beta_t and beta~_t differ most.
    t_small = torch.arange(1, 9)
    x_small = d.q_sample(x0, t_small, noise)
    for dv in (0.2, -0.2):
        out = torch.cat([noise, -torch.ones_like(x0) + dv], 1)
        worse = d.training_losses(out, x0, x_small, t_small, noise)["vb"]
        assert torch.all(worse > 1e-4)


def test_vb_at_t0_is_discretized_decoder_nll():
    d = GaussianDiffusion()
    x0, noise, _ = make_batch(B=4, seed=3, t=torch.zeros(4, dtype=torch.long))
    x0 = x0.clamp(-0.99, 0.99)  # interior bins only: plain CDF differences
    t = torch.zeros(4, dtype=torch.long)
    x_t = d.q_sample(x0, t, noise)
    v = torch.zeros_like(x0)
    vb = d.training_losses(torch.cat([noise, v], 1), x0, x_t, t, noise)["vb"]
    betas, ac, _ = ref_schedule()
    # at t=0 the posterior mean is x0_hat itself (coef1 = 1, coef2 = 0); eps = noise -> x0_hat = x0
    post_var_1 = betas[1] * (1 - ac[0]) / (1 - ac[1])
    logvar = 0.5 * betas[0].log() + 0.5 * post_var_1.log()
    std = (0.5 * logvar).exp()
    cdf = torch.special.ndtr
    prob = cdf((1 / 255) / std) - cdf((-1 / 255) / std)  # mean == x0: same for every pixel
    expected = -torch.log(prob) / math.log(2)
    torch.testing.assert_close(vb, expected.expand(4), rtol=2e-3, atol=0)


def test_vb_does_not_train_eps():
    d = GaussianDiffusion()
    x0, noise, t = make_batch(B=5)
    t[0] = 0  # the decoder NLL branch too
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(5, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    terms = d.training_losses(out, x0, x_t, t, noise)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.all(grad[:, :2] == 0)
    assert grad[:, 2:].abs().sum() > 0
    # and the eps half of the total loss gradient is exactly the mse gradient
    terms = d.training_losses(out, x0, x_t, t, noise)
    (g_loss,) = torch.autograd.grad(terms["loss"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    torch.testing.assert_close(g_loss[:, :2], g_mse[:, :2], rtol=0, atol=0)


def test_loss_weighting():
    d = GaussianDiffusion()
    x0, noise, t = make_batch()
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(6, 4, 4, 4, dtype=torch.float64)
    a = d.training_losses(out, x0, x_t, t, noise, vlb_weight=0.001)
    torch.testing.assert_close(a["loss"], a["mse"] + 0.001 * a["vb"])
    b = d.training_losses(out, x0, x_t, t, noise)
    torch.testing.assert_close(b["loss"], b["mse"] + b["vb"])
    with pytest.raises(ValueError):
        d.training_losses(out[:, :3], x0, x_t, t, noise)


def test_sample_timesteps_bias():
    d = GaussianDiffusion()
    n = 20000
    g = torch.Generator().manual_seed(0)
    uni = d.sample_timesteps(n, generator=g)
    noisy = d.sample_timesteps(n, generator=g, bias="noisy")
    clean = d.sample_timesteps(n, generator=g, bias="clean")
    for s in (uni, noisy, clean):
        assert s.dtype == torch.long and s.shape == (n,)
        assert s.min() >= 0 and s.max() < T
    # std of the mean is ~2 here; expected means 499.5, ~666, ~333
    assert abs(uni.float().mean().item() - 499.5) < 15
    assert noisy.float().mean().item() > 630
    assert clean.float().mean().item() < 370
    # same generator seed -> same draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(d.sample_timesteps(8, g1, bias="noisy"), d.sample_timesteps(8, g2, bias="noisy"))
    with pytest.raises(ValueError):
        d.sample_timesteps(4, bias="middle")


def test_from_scheduler_config_round_trip():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=500,
        beta_start=2e-4,
        beta_end=0.03,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
    )
    d = GaussianDiffusion.from_scheduler_config(sched.config)
    assert (d.num_timesteps, d.beta_start, d.beta_end) == (500, 2e-4, 0.03)
    torch.testing.assert_close(d.betas.float(), sched.betas, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # and via a plain dict loaded from JSON
    d2 = GaussianDiffusion.from_scheduler_config(dict(DDPMScheduler().config))
    assert (d2.num_timesteps, d2.beta_start, d2.beta_end) == (1000, 1e-4, 0.02)

    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion.from_scheduler_config(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config)
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion.from_scheduler_config(DDPMScheduler(prediction_type="v_prediction").config)
