"""The likelihood helpers every chapter shares: the latent and observation distributions, the VAE interface
and its log-weight parts (one stochastic layer, or a top-down hierarchy), the IWAE bound, the importance-sampled
log-likelihood estimator and bits/dim; and `UserError`, the one exception the scripts report without a traceback.

The rest of the house: `training.py` (schedules, checkpoints, the loop and its guards), `evaluation.py` (held-out
statistics, grids, curves), `experiment.py` (the command line and the run every chapter makes), `devices.py`
(devices and the speed plumbing), `data.py` (datasets and pixel conventions).

Conventions. An encoder returns q(z|x) as a Distribution with batch shape (B,) and event shape (D,);
a decoder takes z of shape (N, D) and returns p(x|z) with batch shape (N,) and event shape (C, H, W),
so `px_z.log_prob(x)` is one number per image. Importance samples are a leading axis k, folded into
the batch axis for the networks by `merge` and unfolded by `unmerge`.
"""
import contextlib
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints
from tqdm import tqdm

from devices import EVAL_COMPILE_OPTIONS, Compiled


class UserError(RuntimeError):
    """Something the user can fix (missing data, a bad flag, an unreadable checkpoint): the message
    says what and how; the scripts print it without a traceback and exit with status 2."""


# ---------------------------------------------------------------------------------------------------
# Latent distributions and the importance-sample axis
# ---------------------------------------------------------------------------------------------------
def merge(t):
    """(k, B, ...) -> (k*B, ...): the importance samples become extra rows of the batch."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unmerge(t, k):
    """(k*B, ...) -> (k, B, ...), the inverse of `merge`."""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


def diagonal_gaussian(mu, log_sigma):
    """q(z|x) = N(mu, diag(exp(log_sigma)^2)), event over the last axis."""
    return Independent(Normal(mu, log_sigma.exp(), validate_args=False), 1, validate_args=False)


def standard_normal(latent_dim, device):
    """p(z) = N(0, I)."""
    zeros = torch.zeros(latent_dim, device=device)
    return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)

# ---------------------------------------------------------------------------------------------------
# Observation models p(x|z)
# ---------------------------------------------------------------------------------------------------
# Pixels x take the values k/(num_bins-1), k = 0..num_bins-1, in [0, 1]. Bin k is centred at
# c_k = k/(num_bins-1) with half-width h = 1/(2(num_bins-1)); the edge bins take the tails,
# (-inf, c_0+h] and [c_last-h, +inf), so the bin probabilities sum to one. Bins are found by index.

LOG_VAR_BOUND = 1.0  # Gaussian log-variance = LOG_VAR_BOUND * tanh(raw): variance >= exp(-1)
LOGISTIC_MIN_BIN_MASS = 1e-5  # below this bin mass use pdf(centre) * 2h, as PixelCNN++ does
GAUSS_MIN_BIN_WIDTH = 1e-3  # bins narrower than this (in std) use pdf(centre) * 2h, see below
SAMPLE_U_EPS = 1e-6  # uniforms for inverse-CDF draws lie in [eps, 1-eps]: tails cut at mass 1e-6
LOG_NDTR_ASYMPTOTIC = 10.0  # log Phi(z) by its asymptotic series for z < -10, see _log_ndtr
LOG_2PI = math.log(2 * math.pi)


def bound_log_var(raw, bounded=True):
    """The story's tanh bound: log sigma^2 in (-LOG_VAR_BOUND, LOG_VAR_BOUND) if bounded, else raw."""
    return LOG_VAR_BOUND * torch.tanh(raw) if bounded else raw


def _bin_index(x, num_bins):
    return torch.round(x * (num_bins - 1)).clamp(0, num_bins - 1)


def _bin_edges(x, num_bins):
    """Bin index of x and the bin's lower and upper edges c -+ h. The edges are formed from the
    index, so that bin k's upper edge and bin k+1's lower edge are the same float and the masses
    telescope to 1 even for scales far below float32's resolution of loc."""
    idx = _bin_index(x, num_bins)
    return idx, (idx - 0.5) / (num_bins - 1), (idx + 0.5) / (num_bins - 1)


def _to_grid(y, num_bins):
    """Clamp to [0, 1] and round to the nearest bin centre: the edge bins take the tails."""
    return _bin_index(y.clamp(0, 1), num_bins) / (num_bins - 1)


