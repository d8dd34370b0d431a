"""Observation models p(x|z): bin probabilities against plain float64 references written from the
formulas, normalisation over all bins, samples against probabilities, finiteness at extremes."""
import math

import pytest
import torch

from common import (LOG_VAR_BOUND, DiscretizedGaussian, DiscretizedLogistic, DiscretizedLogisticMixture,
                    Gaussian, bound_log_var, monte_carlo_mean)

# loc outside [0, 1] and on the edge bins; log-scale from -20 to 10 (log-variance from -40 to 20)
EXTREME_LOC = torch.tensor([-2.0, -0.5, 0.0, 0.31, 0.52, 254 / 255, 1.0, 1.5, 3.0])
EDGE_LOC = 0.5  # a bin edge for 2, 256 and 4096 bins
EXTREME_LOG_SCALE = torch.linspace(-20.0, 10.0, 16)


def extreme_params(locs=EXTREME_LOC):
    """Every (loc, log-scale) pair as a batch of 1x1x1 images: shapes (P, 1, 1, 1), leaves."""
    loc, log_scale = torch.meshgrid(locs, EXTREME_LOG_SCALE, indexing="ij")
    return [t.reshape(-1, 1, 1, 1).clone().requires_grad_() for t in (loc, log_scale)]


def all_bins(num_bins):
    """Every pixel value k/(num_bins-1), shaped (num_bins, 1, 1, 1, 1) to broadcast over a batch."""
    return (torch.arange(num_bins) / (num_bins - 1)).view(-1, 1, 1, 1, 1)


def plain_bin_probs(cdf, loc, scale, num_bins):
    """float64 P(bin k) for every k, (..., num_bins): CDF differences at the bin edges
    (k - 1/2)/(num_bins-1), the first and last edges moved to -inf and +inf. The edges are rounded
    to float32 first, as float32 data and models have them: with 4096 bins and scales ~1e-5 that
    rounding alone moves bin masses by 1e-4."""
    edges = ((torch.arange(num_bins + 1) - 0.5) / (num_bins - 1)).double()
    edges[0], edges[-1] = -math.inf, math.inf
    return cdf((edges - loc.double().unsqueeze(-1)) / scale.double().unsqueeze(-1)).diff(dim=-1)


def Phi(t):
    """Standard normal CDF; torch.special.ndtr is 0 below -10 even in float64."""
    return 0.5 * torch.special.erfc(-t / math.sqrt(2))


def assert_on_grid(x, num_bins):
    k = x * (num_bins - 1)
    assert x.min() >= 0 and x.max() <= 1
    assert (k - k.round()).abs().max() < 1e-3


def pixelcnnpp_log_prob(x, mu, log_s, num_bins):
    """Per-pixel log P(x) of PixelCNN++'s discretized logistic (Salimans et al. 2017, eq. 2 and
    their code), rewritten for [0, 1] data, in float64: plain sigmoid differences, edge pixels
    recognised by value, mass < 1e-5 replaced by pdf(x) * bin width."""
    x, mu, s = x.double(), mu.double(), log_s.double().exp()
    h = 0.5 / (num_bins - 1)
    cdf_plus, cdf_min = torch.sigmoid((x + h - mu) / s), torch.sigmoid((x - h - mu) / s)
    pdf_mid = torch.sigmoid((x - mu) / s) * torch.sigmoid(-(x - mu) / s) / s
    p = torch.where(cdf_plus - cdf_min > 1e-5, cdf_plus - cdf_min, pdf_mid * 2 * h)
    p = torch.where(x == 0, cdf_plus, torch.where(x == 1, torch.sigmoid(-(x - h - mu) / s), p))  # 1 - cdf_min
    return p.log()


