"""Schedule tables against values computed by hand (plain floats, spec section 2)."""

import math

import pytest
import torch

from cdal_fast.network.diffusion import make_schedule


def hand_tables(T, bmin=0.1, bmax=20.0):
    t = [1e-3 + (1 - 1e-3) * k / T for k in range(T + 1)]
    abar = [math.exp(-0.5 * ti**2 * (bmax - bmin) - ti * bmin) for ti in t]
    betas = [1e-8] + [1 - abar[k] / abar[k - 1] for k in range(1, T + 1)]
    a = [math.sqrt(1 - b) for b in betas]
    s = [math.sqrt(b) for b in betas]
    a_cum = [math.prod(a[: k + 1]) for k in range(T + 1)]
    s_cum = [math.sqrt(1 - ac**2) for ac in a_cum]
    pb = betas[1:]
    alpha = [1 - b for b in pb]
    ab = [math.prod(alpha[: k + 1]) for k in range(T)]
    ab_prev = [1.0] + ab[:-1]
    var = [pb[k] * (1 - ab_prev[k]) / (1 - ab[k]) for k in range(T)]
    c1 = [pb[k] * math.sqrt(ab_prev[k]) / (1 - ab[k]) for k in range(T)]
    c2 = [(1 - ab_prev[k]) * math.sqrt(alpha[k]) / (1 - ab[k]) for k in range(T)]
    logvar = [math.log(max(v, 1e-20)) for v in var]
    return dict(betas=betas, a=a, s=s, a_cum=a_cum, s_cum=s_cum, post_c1=c1, post_c2=c2, post_logvar=logvar)


@pytest.mark.parametrize("T", [2, 4])
def test_tables_match_hand_computation(T):
    sched = make_schedule(T)
    for name, ref in hand_tables(T).items():
        got = getattr(sched, name).double()
        # s_cum = sqrt(1 - a_cum^2) cancels in float32 (as in the reference) where a_cum ~ 1:
        # s_cum[0] is 1e-4 by hand but 0 in float32, so it gets an absolute tolerance of 1e-4.
        atol = 1.1e-4 if name == "s_cum" else 1e-6
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=2e-6, atol=atol,
                                   msg=f"{name} (T={T})")


def test_t2_known_values():
    # T = 2: t = (0.001, 0.5005, 1.0); abar_2 = exp(-10.05) -> beta_2 close to 1.
    s = make_schedule(2)
    assert s.betas[0].item() == pytest.approx(1e-8)
    assert s.betas[1].item() == pytest.approx(1 - math.exp(-0.5 * 0.5005**2 * 19.9 - 0.05005)
                                              / math.exp(-0.5 * 1e-6 * 19.9 - 1e-4), rel=1e-6)
    assert s.post_logvar[0].item() == pytest.approx(math.log(1e-20))  # posterior at k=0 is exact


def test_pair_and_posterior_formulas():
    s = make_schedule(4)
    x0 = torch.randn(3, 1, 4, 4)
    n1, n2 = torch.randn_like(x0), torch.randn_like(x0)
    k = torch.tensor([0, 2, 3])
    xk, xk1 = s.pair_from_noise(x0, k, n1, n2)
    for i, ki in enumerate(k.tolist()):
        exp_xk = s.a_cum[ki] * x0[i] + s.s_cum[ki] * n1[i]
        torch.testing.assert_close(xk[i], exp_xk)
        torch.testing.assert_close(xk1[i], s.a[ki + 1] * exp_xk + s.s[ki + 1] * n2[i])
    noise = torch.randn_like(x0)
    out = s.posterior_draw(x0, xk1, k, noise)
    for i, ki in enumerate(k.tolist()):
        exp = s.post_c1[ki] * x0[i] + s.post_c2[ki] * xk1[i]
        if ki > 0:
            exp = exp + torch.exp(0.5 * s.post_logvar[ki]) * noise[i]
        torch.testing.assert_close(out[i], exp)


def test_rejects_bad_T():
    with pytest.raises(ValueError):
        make_schedule(0)