def _inner_boundaries(num_bins, like):
    """c_j - h for j = 1..num_bins-1: the num_bins-1 boundaries between neighbouring bins."""
    j = torch.arange(1, num_bins, dtype=like.dtype, device=like.device)
    return (j - 0.5) / (num_bins - 1)


def _log1mexp(a):
    """log(1 - e^a) for a < 0, switching at a = -log 2 (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"). Both branches get safe inputs so that gradients stay finite."""
    a = a.clamp(max=-torch.finfo(a.dtype).tiny)
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)),
                       torch.log1p(-torch.exp(a.clamp(max=-math.log(2)))))


def _log_ndtr(z):
    """log Phi(z), with gradients accurate in the far left tail. torch.special.log_ndtr is accurate
    there but its float32 gradient is not (relative errors of 1e-4 at z = -60 and 10% at z = -3000 were
    measured), so below z = -LOG_NDTR_ASYMPTOTIC use the asymptotic series (Abramowitz & Stegun
    26.2.12) log Phi(z) = -z^2/2 - log(-z) - log(2pi)/2 + log(1 - 1/z^2 + 3/z^4 - 15/z^6 + 105/z^8),
    whose truncation error there is < 1e-7 and which autograd differentiates correctly. Without gradients
    (evaluation) torch's value is used as it is."""
    if not torch.is_grad_enabled():
        return torch.special.log_ndtr(z)
    z_tail = z.clamp(max=-LOG_NDTR_ASYMPTOTIC)
    r = z_tail ** -2
    series = torch.log1p(r * (-1 + r * (3 + r * (-15 + r * 105))))
    tail = -0.5 * z_tail ** 2 - torch.log(-z_tail) - 0.5 * LOG_2PI + series
    return torch.where(z < -LOG_NDTR_ASYMPTOTIC, tail, torch.special.log_ndtr(z.clamp(min=-LOG_NDTR_ASYMPTOTIC)))


def _logistic_bin_log_prob(x, loc, log_scale, num_bins):
    """log P(bin of x) per pixel under Logistic(loc, e^log_scale) discretised to num_bins bins
    (Salimans et al. 2017, PixelCNN++, eq. 2): sigma((c+h-loc)/s) - sigma((c-h-loc)/s)."""
    half = 0.5 / (num_bins - 1)
    idx, lower, upper = _bin_edges(x, num_bins)
    inv_s = torch.exp(-log_scale)
    plus = (upper - loc) * inv_s  # b = (c + h - loc) / s
    minus = (lower - loc) * inv_s  # a = (c - h - loc) / s
    log_cdf_plus = F.logsigmoid(plus)  # first bin: log sigma(b) = -softplus(-b)
    log_sf_minus = F.logsigmoid(-minus)  # last bin: log(1 - sigma(a)) = -softplus(a)
    # Interior: sigma(b) - sigma(a) = sigma(b) sigma(-a) (1 - e^{a-b}), an exact identity whose
    # factors have no cancellation, with a - b = -2h/s formed directly (PixelCNN++ instead takes
    # the float32 difference of sigmoids).
    log_mass = log_cdf_plus + log_sf_minus + _log1mexp(-2 * half * inv_s)
    # Where the mass < 1e-5 PixelCNN++ uses log pdf(centre) + log 2h; kept so numbers match theirs.
    z = (idx / (num_bins - 1) - loc) * inv_s
    log_mid = z - 2 * F.softplus(z) + (math.log(2 * half) - log_scale)  # log pdf = z - log s - 2 softplus(z)
    interior = torch.where(log_mass > math.log(LOGISTIC_MIN_BIN_MASS), log_mass, log_mid)
    return torch.where(idx == 0, log_cdf_plus, torch.where(idx == num_bins - 1, log_sf_minus, interior))


def _logistic_mean(loc, log_scale, num_bins):
    """Exact mean of the discretised logistic, sum_k c_k P(k), summed by parts:
    sum_{j>=1} (c_j - c_{j-1}) P(bin >= j) = 1/(num_bins-1) sum_j sigma((loc - (c_j - h)) / s)."""
    b = _inner_boundaries(num_bins, loc)  # (num_bins-1,)
    u = (loc.unsqueeze(-1) - b) * torch.exp(-log_scale).unsqueeze(-1)  # (..., num_bins-1)
    return torch.sigmoid(u).sum(-1) / (num_bins - 1)


def _logistic_noise(shape, like):
    """Standard logistic draws by inverse CDF, log(u / (1 - u)), u kept away from 0 and 1."""
    return torch.logit(torch.rand(shape, dtype=like.dtype, device=like.device), eps=SAMPLE_U_EPS)


