"""FIR-filtered 2x resampling (StyleGAN2 ``upfirdn2d`` semantics) in plain PyTorch.

cDAL resamples with the separable filter k = outer([1, 3, 3, 1]) / 64. The reference code uses a
compiled op; here both directions are depthwise convolutions, which PyTorch runs in float32,
float16 and bfloat16 on every device, scripts with TorchScript and traces with torch.export.

* down: ``upfirdn2d(x, k, down=2, pad=(1, 1))`` == depthwise 4x4 conv, stride 2, padding 1.
* up:   ``upfirdn2d(x, 4k, up=2, pad=(2, 1))`` == depthwise 4x4 transposed conv, stride 2,
  padding 1 (the polyphase form: no zeros are inserted and multiplied).
* filtered downsampling conv (the input pyramid): ``upfirdn2d(x, k, pad=(2, 2))`` followed by a
  3x3 conv with stride 2 and no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fir_kernel", "depthwise_fir", "fir_down", "fir_up", "fir_blur_pad2", "upfirdn2d_reference"]


def fir_kernel(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 4x4 FIR kernel outer([1,3,3,1]) / 64."""
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float32)
    k = torch.outer(k1, k1)
    return (k / k.sum()).to(dtype)


def depthwise_fir(channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The FIR kernel as a (channels, 1, 4, 4) depthwise weight.

    Modules keep it as a buffer of fixed shape, so traced graphs (ONNX with a dynamic batch,
    torch.export) see a convolution with a known kernel and group count.
    """
    return fir_kernel(dtype).expand(channels, 1, 4, 4).contiguous()


def fir_down(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """2x FIR downsampling (H, W even) -> (H/2, W/2); ``weight`` from :func:`depthwise_fir`."""
    return F.conv2d(x, weight.to(x.dtype), stride=2, padding=1, groups=weight.shape[0])


def fir_up(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """2x FIR upsampling -> (2H, 2W); the gain 4 keeps a constant image constant."""
    return F.conv_transpose2d(x, weight.to(x.dtype) * 4.0, stride=2, padding=1, groups=weight.shape[0])


def fir_blur_pad2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``upfirdn2d(x, k, pad=(2, 2))``: full-resolution blur, output grows by 1 pixel per side."""
    return F.conv2d(x, weight.to(x.dtype), padding=2, groups=weight.shape[0])


def upfirdn2d_reference(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Literal upsample / pad / FIR / downsample, used only to test the fast forms above."""
    b, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(b, c, h, up, w, up)
        y[:, :, :, 0, :, 0] = x
        x = y.reshape(b, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).expand(c, 1, *kernel.shape)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down]
