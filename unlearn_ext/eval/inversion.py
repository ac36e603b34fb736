"""Gradient-inversion data reconstruction (OPC's second deep-forgetting test, METHODS.md 4.3, 6.4).

:func:`gradient_inversion` follows "Inverting Gradients" (Geiping et al., 2020, the ``inversefed``
code): given the gradient of a model's loss on private samples with known labels, a dummy input is
optimised so that its gradient points the same way (cosine similarity over all parameters), with a
total-variation prior and the dummy boxed into the data range. How close the reconstruction comes to
the private samples is measured by :func:`psnr` and :func:`ssim`. Reconstructing forget samples from
the unlearned model's gradients tests whether the model still "knows" them.

The model is never changed: it runs in eval mode (BatchNorm uses its running statistics, dropout is
off), only ``torch.autograd.grad`` is used (no ``.grad`` is written), and its modes are restored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext.eval.predictions import _check_logits, _check_targets, eval_mode, model_device

SSIM_WINDOW = 11
"""Side of SSIM's Gaussian window (pixels)."""
SSIM_SIGMA = 1.5
"""Standard deviation of SSIM's Gaussian window (pixels)."""
SSIM_K1, SSIM_K2 = 0.01, 0.03
"""SSIM's stabilising constants: ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with ``L`` the data range."""