class Gaussian(Distribution):
    """Continuous Gaussian N(loc, e^log_var) per pixel, the density the story trains with.

    Data in [0, 1] (values k/(num_bins-1)), but the density lives on all of R, so log_prob is a
    log-density, not the log-probability of a bin: log_prob sums log N(x; loc, e^log_var) over
    (C, H, W). num_bins is only kept for discretized(). loc, log_var: (*batch, C, H, W).
    """
    arg_constraints = {"loc": constraints.real, "log_var": constraints.real}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, loc, log_var, num_bins=256):
        self.loc, self.log_var = torch.broadcast_tensors(loc, log_var)  # (*batch, C, H, W)
        self.num_bins = num_bins
        super().__init__(self.loc.shape[:-3], self.loc.shape[-3:], validate_args=False)

    @property
    def mean(self):
        return self.loc

    def log_prob(self, x):
        # log N(x; mu, sigma^2) = -(log 2pi + log sigma^2 + (x - mu)^2 / sigma^2) / 2
        log_px = -0.5 * (LOG_2PI + self.log_var + (x - self.loc) ** 2 * torch.exp(-self.log_var))
        return log_px.sum((-3, -2, -1))

    def rsample(self, sample_shape=torch.Size()):
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(0.5 * self.log_var) * eps

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def discretized(self):
        return DiscretizedGaussian(self.loc, self.log_var, self.num_bins)

    def mean_log_scale(self):
        """The average log-std over pixels and batch."""
        return 0.5 * self.log_var.mean()


class DiscretizedGaussian(Distribution):
    """N(loc, e^log_var) discretised to num_bins bins on [0, 1]; the edge bins take the tails.

    Data: x = k/(num_bins-1). P(x) = Phi((c+h-loc)/sigma) - Phi((c-h-loc)/sigma) for bin centre c
    and half-width h = 1/(2(num_bins-1)); log_prob sums log P over (C, H, W).
    loc, log_var: (*batch, C, H, W).
    """
    arg_constraints = {"loc": constraints.real, "log_var": constraints.real}
    support = constraints.independent(constraints.unit_interval, 3)

    def __init__(self, loc, log_var, num_bins=256):
        self.loc, self.log_var = torch.broadcast_tensors(loc, log_var)  # (*batch, C, H, W)
        self.num_bins = num_bins
        super().__init__(self.loc.shape[:-3], self.loc.shape[-3:], validate_args=False)

    @property
    def mean(self):
        # sum_k c_k P(k) summed by parts, as in _logistic_mean: P(bin >= j) = Phi((loc - (c_j - h)) / sigma)
        b = _inner_boundaries(self.num_bins, self.loc)  # (num_bins-1,)
        u = (self.loc.unsqueeze(-1) - b) * torch.exp(-0.5 * self.log_var).unsqueeze(-1)  # (..., num_bins-1)
        return torch.special.ndtr(u).sum(-1) / (self.num_bins - 1)

    def log_prob(self, x):
        nb, log_var = self.num_bins, self.log_var
        half = 0.5 / (nb - 1)
        idx, lower, upper = _bin_edges(x, nb)
        inv_std = torch.exp(-0.5 * log_var)
        b = (upper - self.loc) * inv_std  # (c + h - loc) / sigma
        a = (lower - self.loc) * inv_std  # (c - h - loc) / sigma
        # Interior: Phi(b) - Phi(a) = Phi(-a) - Phi(-b) by symmetry, so reflect the bins right of the
        # mode to the left, where log Phi is accurate: Phi(hi) (1 - exp(log Phi(lo) - log Phi(hi))).
        # The first bin is Phi(b) (hi = b) and the last 1 - Phi(a) = Phi(-a) (hi = -a, reflected), so two
        # log Phi per sub-pixel serve every bin.
        first, last = idx == 0, idx == nb - 1
        right = ((a + b > 0) & ~first) | last
        log_hi = _log_ndtr(torch.where(right, -a, b))
        log_lo = _log_ndtr(torch.where(right, -b, a))
        # With log Phi the mass itself never underflows; what fails is log Phi(lo) - log Phi(hi) for
        # bins narrow next to sigma (relative error ~1e-7 (1 + |z|) sigma/2h, and log 0 once the two log Phi
        # are equal in float32). Below 2h/sigma = 1e-3 use the midpoint rule pdf(c) * 2h instead, whose
        # relative error is (2h/sigma)^2 |z^2 - 1| / 24 < 1e-7 |z^2 - 1|.
        narrow = 2 * half * inv_std < GAUSS_MIN_BIN_WIDTH
        log_mass = log_hi + _log1mexp(torch.where(narrow, -1.0, log_lo - log_hi))
        z = (idx / (nb - 1) - self.loc) * inv_std
        log_mid = -0.5 * (LOG_2PI + log_var + z ** 2) + math.log(2 * half)
        interior = torch.where(narrow, log_mid, log_mass)
        log_px = torch.where(first | last, log_hi, interior)
        return log_px.sum((-3, -2, -1))

    def sample(self, sample_shape=torch.Size()):
        # a continuous draw rounded to its bin has exactly the bin probabilities, tails included
        with torch.no_grad():
            eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
            return _to_grid(self.loc + torch.exp(0.5 * self.log_var) * eps, self.num_bins)

    def discretized(self):
        return self

    def mean_log_scale(self):
        """The average log-std over pixels and batch."""
        return 0.5 * self.log_var.mean()