def pixelcnnpp_mixture_log_prob(x, logits, loc, log_scale, coeffs, num_bins):
    """log p(x) summed over pixels, float64, one loop iteration per component; x (N, 3, H, W),
    logits (K, H, W), loc, log_scale, coeffs (K, 3, H, W)."""
    x, log_pi = x.double(), torch.log_softmax(logits.double(), 0)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    per_k = []
    for k in range(logits.shape[0]):
        mu_r = loc[k, 0]
        mu_g = loc[k, 1] + coeffs[k, 0] * r
        mu_b = loc[k, 2] + coeffs[k, 1] * r + coeffs[k, 2] * g
        per_k.append(log_pi[k] + pixelcnnpp_log_prob(r, mu_r, log_scale[k, 0], num_bins)
                     + pixelcnnpp_log_prob(g, mu_g, log_scale[k, 1], num_bins)
                     + pixelcnnpp_log_prob(b, mu_b, log_scale[k, 2], num_bins))
    return torch.logsumexp(torch.stack(per_k), 0).sum((-2, -1))


def random_mixture(K, C, H, W, coeffs=True, log_scale=(-4.0, -1.0)):
    logits = torch.randn(K, H, W)
    loc = torch.empty(K, C, H, W).uniform_(-0.2, 1.2)
    log_s = torch.empty(K, C, H, W).uniform_(*log_scale)
    c = torch.empty(K, 3, H, W).uniform_(-1, 1) if coeffs else None
    return logits, loc, log_s, c


# --- single discretised distributions ---------------------------------------------------------

@pytest.mark.parametrize("num_bins", [2, 256, 4096])  # 4096 puts bin 4094 above 0.999
@pytest.mark.parametrize("name", ["logistic", "gaussian"])
def test_bins_sum_to_one_and_match_float64_cdf_differences(name, num_bins):
    loc, log_scale = extreme_params(torch.cat([EXTREME_LOC, torch.tensor([EDGE_LOC])]))
    if name == "logistic":
        px, cdf = DiscretizedLogistic(loc, log_scale, num_bins), torch.sigmoid
    else:
        px, cdf = DiscretizedGaussian(loc, 2 * log_scale, num_bins), Phi
    log_p = px.log_prob(all_bins(num_bins))  # (num_bins, P)
    assert torch.isfinite(log_p).all()
    p = log_p.exp()
    torch.testing.assert_close(p.sum(0), torch.ones(p.shape[1]), atol=1e-4, rtol=0)
    # float32 cannot say on which side of an edge a loc at the edge lies when the scale is < 1e-7
    off_edge = loc.detach().flatten() != EDGE_LOC
    ref = plain_bin_probs(cdf, loc.detach().flatten(), log_scale.detach().exp().flatten(), num_bins)  # (P, num_bins)
    torch.testing.assert_close(p.T.double()[off_edge], ref[off_edge], atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(log_p.sum(), [loc, log_scale])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["logistic", "gaussian"])
def test_mean_is_exact_sum_over_bins(name):
    loc, log_scale = extreme_params()
    if name == "logistic":
        px, cdf = DiscretizedLogistic(loc, log_scale, 256), torch.sigmoid
    else:
        px, cdf = DiscretizedGaussian(loc, 2 * log_scale, 256), Phi
    probs = plain_bin_probs(cdf, loc.detach().flatten(), log_scale.detach().exp().flatten(), 256)
    ref = probs @ (torch.arange(256, dtype=torch.float64) / 255)
    torch.testing.assert_close(px.mean.flatten().double(), ref, atol=1e-5, rtol=0)


