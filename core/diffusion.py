"""The DiT training objective: epsilon MSE plus the iDDPM variational bound for a learned variance.

A small re-statement of the parts of DiT's / iDDPM's ``gaussian_diffusion.py`` that training
needs (no sampling loop: sampling uses diffusers schedulers). Shapes: ``B`` batch, ``C`` image
or latent channels, ``H x W`` spatial size, ``T`` number of diffusion steps. Timesteps are
integers in ``[0, T)``; ``t = 0`` is the cleanest step.

The model output follows DiT / diffusers ``variance_type="learned_range"``: ``2C`` channels, the
first ``C`` are the predicted noise ``eps``, the last ``C`` a value ``v`` (roughly in [-1, 1])
that interpolates the log variance between the posterior variance ``beta~_t`` (v = -1) and
``beta_t`` (v = +1).

Loss weights. iDDPM's hybrid objective is ``L_simple + lambda * L_vlb`` with ``lambda = 0.001``
and ``L_vlb = sum_t L_t`` summed over all ``T`` steps. One uniformly drawn ``t`` per sample
estimates ``L_vlb`` as ``T * L_t``, so the per-sample weight on the sampled term is
``lambda * T = 0.001 * 1000 = 1.0``. That is why the iDDPM and DiT code add the per-step ``vb``
term unscaled (times ``T / 1000``): the paper's ``lambda = 0.001`` and the code's factor 1 are
the same objective. ``training_losses(vlb_weight=...)`` is the weight on the per-step term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianDiffusion"]


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by iDDPM / DiT."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log likelihood of data ``x`` in [-1, 1] quantised to 256 bins (bin width 2/255), in nats.

    The edge bins extend to -inf / +inf, as in iDDPM. All tensors ``[B, C, H, W]``.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def _mean_flat(x: Tensor) -> Tensor:
    """[B, ...] -> [B]: mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """Linear-beta DDPM forward process and the DiT hybrid training loss.

    Schedule tensors are kept in float64 on the CPU (float32 on devices without float64) and
    cast to the input's dtype when gathered.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.num_timesteps = int(num_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)

        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        self.betas = betas  # [T]
        self.alphas_cumprod = alphas_cumprod  # [T]
        self._arrays: dict[str, Tensor] = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            # posterior q(x_{t-1} | x_t, x_0): variance is 0 at t = 0, so its log is clipped
            # to the t = 1 value there (iDDPM).
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "log_betas": torch.log(betas),
        }
        self._per_device: dict[torch.device, dict[str, Tensor]] = {torch.device("cpu"): self._arrays}

    @classmethod
    def from_scheduler_config(cls, config: dict) -> GaussianDiffusion:
        """Build from a diffusers scheduler config (e.g. ``DDPMScheduler(...).config``).

        Only the linear beta schedule with epsilon prediction is supported; anything else raises
        ``ValueError`` naming the offending field.
        """
        schedule = config.get("beta_schedule", "linear")
        if schedule != "linear":
            raise ValueError(f"unsupported beta_schedule {schedule!r}: only 'linear' is supported")
        if config.get("trained_betas") is not None:
            raise ValueError("unsupported trained_betas: only a linear beta_schedule is supported")
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("unsupported rescale_betas_zero_snr=True")
        prediction = config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"unsupported prediction_type {prediction!r}: only 'epsilon' is supported")
        return cls(
            num_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
        )

    # -- helpers ---------------------------------------------------------------------------

    def _gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule value at ``t`` ([B] long), as ``[B, 1, 1, ...]`` in ``like``'s dtype and device."""
        device = like.device
        arrays = self._per_device.get(device)
        if arrays is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            arrays = {k: v.to(device=device, dtype=dtype) for k, v in self._arrays.items()}
            self._per_device[device] = arrays
        out = arrays[name][t.to(device)].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def _posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x_0), [B, C, H, W]."""
        return (
            self._gather("posterior_mean_coef1", t, x_t) * x0
            + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )

    # -- API -------------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        x0, noise: [B, C, H, W]; t: [B] long. Returns [B, C, H, W].
        """
        return (
            self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def training_losses(
        self,
        model_output: Tensor,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor,
        vlb_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """Per-sample DiT hybrid loss for a learned-range variance model.

        Args:
            model_output: [B, 2C, H, W], the model's (eps, v) for input ``x_t`` at ``t``.
            x0: [B, C, H, W] clean data in [-1, 1] (the decoder NLL at t = 0 assumes 8-bit data
                scaled to [-1, 1], as iDDPM does; for VAE latents it is only a regulariser).
            x_t: [B, C, H, W] = ``q_sample(x0, t, noise)``.
            t: [B] long timesteps.
            noise: [B, C, H, W] the noise used for ``x_t``.
            vlb_weight: weight of the per-step ``vb`` term. ``1.0`` is the iDDPM hybrid loss with
                ``lambda = 0.001`` for T = 1000 (lambda * T, see the module docstring) and is
                exactly what the DiT / DiffFit / Diff-Tuning code trains with. ``0.001`` puts
                lambda = 0.001 on the *per-step* term, i.e. lambda = 1e-6 on L_vlb: 1000x weaker
                than the paper, the variance head then barely learns. In general use
                ``0.001 * T`` to reproduce the paper.

        Returns:
            dict of [B] tensors:
            ``"mse"``: mean over (C, H, W) of (eps - noise)^2;
            ``"vb"``: for t > 0, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; for
            t == 0 the decoder NLL -log p(x_0|x_1) in bits/dim. The model mean uses the detached
            eps, so ``vb`` trains only the variance half (iDDPM / DiT stop-gradient);
            ``"loss"`` = mse + vlb_weight * vb.
        """
        c = x_t.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(
                f"model_output must have 2*C = {2 * c} channels (eps, v), got {model_output.shape[1]}"
            )
        eps, v = model_output[:, :c], model_output[:, c:]

        mse = _mean_flat((eps - noise) ** 2)

        # Learned range: interpolate the log variance between beta~_t (v = -1) and beta_t (v = +1).
        min_log = self._gather("posterior_log_variance_clipped", t, x_t)
        max_log = self._gather("log_betas", t, x_t)
        frac = (v + 1.0) / 2.0
        model_log_variance = frac * max_log + (1.0 - frac) * min_log

        # Model mean from the DETACHED eps: vb must not move the eps prediction.
        eps_sg = eps.detach()
        pred_x0 = (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps_sg
        )
        model_mean = self._posterior_mean(pred_x0, x_t, t)

        true_mean = self._posterior_mean(x0, x_t, t)
        true_log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(
            2.0
        )
        nll = -_mean_flat(
            _discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_variance)
        ) / math.log(2.0)
        vb = torch.where(t.to(kl.device) == 0, nll, kl)

        return {"mse": mse, "vb": vb, "loss": mse + vlb_weight * vb}

    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        bias: str = "uniform",
    ) -> Tensor:
        """Draw ``batch`` timesteps, [batch] long on ``device``.

        bias: ``"uniform"``; ``"noisy"``: p(t) proportional to t + 1 (Diff-Tuning, target data);
        ``"clean"``: p(t) proportional to T - t (Diff-Tuning, retention data).
        Drawn on the generator's device (CPU if none), then moved to ``device``.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        T = self.num_timesteps
        if bias == "uniform":
            t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
        elif bias in ("noisy", "clean"):
            steps = torch.arange(T, dtype=torch.float64, device=gen_device)
            weights = steps + 1.0 if bias == "noisy" else T - steps
            t = torch.multinomial(weights, batch, replacement=True, generator=generator)
        else:
            raise ValueError(f"bias must be 'uniform', 'noisy' or 'clean', got {bias!r}")
        return t.to(device) if device is not None else t