class DiscretizedLogistic(Distribution):
    """Logistic(loc, e^log_scale) discretised to num_bins bins on [0, 1]; edge bins take the tails.

    Data: x = k/(num_bins-1). P(x) = sigma((c+h-loc)/s) - sigma((c-h-loc)/s) (PixelCNN++, Salimans
    et al. 2017, eq. 2); log_prob sums log P over (C, H, W). loc, log_scale: (*batch, C, H, W).
    """
    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.independent(constraints.unit_interval, 3)

    def __init__(self, loc, log_scale, num_bins=256):
        self.loc, self.log_scale = torch.broadcast_tensors(loc, log_scale)  # (*batch, C, H, W)
        self.num_bins = num_bins
        super().__init__(self.loc.shape[:-3], self.loc.shape[-3:], validate_args=False)

    @property
    def mean(self):
        return _logistic_mean(self.loc, self.log_scale, self.num_bins)

    def log_prob(self, x):
        return _logistic_bin_log_prob(x, self.loc, self.log_scale, self.num_bins).sum((-3, -2, -1))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            eps = _logistic_noise(self._extended_shape(sample_shape), self.loc)
            return _to_grid(self.loc + torch.exp(self.log_scale) * eps, self.num_bins)

    def discretized(self):
        return self

    def mean_log_scale(self):
        """The average log-scale s over pixels and batch."""
        return self.log_scale.mean()