def test_logistic_log_prob_matches_pixelcnnpp_formulas():
    torch.manual_seed(0)
    loc = torch.empty(500, 3, 2, 2).uniform_(-0.5, 1.5)
    log_scale = torch.empty(500, 3, 2, 2).uniform_(-5, 1)
    x = torch.randint(0, 256, (500, 3, 2, 2)) / 255
    x[:50] = torch.randint(0, 2, (50, 3, 2, 2)).float()  # plenty of edge pixels
    ref = pixelcnnpp_log_prob(x, loc, log_scale, 256).sum((-3, -2, -1))
    torch.testing.assert_close(DiscretizedLogistic(loc, log_scale, 256).log_prob(x).double(), ref,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grad", [True, False])  # evaluation (no gradients) takes torch's log_ndtr directly
def test_gaussian_log_prob_matches_float64_cdf_differences(grad):
    torch.manual_seed(0)
    loc = torch.empty(500, 3, 2, 2).uniform_(-0.5, 1.5)
    log_var = torch.empty(500, 3, 2, 2).uniform_(-6, 4)
    x = torch.randint(0, 256, (500, 3, 2, 2)) / 255
    x[:50] = torch.randint(0, 2, (50, 3, 2, 2)).float()
    h, std, xd, mu = 0.5 / 255, (0.5 * log_var.double()).exp(), x.double(), loc.double()
    a = torch.where(x == 0, -math.inf, (xd - h - mu) / std)
    b = torch.where(x == 1, math.inf, (xd + h - mu) / std)
    p = torch.where(a > 0, Phi(-a) - Phi(-b), Phi(b) - Phi(a))  # the side without cancellation
    ref = p.log().sum((-3, -2, -1))
    with torch.set_grad_enabled(grad):
        log_prob = DiscretizedGaussian(loc, log_var, 256).log_prob(x).double()
    torch.testing.assert_close(log_prob, ref, rtol=1e-4, atol=1e-4)


def test_gaussian_tail_gradient_is_the_mills_ratio():
    # d/dloc log Phi((h - loc)/sigma) = -phi(b)/Phi(b)/sigma, with phi(b)/Phi(b) = sqrt(2/pi)/erfcx(-b/sqrt 2);
    # torch.special.log_ndtr's own float32 gradient is off by up to 10% or more this far out
    loc = torch.tensor([0.5, 0.9, 3.0]).view(3, 1, 1, 1, 1)
    log_var = torch.tensor([-40.0, -20.0, -10.0, -4.0]).view(1, 4, 1, 1, 1)
    loc, log_var = [t.expand(3, 4, 1, 1, 1).clone().requires_grad_() for t in (loc, log_var)]
    DiscretizedGaussian(loc, log_var, 256).log_prob(torch.zeros(1, 1, 1)).sum().backward()
    std = (0.5 * log_var.detach().double()).exp()
    b = (0.5 / 255 - loc.detach().double()) / std
    mills = math.sqrt(2 / math.pi) / torch.special.erfcx(-b / math.sqrt(2))
    torch.testing.assert_close(loc.grad.double(), -mills / std, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["logistic", "gaussian"])
def test_samples_on_grid_and_mean_matches_monte_carlo(name):
    torch.manual_seed(0)
    loc, log_scale = [t.detach() for t in extreme_params()]
    make = DiscretizedLogistic if name == "logistic" else (lambda m, s, nb: DiscretizedGaussian(m, 2 * s, nb))
    assert_on_grid(make(loc, log_scale, 256).sample((100,)), 256)
    px = make(torch.tensor([-0.1, 0.2, 0.5, 0.97]).view(4, 1, 1, 1),
              torch.tensor([-6.0, -2.0, -1.0, 0.5]).view(4, 1, 1, 1), 256)
    n = 20_000
    x = px.sample((n,))  # (n, 4, 1, 1, 1)
    assert_on_grid(x, 256)
    se = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - px.mean).abs() <= 5 * se + 1e-6).all()
    assert ((monte_carlo_mean(px, n=2000) - px.mean).abs() <= 5 * math.sqrt(n / 2000) * se + 1e-6).all()


# --- continuous Gaussian and the log-variance bound -------------------------------------------

def test_gaussian_log_prob_is_normal_density_summed():
    torch.manual_seed(0)
    loc, log_var, x = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5, 3, 4, 4)
    px = Gaussian(loc, log_var, 256)
    ref = torch.distributions.Normal(loc, (0.5 * log_var).exp()).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(px.log_prob(x), ref)
    torch.testing.assert_close(px.mean, loc)
    x = px.sample((20_000,))  # (n, 5, 3, 4, 4)
    assert not torch.allclose(x, x.round(decimals=2))  # continuous, not on a grid
    torch.testing.assert_close(x.mean(0), loc, atol=5 * (0.5 * log_var).exp().max().item() / math.sqrt(20_000), rtol=0)
    assert Gaussian(loc.requires_grad_(), log_var, 256).rsample().requires_grad
    pd = Gaussian(loc, log_var, 16).discretized()
    assert isinstance(pd, DiscretizedGaussian) and pd.num_bins == 16
    assert torch.equal(pd.loc, loc) and torch.equal(pd.log_var, log_var)


