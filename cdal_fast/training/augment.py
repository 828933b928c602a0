"""Augmentations of spec section 7, in plain torch, on batches already on the device.

Geometry (flips, rotation, scale and the random crop) is one affine resampling applied with the
same grid to image and mask, so the two can never disagree. Colour jitter touches the image only.
All randomness comes from the ``torch.Generator`` passed in, which makes training resumable
bit-for-bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine_crop", "color_jitter", "hed_jitter", "rgb_to_hsv", "hsv_to_rgb"]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def random_affine_crop(image: torch.Tensor, mask: torch.Tensor, crop: int, g: torch.Generator,
                       max_rot_deg: float = 22.0, scale: tuple[float, float] = (0.75, 1.25),
                       flips: bool = True, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop of ``crop`` pixels with rotation, scale and flips.

    image (B, C, H, W) float, mask (B, Cm, H, W) float in [-1, 1]. Pixels that fall outside the
    source are reflected, so no black corners teach the model a fake background. ``soft``: the mask
    channels are continuous maps (a teacher's probability and spread), resampled bilinearly and
    returned as they are instead of re-binarised.
    """
    b, _, h, w = image.shape
    dev = image.device
    theta_r = _uniform(b, -max_rot_deg, max_rot_deg, g, dev) * math.pi / 180
    s = _uniform(b, scale[0], scale[1], g, dev)
    fx = torch.ones(b, device=dev)
    fy = torch.ones(b, device=dev)
    if flips:
        fx = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, -fx, fx)
        fy = torch.where(torch.rand(b, generator=g, device=dev) < 0.5, -fy, fy)
    # Output pixel (u, v) in [-1, 1] of the crop -> source coordinates in [-1, 1].
    half_w = crop / w / s  # crop half-extent in normalised source units (scale > 1 zooms in)
    half_h = crop / h / s
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    # keep the rotated crop roughly inside the source when choosing its centre
    ext_x = (half_w * cos.abs() + half_h * sin.abs()).clamp(max=1.0)
    ext_y = (half_w * sin.abs() + half_h * cos.abs()).clamp(max=1.0)
    cx = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - ext_x)
    cy = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - ext_y)
    mat = torch.zeros(b, 2, 3, device=dev)
    mat[:, 0, 0] = cos * half_w * fx
    mat[:, 0, 1] = -sin * half_h * fy
    mat[:, 1, 0] = sin * half_w * fx
    mat[:, 1, 1] = cos * half_h * fy
    mat[:, 0, 2] = cx
    mat[:, 1, 2] = cy
    grid = F.affine_grid(mat, [b, 1, crop, crop], align_corners=False)
    img = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    msk = F.grid_sample(mask, grid.to(mask.dtype), mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if soft:
        return img, msk
    if mask.shape[1] == 1:
        msk = torch.where(msk >= 0, 1.0, -1.0).to(mask.dtype)
    else:  # one-hot: keep the class with the largest interpolated value
        msk = F.one_hot(msk.argmax(1), mask.shape[1]).permute(0, 3, 1, 2).to(mask.dtype) * 2 - 1
    return img, msk


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc, _ = rgb.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-8), torch.zeros_like(maxc))
    dc = delta.clamp(min=1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i[:, None]).squeeze(1)
    return torch.stack([r, g, b], 1)


def color_jitter(rgb: torch.Tensor, g: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1) -> torch.Tensor:
    """ColorJitter on (B, 3, H, W) images in [0, 1], factors drawn per image, fixed order."""
    b = rgb.shape[0]
    dev = rgb.device
    x = rgb
    fb = _uniform(b, 1 - brightness, 1 + brightness, g, dev).view(b, 1, 1, 1)
    x = (x * fb).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    fc = _uniform(b, 1 - contrast, 1 + contrast, g, dev).view(b, 1, 1, 1)
    x = (fc * x + (1 - fc) * gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    fs = _uniform(b, 1 - saturation, 1 + saturation, g, dev).view(b, 1, 1, 1)
    x = (fs * x + (1 - fs) * gray).clamp(0, 1)
    fh = _uniform(b, -hue, hue, g, dev).view(b, 1, 1)
    hsv = rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + fh) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


# Haematoxylin / eosin / DAB optical-density vectors of Ruifrok & Johnston (2001), one stain per row:
# optical density (-ln of transmitted light, per RGB channel) of a unit amount of each stain.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29],
                             [0.07, 0.99, 0.11],
                             [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
MIN_TRANSMISSION = 1e-6  # keeps -ln(I) finite on saturated black pixels


def hed_jitter(rgb: torch.Tensor, g: torch.Generator, sigma: float = 0.05) -> torch.Tensor:
    """Stain jitter in the H-E-D space (Tellez et al. 2018) on (B, 3, H, W) images in [0, 1].

    Why: MoNuSeg's organs and labs differ in staining; scaling each stain's optical density by
    ``U(1-sigma, 1+sigma)`` and shifting it by ``U(-sigma, sigma)`` (per image) mimics those
    differences along the stain axes, which plain RGB colour jitter cannot.
    """
    if sigma <= 0:
        return rgb
    b, dev = rgb.shape[0], rgb.device
    od = -torch.log(rgb.clamp_min(MIN_TRANSMISSION))
    hed = torch.einsum("bchw,cd->bdhw", od, HED_FROM_RGB.to(dev, od.dtype))
    alpha = _uniform(b * 3, 1 - sigma, 1 + sigma, g, dev).view(b, 3, 1, 1)
    beta = _uniform(b * 3, -sigma, sigma, g, dev).view(b, 3, 1, 1)
    hed = hed * alpha + beta
    od = torch.einsum("bdhw,dc->bchw", hed, RGB_FROM_HED.to(dev, od.dtype))
    return torch.exp(-od).clamp(0, 1)