class DiscretizedLogisticMixture(Distribution):
    """Mixture of K discretised logistics per pixel (PixelCNN++, Salimans et al. 2017, sec. 2.1-2.2).

    Data: x = k/(num_bins-1) in [0, 1], num_bins bins per channel, edge bins take the tails.
    One mixture per pixel (not per channel): p(x_ij) = sum_k pi_k prod_c P_k(x_ijc | x_ij,<c);
    log_prob sums log p(x_ij) over (H, W). Shapes: logits (*batch, K, H, W); loc, log_scale
    (*batch, K, C, H, W); coeffs (*batch, K, 3, H, W), used as given (the model applies tanh), or
    None for no dependence between channels (any C). With coeffs the channel means are
        mu_R = loc_R,  mu_G = loc_G + coeffs_0 x_R,  mu_B = loc_B + coeffs_1 x_R + coeffs_2 x_G.
    PixelCNN++ writes these on [-1, 1]; on [0, 1] data they are the same family with loc shifted.
    """
    arg_constraints = {}
    support = constraints.independent(constraints.unit_interval, 3)

    def __init__(self, logits, loc, log_scale, coeffs, num_bins=256):
        if coeffs is not None and loc.shape[-3] != 3:
            raise ValueError(f"coeffs need RGB data (C = 3), got C = {loc.shape[-3]}; pass coeffs=None")
        self.logits = logits  # (*batch, K, H, W)
        self.loc = loc  # (*batch, K, C, H, W)
        self.log_scale = log_scale  # (*batch, K, C, H, W)
        self.coeffs = coeffs  # (*batch, K, 3, H, W) or None
        self.num_bins = num_bins
        super().__init__(loc.shape[:-4], loc.shape[-3:], validate_args=False)

    def _channel_means(self, x):
        """Component means given the data; x (*, C, H, W) -> (*, K, C, H, W)."""
        if self.coeffs is None:
            return self.loc
        x_r, x_g, _ = x.unsqueeze(-4).unbind(-3)  # (*, 1, H, W) each
        loc_r, loc_g, loc_b = self.loc.unbind(-3)  # (*batch, K, H, W) each
        c_0, c_1, c_2 = self.coeffs.unbind(-3)  # (*batch, K, H, W) each
        mu = torch.broadcast_tensors(loc_r, loc_g + c_0 * x_r, loc_b + c_1 * x_r + c_2 * x_g)
        return torch.stack(mu, -3)

    @property
    def mean(self):
        if self.coeffs is not None:
            raise NotImplementedError(
                "the exact mean with coeffs needs, per pixel, a sum over 256^2 (G) and 256^3 (B) colour "
                "combinations (num_bins^2 and num_bins^3); use a Monte Carlo mean of sample() instead, "
                "e.g. monte_carlo_mean(px_z)")
        pi = F.softmax(self.logits, -3).unsqueeze(-3)  # (*batch, K, 1, H, W)
        return (pi * _logistic_mean(self.loc, self.log_scale, self.num_bins)).sum(-4)

    def log_prob(self, x):
        x = _to_grid(x, self.num_bins)  # (*, C, H, W); the means condition on bin centres
        log_px_k = _logistic_bin_log_prob(x.unsqueeze(-4), self._channel_means(x), self.log_scale,
                                          self.num_bins).sum(-3)  # (*, K, H, W)
        log_px = torch.logsumexp(F.log_softmax(self.logits, -3) + log_px_k, -3)  # (*, H, W)
        return log_px.sum((-2, -1))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            pi = torch.distributions.Categorical(logits=self.logits.movedim(-3, -1))  # per pixel, over K
            one_hot = F.one_hot(pi.sample(sample_shape), self.logits.shape[-3])  # (*S, *batch, H, W, K)
            one_hot = one_hot.movedim(-1, -3).unsqueeze(-3).to(self.loc.dtype)  # (*S, *batch, K, 1, H, W)
            # the parameters are strided views of one network output: contiguous copies make this 4x faster
            loc = (self.loc.contiguous() * one_hot).sum(-4)  # (*S, *batch, C, H, W)
            log_scale = (self.log_scale.contiguous() * one_hot).sum(-4)
            y = loc + torch.exp(log_scale) * _logistic_noise(loc.shape, loc)  # before the coeffs' shift
            if self.coeffs is None:
                return _to_grid(y, self.num_bins)
            # Channel by channel, each conditioned on the earlier channels' grid values, as log_prob
            # is (PixelCNN++'s sampler conditions on the unrounded values).
            c_0, c_1, c_2 = (self.coeffs.contiguous() * one_hot).sum(-4).unbind(-3)  # (*S, *batch, H, W) each
            y_r, y_g, y_b = y.unbind(-3)  # (*S, *batch, H, W) each
            x_r = _to_grid(y_r, self.num_bins)
            x_g = _to_grid(y_g + c_0 * x_r, self.num_bins)
            x_b = _to_grid(y_b + c_1 * x_r + c_2 * x_g, self.num_bins)
            return torch.stack([x_r, x_g, x_b], -3)

    def discretized(self):
        return self

    def mean_log_scale(self):
        """The average over pixels and batch of the mixture-weighted log-scale, sum_k pi_k log s_k."""
        pi = F.softmax(self.logits, -3).unsqueeze(-3)  # (*batch, K, 1, H, W)
        return (pi * self.log_scale).sum(-4).mean()


def monte_carlo_mean(px_z, n=100):
    """Approximate mean: the average of n draws of px_z.sample() (standard error ~ std / sqrt(n))."""
    return sum(px_z.sample() for _ in range(n)) / n


# ---------------------------------------------------------------------------------------------------
# The VAE interface: one stochastic layer, or a top-down hierarchy
# ---------------------------------------------------------------------------------------------------
def observe(model, z, eval_pmf=False):
    """p(x|z); with eval_pmf, its probability of the 8-bit values (`discretized()`: the Gaussian, trained as
    a density, becomes the mass of each value's bin; the discrete models are unchanged)."""
    px_z = model.decode(z)
    return px_z.discretized() if eval_pmf else px_z