def test_bound_log_var():
    raw = torch.linspace(-4, 4, 101)
    bounded = bound_log_var(raw)
    assert (bounded.abs() < LOG_VAR_BOUND).all() and LOG_VAR_BOUND == 1.0
    assert bounded[-1] > 0.999 and bounded[0] < -0.999 and bounded[50].abs() < 1e-6
    assert (bounded.diff() > 0).all()
    assert torch.equal(bound_log_var(raw, bounded=False), raw)


# --- the mixture ------------------------------------------------------------------------------

def test_mixture_sums_to_one_over_all_256_cubed_colours():
    torch.manual_seed(0)
    px = DiscretizedLogisticMixture(*random_mixture(3, 3, 1, 1), num_bins=256)
    v = torch.arange(256) / 255
    total = 0.0
    with torch.no_grad():
        for r in v.split(16):  # 16 * 256^2 colours at a time
            x = torch.stack(torch.meshgrid(r, v, v, indexing="ij"), -1).reshape(-1, 3, 1, 1)
            total += px.log_prob(x).double().exp().sum().item()
    assert abs(total - 1) < 1e-3


def test_mixture_matches_pixelcnnpp_formulas():
    torch.manual_seed(0)
    params = random_mixture(4, 3, 2, 2, log_scale=(-5.0, 0.0))
    px = DiscretizedLogisticMixture(*params, num_bins=256)
    x = torch.cat([torch.randint(0, 256, (300, 3, 2, 2)) / 255, px.sample((300,))])
    x[:30] = torch.randint(0, 2, (30, 3, 2, 2)).float()
    ref = pixelcnnpp_mixture_log_prob(x, *params, num_bins=256)
    torch.testing.assert_close(px.log_prob(x).double(), ref, rtol=1e-4, atol=1e-4)


def test_mixture_of_one_without_coeffs_is_the_logistic():
    torch.manual_seed(0)
    loc, log_scale = torch.randn(6, 1, 3, 4, 4), torch.randn(6, 1, 3, 4, 4) - 2
    x = torch.randint(0, 256, (6, 3, 4, 4)) / 255
    px = DiscretizedLogisticMixture(torch.randn(6, 1, 4, 4), loc, log_scale, torch.zeros(6, 1, 3, 4, 4), 256)
    torch.testing.assert_close(px.log_prob(x), DiscretizedLogistic(loc[:, 0], log_scale[:, 0], 256).log_prob(x))