# --------------------------------------------------------------------------------------------
# Image similarity
# --------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor, data_range: float) -> None:
    for x, name in ((a, "a"), (b, "b")):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor [B, ...], got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(f"{name} must be a non-empty batch [B, ...] of B >= 1 samples, got shape {tuple(x.shape)}")
        if x.is_complex() or not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} must hold finite real values")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not 0 < data_range < math.inf:
        raise ValueError(f"data_range must be a positive finite number (max - min of the data), got {data_range!r}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio of each sample, in dB: ``10 log10(data_range^2 / MSE)``.

    Args:
        a, b: ``[B, ...]`` batches of the same shape (the MSE is over all non-batch dimensions).
        data_range: the data's ``max - min`` (e.g. 1.0 for images in [0, 1]).

    Returns:
        float64 ``[B]`` on ``a``'s device; ``inf`` where a sample is reproduced exactly.
    """
    _check_pair(a, b, data_range)
    mse = (a.double() - b.to(a.device).double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    k = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(k**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) of each image, Gaussian-weighted.

    Local means, variances and the covariance come from an ``11 x 11`` Gaussian window (sigma 1.5),
    population (not sample) statistics, ``K1 = 0.01``, ``K2 = 0.03``; the SSIM map is taken where the
    window fits inside the image ("valid", no padding) and averaged over positions and channels. This is
    the computation of ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L)`` (the tests check it against a SciPy re-implementation
    of that, and against scikit-image itself where it is installed).

    Args:
        a, b: ``[B, C, H, W]`` or ``[B, H, W]`` images of the same shape, ``H, W >= 11``.
        data_range: the data's ``max - min``.

    Returns:
        float64 ``[B]`` on ``a``'s device, in [-1, 1]; 1 for identical images.
    """
    _check_pair(a, b, data_range)
    if a.dim() == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if a.dim() != 4 or min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images [B, C, H, W] or [B, H, W] with H, W >= {SSIM_WINDOW}, got shape {tuple(a.shape)}"
        )
    channels = a.shape[1]
    window = _gaussian_window(a.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    a, b = a.double(), b.to(a.device).double()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# Gradient inversion
# --------------------------------------------------------------------------------------------


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation as in ``inversefed``: the mean absolute difference of horizontal
    neighbours plus that of vertical neighbours, over the last two dimensions of ``x`` ``[B, ..., H, W]``."""
    if x.dim() < 3:
        raise ValueError(f"total variation needs images [B, ..., H, W], got shape {tuple(x.shape)}")
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def _gradient_cosine(grads: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of two gradients given as lists of per-parameter tensors: dot products and
    squared norms are summed over the tensors (the cosine of the concatenated vectors, as ``inversefed``)."""
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    norm_g = sum(g.square().sum() for g in grads)
    norm_t = sum(t.square().sum() for t in target)
    return dot / (norm_g.sqrt() * norm_t.sqrt()).clamp_min(1e-30)


def _check_inversion_inputs(model: nn.Module, x_true: torch.Tensor, y_true: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x_true, torch.Tensor) or x_true.dim() < 2 or x_true.shape[0] == 0:
        shape = tuple(x_true.shape) if isinstance(x_true, torch.Tensor) else type(x_true).__name__
        raise ValueError(f"x_true must be a non-empty batch [B, ...], got {shape}")
    if not x_true.is_floating_point() or not bool(torch.isfinite(x_true).all()):
        raise ValueError(f"x_true must hold finite floating-point values, got {x_true.dtype}")
    if not isinstance(y_true, torch.Tensor) or y_true.dim() != 1 or y_true.shape[0] != x_true.shape[0]:
        shape = tuple(y_true.shape) if isinstance(y_true, torch.Tensor) else type(y_true).__name__
        raise ValueError(f"y_true must be [B] = [{x_true.shape[0]}] class indices, got {shape}")
    if y_true.is_floating_point() or y_true.is_complex() or y_true.dtype == torch.bool:
        raise ValueError(f"y_true must hold integer class indices, got {y_true.dtype}")


def gradient_inversion(
    model: nn.Module,
    x_true: torch.Tensor,
    y_true: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    data_range: tuple[float, float] | None = None,
    signed: bool = True,
    seed: int = 0,
) -> dict:
    """Reconstruct ``x_true`` from the model's gradient on it ("Inverting Gradients", labels known).

    Target: ``t = d/dtheta mean_i CE(model(x_true)_i, y_true_i)`` over every parameter that requires a
    gradient (the batch's mean gradient, what one SGD step would reveal). A dummy ``x`` (seeded
    ``N(0, 1)``, then boxed) is optimised by Adam with ``lr`` (decayed 10x at 3/8, 5/8 and 7/8 of the
    steps, and stepping on the *sign* of the gradient when ``signed``, both as ``inversefed``) on::

        loss(x) = 1 - cos(grad_theta CE(model(x), y_true), t) + tv_weight * total_variation(x)

    by double backpropagation. After every step the dummy is clamped to ``data_range``; by default that
    is ``(x_true.min(), x_true.max())``, standing in for the valid pixel range an attacker knows from
    the data's normalisation.

    Reconstructions are compared with ``x_true`` in order. With ``B > 1`` the mean gradient cannot tell
    apart a permutation of samples with the same label, so per-image scores are meaningful for
    ``B = 1`` (the standard setting) or distinct labels.

    Args:
        model: any differentiable classifier ``[B, ...] -> [B, C]`` (MLP, CNN); run in eval mode and
            restored, never changed.
        x_true: ``[B, ...]`` private inputs (``[B, C, H, W]`` images for TV and SSIM).
        y_true: ``[B]`` their labels (assumed known to the attacker).
        steps: optimisation steps; lr: Adam's initial learning rate (in input units when ``signed``).
        tv_weight: weight of the total-variation prior (needs images ``[B, ..., H, W]`` when > 0).
        data_range: ``(lo, hi)`` box for the dummy; also gives ``L = hi - lo`` for PSNR/SSIM.
        signed: step on the sign of the gradient (``inversefed``'s default).
        seed: seed of the dummy's initialisation.

    Returns:
        ``{"psnr": mean PSNR in dB, "init_psnr": the same for the random initialisation, "ssim": mean SSIM
        (``None`` unless ``x_true`` is ``[B, C, H, W]`` with ``H, W >= 11``), "grad_cos": the final
        cosine between the reconstruction's gradient and the target, "reconstruction": float32 ``[B,
        ...]`` on the CPU, "steps": steps}``.

    Raises:
        ValueError: on bad shapes or labels, ``steps < 1``, ``lr <= 0``, ``tv_weight < 0`` (or > 0 for
            non-image inputs), an empty ``data_range``, a model with no trainable parameter, or a zero
            target gradient.
    """
    _check_inversion_inputs(model, x_true, y_true)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not tv_weight >= 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight!r}")
    if tv_weight > 0 and x_true.dim() < 3:
        raise ValueError(f"tv_weight > 0 needs image inputs [B, ..., H, W], got x_true {tuple(x_true.shape)}")
    lo, hi = (float(x_true.min()), float(x_true.max())) if data_range is None else map(float, data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got ({lo}, {hi})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires a gradient: there is no gradient to invert")

    device = model_device(model)
    x_true = x_true.detach().to(device)
    y_true = y_true.to(device=device, dtype=torch.int64)
    with eval_mode(model):
        target = _target_gradient(model, params, x_true, y_true)
        kept = [i for i, t in enumerate(target) if t is not None]
        params, target = [params[i] for i in kept], [target[i] for i in kept]
        if not target or sum(float(t.square().sum()) for t in target) == 0.0:
            raise ValueError("the target gradient is zero: there is nothing to invert (is the loss saturated?)")

        generator = torch.Generator(device=device).manual_seed(seed)
        init = torch.randn(x_true.shape, generator=generator, device=device, dtype=x_true.dtype).clamp_(lo, hi)
        dummy = init.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([dummy], lr=lr)
        milestones = sorted({max(1, round(steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(steps):
            cos = _dummy_cosine(model, params, dummy, y_true, target, create_graph=True)
            loss = 1.0 - cos
            if tv_weight > 0:
                loss = loss + tv_weight * total_variation(dummy)
            (grad,) = torch.autograd.grad(loss, dummy)
            dummy.grad = grad.sign() if signed else grad
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                dummy.clamp_(lo, hi)
        final_cos = float(_dummy_cosine(model, params, dummy, y_true, target, create_graph=False))

    reconstruction = dummy.detach()
    length = hi - lo
    is_image = x_true.dim() == 4 and min(x_true.shape[-2:]) >= SSIM_WINDOW
    return {
        "psnr": float(psnr(reconstruction, x_true, length).mean()),
        "init_psnr": float(psnr(init, x_true, length).mean()),
        "ssim": float(ssim(reconstruction, x_true, length).mean()) if is_image else None,
        "grad_cos": final_cos,
        "reconstruction": reconstruction.to(device="cpu", dtype=torch.float32),
        "steps": steps,
    }


def _target_gradient(
    model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor | None]:
    with torch.enable_grad():
        logits = model(x)
        _check_logits(logits, "the model's output")
        _check_targets(y, logits, "y_true")
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def _dummy_cosine(
    model: nn.Module,
    params: list[torch.Tensor],
    dummy: torch.Tensor,
    y: torch.Tensor,
    target: list[torch.Tensor],
    *,
    create_graph: bool,
) -> torch.Tensor:
    with torch.enable_grad():
        loss = F.cross_entropy(model(dummy), y)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, target, strict=True)]
    return _gradient_cosine(grads, target)