class LatentVariableModel(nn.Module):
    """The interface the objective, the estimator, the statistics and the grids ask of a VAE, whatever its number of
    stochastic layers: `encode(x)` (the part of inference that sees only x, run once per image), `log_weight_parts`,
    `reconstruct(x)`, `generate(n)` and `posterior_means(x)`. A model sets `decoder` (the networks' output -> the
    raw parameters of p(x|z)) and `observation` (raw parameters -> p(x|z)), which `decode` joins. The networks run
    under `amp_dtype` autocast when it is set (`--amp`), but for the decoder's last layer, which runs in float32 (a
    mean's precision near 1 in bf16 is about one 8-bit bin, which bits/dim counts); their outputs are cast to float32
    before any distribution sees them."""
    amp_dtype = None  # e.g. torch.bfloat16: autocast for the networks only

    def autocast(self, device_type):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def decode(self, h):
        """p(x|z) from what the decoder reads (z, or a hierarchy's final state), any leading dims: batch shape (*),
        event (C, H, W)."""
        with self.autocast(h.device.type):
            out = self.decoder(h)  # (*, P, H, W): the observation model's raw parameters
        if h.device.type == "cpu":
            # Compiled on CPU, the networks and the likelihood ran slower as one graph than as two (inductor's fused
            # likelihood kernels read the convolutions' output badly), in training and in evaluation. On a GPU
            # one graph is one CUDA-graph replay per step; a break there would add one at every caller.
            torch._dynamo.graph_break()
        return self.observation(out.float())

    def decoder_head(self):
        """The decoder's last layer, which writes the raw parameters of p(x|z) (under --amp it runs in float32)."""
        return self.decoder.net[-1]

    def encode(self, x):
        raise NotImplementedError

    def log_weight_parts(self, x, k, eval_pmf=False, encoding=None):
        """log p(x|z), log p(z), log q(z|x) for k draws z ~ q(z|x) per image: a dict of (k, B) tensors (summed over
        the stochastic layers; a model with several adds rate_layers, (k, B, L)). encoding: `encode(x)` if done."""
        raise NotImplementedError

    def reconstruct(self, x, eval_pmf=False):
        """p(x|z) with z ~ q(z|x), one draw per image."""
        raise NotImplementedError

    def generate(self, n, eval_pmf=False):
        raise NotImplementedError

    def posterior_means(self, x):
        """E_q[z|x] per stochastic layer, bottom first: a list of (B, D_i) tensors, to count active units."""
        raise NotImplementedError

    def device(self):
        return next(self.parameters()).device


class OneLayerVAE(LatentVariableModel):
    """The one-stochastic-layer VAE of chapters 1-4; a chapter sets `encoder` (x -> mu, log_sigma),
    `decoder` (z -> the raw parameters of p(x|z)), `observation` (raw parameters -> p(x|z)) and `latent_dim`."""

    def encode(self, x):
        """q(z|x) = N(mu, diag sigma^2), batch (B,), event (D,)."""
        with self.autocast(x.device.type):
            mu, log_sigma = self.encoder(x)  # (B, D) each
        return diagonal_gaussian(mu.float(), log_sigma.float())

    def log_weight_parts(self, x, k, eval_pmf=False, encoding=None):
        qz_x = self.encode(x) if encoding is None else encoding
        z = qz_x.rsample((k,))  # (k, B, D)
        px_z = observe(self, z, eval_pmf)  # batch shape (k, B); x (B, C, H, W) broadcasts, no copies over k
        return {"log_px_z": px_z.log_prob(x), "log_pz": standard_normal(z.shape[-1], x.device).log_prob(z),
                "log_qz_x": qz_x.log_prob(z)}

    def reconstruct(self, x, eval_pmf=False):
        return observe(self, self.encode(x).sample(), eval_pmf)

    def generate(self, n, eval_pmf=False):
        return observe(self, standard_normal(self.latent_dim, self.device()).sample((n,)), eval_pmf)

    def posterior_means(self, x):
        return [self.encode(x).mean]  # one layer