def test_mixture_without_coeffs_one_channel_sums_to_one_and_has_exact_mean():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 1, 1)  # (P, K, H, W)
    loc = torch.empty(5, 3, 1, 1, 1).uniform_(-0.5, 1.5)  # (P, K, C, H, W)
    log_scale = torch.empty(5, 3, 1, 1, 1).uniform_(-8, 1)
    px = DiscretizedLogisticMixture(logits, loc, log_scale, None, 256)
    p = px.log_prob(all_bins(256)).exp()  # (256, P)
    torch.testing.assert_close(p.sum(0), torch.ones(5), atol=1e-4, rtol=0)
    probs = plain_bin_probs(torch.sigmoid, loc, log_scale.exp(), 256)  # (P, K, C, H, W, 256)
    pi = torch.softmax(logits.double(), 1).unsqueeze(2)  # (P, K, 1, H, W)
    ref = (pi * (probs @ (torch.arange(256, dtype=torch.float64) / 255))).sum(1)
    torch.testing.assert_close(px.mean.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(p.T.double(), (pi.unsqueeze(-1) * probs).sum(1).flatten(1), atol=1e-5, rtol=1e-4)


def test_mixture_log_prob_and_gradients_finite_at_extremes():
    torch.manual_seed(0)
    loc, log_scale = extreme_params()  # (P, 1, 1, 1)
    P = loc.shape[0]
    logits = torch.zeros(P, 2, 1, 1, requires_grad=True)
    coeffs = torch.tensor([1.0, -1.0, 1.0]).view(1, 1, 3, 1, 1).repeat(P, 2, 1, 1, 1).requires_grad_()
    px = DiscretizedLogisticMixture(logits, loc.view(P, 1, 1, 1, 1).expand(P, 2, 3, 1, 1),
                                    log_scale.view(P, 1, 1, 1, 1).expand(P, 2, 3, 1, 1), coeffs, 256)
    x = torch.randint(0, 256, (64, 1, 3, 1, 1)) / 255
    x[:8] = torch.randint(0, 2, (8, 1, 3, 1, 1)).float()
    log_p = px.log_prob(x)  # (64, P)
    assert log_p.shape == (64, P) and torch.isfinite(log_p).all()
    grads = torch.autograd.grad(log_p.sum(), [logits, loc, log_scale, coeffs])
    assert all(torch.isfinite(g).all() for g in grads)


def test_mixture_coeffs_need_rgb_and_have_no_exact_mean():
    logits, loc, log_scale, coeffs = random_mixture(2, 3, 1, 1)
    with pytest.raises(NotImplementedError, match="Monte Carlo"):
        DiscretizedLogisticMixture(logits, loc, log_scale, coeffs, 256).mean
    with pytest.raises(ValueError):
        DiscretizedLogisticMixture(logits, loc[:, :1], log_scale[:, :1], coeffs, 256)


def test_mixture_samples_follow_log_prob():
    # 4 bins per channel, so that all 64 colour frequencies can be compared; strong coeffs and sharp
    # G and B, so that conditioning on anything but the drawn grid values of R and G shows
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -0.3]).view(2, 1, 1)
    loc = torch.tensor([[0.3, -0.2, 0.6], [0.7, 0.4, -0.1]]).view(2, 3, 1, 1)
    log_scale = torch.tensor([-1.0, -3.5, -3.5]).view(1, 3, 1, 1).repeat(2, 1, 1, 1)  # G, B sharp given R, G
    coeffs = torch.tensor([[0.9, -0.8, 0.7], [-0.6, 0.5, 0.9]]).view(2, 3, 1, 1)
    px = DiscretizedLogisticMixture(logits, loc, log_scale, coeffs, num_bins=4)
    v = torch.arange(4) / 3
    colours = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), -1).reshape(64, 3, 1, 1)
    p = px.log_prob(colours).exp()
    assert abs(p.sum() - 1) < 1e-5
    n = 100_000
    x = px.sample((n,))  # (n, 3, 1, 1)
    assert_on_grid(x, 4)
    k = (x.flatten(1) * 3).round().long() @ torch.tensor([16, 4, 1])
    freq = torch.bincount(k, minlength=64) / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all()
    assert_on_grid(DiscretizedLogisticMixture(*random_mixture(3, 3, 4, 4), num_bins=256).sample((50,)), 256)


# --- shapes -----------------------------------------------------------------------------------

def test_shapes_under_importance_sampling():
    k, B, C, H, W, K = 5, 4, 3, 6, 7, 2
    x = torch.randint(0, 256, (B, C, H, W)) / 255
    loc, scale = torch.rand(k, B, C, H, W), torch.randn(k, B, C, H, W)
    mix = (torch.randn(k, B, K, H, W), torch.rand(k, B, K, C, H, W), torch.randn(k, B, K, C, H, W))
    for px in [Gaussian(loc, scale, 256), DiscretizedGaussian(loc, scale, 256), DiscretizedLogistic(loc, scale, 256),
               DiscretizedLogisticMixture(*mix, torch.rand(k, B, K, 3, H, W), 256),
               DiscretizedLogisticMixture(*mix, None, 256)]:
        assert px.batch_shape == (k, B) and px.event_shape == (C, H, W)
        assert px.log_prob(x).shape == (k, B)
        assert px.sample().shape == (k, B, C, H, W) and px.sample((2,)).shape == (2, k, B, C, H, W)
        if not (isinstance(px, DiscretizedLogisticMixture) and px.coeffs is not None):
            assert px.mean.shape == (k, B, C, H, W)
        if not isinstance(px, Gaussian):
            assert px.discretized() is px
