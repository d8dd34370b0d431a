"""The IWAE bound and the log-likelihood estimator, against things known independently."""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal, MultivariateNormal, kl_divergence

import common
import training


class LinearGaussian(common.OneLayerVAE):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I): p(x) = N(b, W W^T + s^2 I) in closed form.
    q(z|x) is the exact posterior with its mean shifted and its scale widened, so the weights vary."""

    def __init__(self, x_dim=4, latent_dim=2, s=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.latent_dim, self.s = latent_dim, s
        self.W = torch.randn(x_dim, latent_dim, generator=g, dtype=torch.float64)
        self.b = torch.randn(x_dim, generator=g, dtype=torch.float64)
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, x):
        x = x.flatten(1)  # (B, x_dim)
        precision = torch.eye(self.latent_dim, dtype=x.dtype) + self.W.T @ self.W / self.s ** 2
        cov = torch.linalg.inv(precision)
        mu = (x - self.b) @ self.W @ cov.T / self.s ** 2
        return Independent(Normal(mu + 0.3, 1.3 * cov.diagonal().sqrt().expand_as(mu)), 1)

    def decode(self, z):
        loc = (z @ self.W.T + self.b).view(*z.shape[:-1], 1, 1, self.W.shape[0])
        return Independent(Normal(loc, self.s), 3)

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(self.W.shape[0], dtype=torch.float64)
        return MultivariateNormal(self.b, cov).log_prob(x.flatten(1))


@pytest.fixture
def linear_gaussian():
    model = LinearGaussian()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 2, generator=g, dtype=torch.float64)
    x = (z @ model.W.T + model.b + 0.5 * torch.randn(16, 4, generator=g, dtype=torch.float64)).view(16, 1, 1, 4)
    return model, x


def test_merge_unmerge_round_trip():
    t = torch.randn(5, 3, 2, 7)
    merged = common.merge(t)
    assert merged.shape == (15, 2, 7)
    assert torch.equal(merged[3 * 2 + 1], t[2, 1])  # sample i, image j -> row i * B + j
    assert torch.equal(common.unmerge(merged, 5), t)


def test_k1_is_the_elbo(linear_gaussian):
    model, x = linear_gaussian
    torch.manual_seed(0)
    out = common.iwae_bound(model, x, k=1)
    torch.manual_seed(0)
    qz_x = model.encode(x)
    z = qz_x.rsample()
    elbo = (model.decode(z).log_prob(x) + Normal(0.0, 1.0).log_prob(z).sum(-1) - qz_x.log_prob(z))
    assert torch.allclose(out["bound"], elbo)
    assert torch.allclose(out["bound"], -out["rate"] - out["distortion"])


def test_rate_averages_to_the_kl(linear_gaussian):
    model, x = linear_gaussian
    torch.manual_seed(0)
    rate = common.iwae_bound(model, x, k=20000)["rate"]  # the rate is averaged over the k samples
    kl = kl_divergence(model.encode(x), Independent(Normal(torch.zeros(2, dtype=torch.float64), 1.0), 1))
    assert torch.allclose(rate, kl, atol=0.05)


def test_expected_bound_grows_with_k(linear_gaussian):
    model, x = linear_gaussian
    torch.manual_seed(0)
    means = []
    for k in (1, 5, 50):
        draws = torch.stack([common.iwae_bound(model, x, k)["bound"].mean() for _ in range(200)])
        means.append((draws.mean().item(), draws.std().item() / math.sqrt(len(draws))))
    exact = model.exact_log_px(x).mean().item()
    for (lo, lo_se), (hi, hi_se) in zip(means, means[1:]):
        assert hi - lo > 3 * math.hypot(lo_se, hi_se)
    assert means[-1][0] < exact


def repeated_estimates(model, x, repeats, **kwargs):
    """Per-image mean and Monte Carlo standard error of the estimator over independent repeats."""
    est = torch.stack([common.estimate_log_likelihood(model, x, progress=False, **kwargs) for _ in range(repeats)])
    return est.mean(0), est.std(0) / math.sqrt(repeats)


def test_estimator_recovers_the_exact_log_likelihood(linear_gaussian):
    model, x = linear_gaussian
    exact = model.exact_log_px(x)
    torch.manual_seed(0)
    est, stderr = repeated_estimates(model, x, repeats=10, num_samples=2000)
    assert est.shape == exact.shape
    assert ((est - exact).abs() < 4 * stderr + 1e-3).all()
    assert stderr.max() < 0.05  # the tolerance stays tight
    # with one sample the estimate is the ELBO, visibly below log p(x): the check above can fail
    est_1, stderr_1 = repeated_estimates(model, x, repeats=10, num_samples=1)
    assert not ((est_1 - exact).abs() < 4 * stderr_1 + 1e-3).all()


def test_estimator_in_chunks_still_finds_log_px(linear_gaussian):
    model, x = linear_gaussian
    exact = model.exact_log_px(x)
    torch.manual_seed(0)
    est, stderr = repeated_estimates(model, x, repeats=10, num_samples=2000, max_rows=300)  # 7 chunks each
    assert ((est - exact).abs() < 4 * stderr + 1e-3).all()
    mean, se = common.mean_and_stderr(est)
    assert se == pytest.approx(est.std().item() / 4)


def test_bits_per_dim():
    assert common.bits_per_dim(-3072 * math.log(2) * 4.5, 3072) == pytest.approx(4.5)


def test_iwae_schedule_stages():
    total = training.IWAE_EPOCHS * 3000  # the paper's run, 3000 steps per epoch
    lr = lambda epoch: training.iwae_lr(epoch * 3000, total)
    assert training.IWAE_EPOCHS == 3280
    assert lr(0) == pytest.approx(1e-3)
    assert lr(1) == pytest.approx(1e-3 * 10 ** (-1 / 7))  # stage 0 lasts 3^0 = 1 epoch
    assert lr(3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lr(4) == pytest.approx(1e-3 * 10 ** (-2 / 7))  # stage 1 lasts 3 epochs
    assert lr(3279) == pytest.approx(1e-4)
    # compressed into 10 epochs, the same fractions of training get the same rates
    assert training.iwae_lr(9 * 100, 10 * 100) == lr(int(3280 * 0.9))