class HierarchicalVAE(LatentVariableModel):
    """A top-down hierarchy z_L -> ... -> z_1 -> x with bidirectional inference (chapters 5 and 6). A subclass
    sets `encoder` (x -> one bottom-up feature per block, top block first), `blocks` (top first; each has
    prior_net(h), posterior_net(h, feature), latent(prior_out, posterior_out) -> (p, q or None) and
    update(h, z) -> h), `initial_state(n)`, `decoder` (final state, any leading dims -> raw parameters of p(x|z))
    and `observation`; `decode` reads the final top-down state."""

    def encode(self, x):
        """The bottom-up pass: a list of features, one per block (top block first)."""
        with self.autocast(x.device.type):
            return self.encoder(x)

    def top_down(self, n, features=None, z_top=(), temperature=1.0):
        """The top-down pass over n rows. Each block forms p(z_i|z_>i) from the state and, given the bottom-up
        features (n rows each), q(z_i|z_>i, x); z_i is drawn from q if there is one, else from p with its standard
        deviation times `temperature` (VDVAE's), except the top len(z_top) layers, which are taken from z_top (top
        first). Returns the final state and, per layer top first, (z_i, p(z_i|z_>i), q(z_i|z_>i, x) or None)."""
        h = self.initial_state(n)
        layers = []
        for i, block in enumerate(self.blocks):
            with self.autocast(h.device.type):
                prior_out = block.prior_net(h)
                posterior_out = None if features is None else block.posterior_net(h, features[i])
            pz, qz = block.latent(prior_out.float(), None if posterior_out is None else posterior_out.float())
            if i < len(z_top):
                z = z_top[i]  # (n, D_i)
            elif qz is not None:
                z = qz.rsample()
            else:
                z = pz.rsample() if temperature == 1 else pz.mean + temperature * (pz.rsample() - pz.mean)
            with self.autocast(h.device.type):
                h = block.update(h, z)
            layers.append((z, pz, qz))
        return h, layers

    def log_weight_parts(self, x, k, eval_pmf=False, encoding=None):
        """log p(z) = sum_i log p(z_i|z_>i) and log q(z|x) = sum_i log q(z_i|z_>i, x) over k draws of z_L..z_1
        ~ q per image; rate_layers (k, B, L): log q - log p per layer, bottom layer z_1 first."""
        features = self.encode(x) if encoding is None else encoding
        features = [merge(f.expand(k, *f.shape)) for f in features]  # (k*B, ...): the k draws as rows
        h, layers = self.top_down(k * len(x), features)
        log_pz = torch.stack([pz.log_prob(z) for z, pz, _ in reversed(layers)], dim=-1)  # (k*B, L)
        log_qz_x = torch.stack([qz.log_prob(z) for z, _, qz in reversed(layers)], dim=-1)  # (k*B, L)
        px_z = observe(self, unmerge(h, k), eval_pmf)  # batch shape (k, B)
        return {"log_px_z": px_z.log_prob(x), "log_pz": unmerge(log_pz.sum(-1), k),
                "log_qz_x": unmerge(log_qz_x.sum(-1), k), "rate_layers": unmerge(log_qz_x - log_pz, k)}

    def reconstruct(self, x, eval_pmf=False):
        h, _ = self.top_down(len(x), self.encode(x))
        return observe(self, h, eval_pmf)

    def generate(self, n, eval_pmf=False, z_top=(), temperature=1.0):
        """p(x|z) with z drawn ancestrally from the prior, n of them, at `temperature` (see top_down); the top
        len(z_top) layers taken from z_top."""
        h, _ = self.top_down(n, z_top=z_top, temperature=temperature)
        return observe(self, h, eval_pmf)

    def posterior_means(self, x):
        """E_q[z_i|z_>i, x] per layer, bottom layer first, (B, D_i) each, along one posterior draw of the layers
        above (for counting active units, Burda et al. 2015, sec. 5.2)."""
        _, layers = self.top_down(len(x), self.encode(x))
        return [qz.mean for _, _, qz in reversed(layers)]


