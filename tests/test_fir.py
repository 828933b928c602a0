import pytest
import torch

from cdal_fast.network.fir import depthwise_fir, fir_blur_pad2, fir_down, fir_kernel, fir_up, upfirdn2d_reference


def test_kernel_normalised():
    k = fir_kernel(torch.float64)
    assert k.sum().item() == pytest.approx(1.0)
    assert k[0, 0].item() == pytest.approx(1 / 64) and k[1, 1].item() == pytest.approx(9 / 64)


def test_fast_forms_match_upfirdn2d():
    x = torch.randn(2, 5, 12, 8, dtype=torch.float64)
    k = fir_kernel(torch.float64)
    w = depthwise_fir(5, torch.float64)
    torch.testing.assert_close(fir_down(x, w), upfirdn2d_reference(x, k, down=2, pad=(1, 1)))
    torch.testing.assert_close(fir_up(x, w), upfirdn2d_reference(x, 4 * k, up=2, pad=(2, 1)))
    torch.testing.assert_close(fir_blur_pad2(x, w), upfirdn2d_reference(x, k, pad=(2, 2)))


def test_constant_image_preserved_in_interior():
    x = torch.ones(1, 2, 8, 8)
    k = depthwise_fir(2)
    assert torch.allclose(fir_up(x, k)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    assert torch.allclose(fir_down(x, k)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_dtypes(device, dtype, tol):
    x = torch.randn(2, 4, 16, 16)
    k = depthwise_fir(4)
    for fn in (fir_down, fir_up, fir_blur_pad2):
        ref = fn(x, k)
        out = fn(x.to(device, dtype), k.to(device))
        assert out.dtype == dtype
        assert (out.float().cpu() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