# ---------------------------------------------------------------------------------------------------
# Objective (Burda et al. 2015, eq. 6) and the test log-likelihood estimator
# ---------------------------------------------------------------------------------------------------
def log_weights(model, x, k, eval_pmf=False, encoding=None):
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x), i = 1..k (summed over the layers
    of z for a model with several).

    eval_pmf: score x with the probability of its 8-bit values (see `observe`). encoding: `model.encode(x)`,
    if already computed. Returns the parts and log_w, each a (k, B) tensor.
    """
    parts = model.log_weight_parts(x, k, eval_pmf, encoding)
    return {"log_w": parts["log_px_z"] + parts["log_pz"] - parts["log_qz_x"], **parts}


def iwae_bound(model, x, k, eval_pmf=False):
    """L_k = log (1/k) sum_i w_i (Burda et al. 2015, eq. 6); k = 1 is the ELBO.

    Returns per-example tensors (B,): the bound, and its parts averaged over the k samples,
    rate = E[log q(z|x) - log p(z)] and distortion = E[-log p(x|z)] (for k = 1, bound = -rate - distortion).
    """
    lw = log_weights(model, x, k, eval_pmf)
    bound = torch.logsumexp(lw["log_w"], dim=0) - math.log(k)
    return {"bound": bound, "rate": (lw["log_qz_x"] - lw["log_pz"]).mean(0), "distortion": -lw["log_px_z"].mean(0)}


def training_loss(model, k):
    """The function of a batch that training minimises: minus the mean IWAE bound (k = 1: the ELBO)."""
    return lambda x: -iwae_bound(model, x, k)["bound"].mean()


def _log_w_logsumexp(model, x, k, eval_pmf, encoding, log_mask):
    """log sum_i w_i over k samples, per image (B,): the estimator's unit of work (compiled as one graph).
    log_mask (k, 1): 0 for a sample that counts, -inf for padding, so that every chunk has one shape."""
    return torch.logsumexp(log_weights(model, x, k, eval_pmf, encoding)["log_w"] + log_mask, dim=0)


_frozen = {"model": None, "versions": None, "fn": None}  # the compiled evaluation and what it froze


def evaluation_fn(model, compile):
    """_log_w_logsumexp, compiled with inductor's "freezing": the weights become constants (convolution
    weights prepacked for oneDNN, about 2x on CPU). Compiled code holds the weights it saw, so it is dropped
    and rebuilt whenever the model or any of its weights has changed since (tensors count their in-place
    updates in `_version`)."""
    if not compile:
        return _log_w_logsumexp
    versions = tuple((p.data_ptr(), p._version) for p in model.parameters())
    if _frozen["model"] is None or _frozen["model"]() is not model or _frozen["versions"] != versions:
        torch._dynamo.reset()
        _frozen.update(model=weakref.ref(model), versions=versions,
                       fn=Compiled(_log_w_logsumexp, True, "evaluation", options=EVAL_COMPILE_OPTIONS))
    return _frozen["fn"]


@torch.no_grad()
def estimate_log_likelihood(model, x, num_samples=5000, max_rows=50_000, eval_pmf=False, progress=True,
                            compile=False):
    """log p(x) ~= log (1/S) sum_s p(x, z_s) / q(z_s|x) with S importance samples (Burda et al. 2015, sec. 5).

    Batched over images and chunked over samples, so that at most `max_rows` (sample, image) pairs
    go through the decoder at once (sized for the cache, not for memory); each image is
    encoded once, and the chunks are combined with log-sum-exp in float64.
    Every call of the unit of work has one shape, so one compilation serves an evaluation: a short last
    chunk of samples is padded with samples masked out, a short last batch of images with copies of its
    first image, whose estimates are dropped.
    x: (N, C, H, W) on the model's device. Returns per-image estimates (N,) in nats (float64, CPU).
    """
    model.eval()
    if len(x) == 0:  # an empty shard (more processes than images)
        return torch.empty(0, dtype=torch.float64)
    chunk = math.ceil(num_samples / math.ceil(num_samples / max_rows))  # equal chunks: padding of less than one each
    images_per_batch = min(len(x), max(1, max_rows // chunk))
    lse_fn = evaluation_fn(model, compile)
    # One preallocated result, not a list of small tensors: holding thousands of them made the compiled evaluation's
    # memory grow with every image, until a 10,000-image evaluation ran out of memory.
    out = torch.empty(len(x), dtype=torch.float64, device=x.device)  # on the device: no wait per batch of images
    sample_index = torch.arange(chunk, device=x.device).unsqueeze(1)
    bar = tqdm(total=len(x), desc=f"log p(x), S={num_samples}", unit="img", disable=not progress, leave=False,
               dynamic_ncols=True)
    for done in range(0, len(x), images_per_batch):
        xb = x[done:done + images_per_batch]
        real = len(xb)
        if real < images_per_batch:
            xb = torch.cat([xb, xb[:1].expand(images_per_batch - real, *xb.shape[1:])])
        encoding = model.encode(xb)
        lse = torch.full((images_per_batch,), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, num_samples, chunk):
            log_mask = torch.where(sample_index < num_samples - start, 0.0, -math.inf)
            lse = torch.logaddexp(lse, lse_fn(model, xb, chunk, eval_pmf, encoding, log_mask).double())
        out[done:done + real] = lse[:real] - math.log(num_samples)
        bar.update(real)
    bar.close()
    return out.cpu()


def mean_and_stderr(values):
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


def bits_per_dim(nats, num_dims):
    """-log2 p(x) / D: nats per image -> bits per dimension (positive; lower is better)."""
    return -nats / (num_dims * math.log(2))

