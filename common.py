"""What every chapter shares: observation models, the IWAE objective, the log-likelihood estimator,
bits/dim, the training loop with checkpoints, grids, and the command-line contract.

Conventions. An encoder returns q(z|x) as a Distribution with batch shape (B,) and event shape (D,);
a decoder takes z of shape (N, D) and returns p(x|z) with batch shape (N,) and event shape (C, H, W),
so `px_z.log_prob(x)` is one number per image. Importance samples are a leading axis k, folded into
the batch axis for the networks by `merge` and unfolded by `unmerge`.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints
from tqdm import tqdm


class UserError(RuntimeError):
    """Something the user can fix (missing data, a bad flag, an unreadable checkpoint): the message
    says what and how; the scripts print it without a traceback and exit with status 2."""


# ---------------------------------------------------------------------------------------------------
# Devices, seeds, importance-sample axis
# ---------------------------------------------------------------------------------------------------
def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here. "
                        "Use --device cpu (or auto).")
    return torch.device(name)


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU: {cpu}, {threads} thread{'s' if threads != 1 else ''}"


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator


def merge(t):
    """(k, B, ...) -> (k*B, ...): the importance samples become extra rows of the batch."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unmerge(t, k):
    """(k*B, ...) -> (k, B, ...), the inverse of `merge`."""
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


# ---------------------------------------------------------------------------------------------------
# Speed plumbing: torch.compile with an eager fallback, and the device settings it pays to use
# ---------------------------------------------------------------------------------------------------
class compiled:
    """`fn` under torch.compile (static shapes), or `fn` itself if `enabled` is False. If compilation fails
    here (no C++ compiler, an unsupported platform or Python), one warning and then `fn` eagerly: the same
    numbers, only slower. `what` names the path in the warning."""
    _warned = set()

    def __init__(self, fn, enabled=True, what="", mode=None, options=None):
        self.fn, self.what, self.compiled_fn = fn, what, None
        if enabled:
            try:
                self.compiled_fn = torch.compile(fn, dynamic=False, mode=mode, options=options)
            except Exception as err:  # e.g. "Dynamo is not supported on Python 3.x"
                self._fall_back(err)

    def _fall_back(self, err):
        self.compiled_fn = None
        if self.what not in compiled._warned:
            compiled._warned.add(self.what)
            reason = " ".join(str(err).split())[:300]
            print(f"warning: torch.compile is not available for {self.what} here ({type(err).__name__}: {reason}); "
                  f"running eagerly, which gives the same numbers more slowly. Pass --no-compile to skip the "
                  f"attempt.", file=sys.stderr)

    def __call__(self, *args, **kwargs):
        if self.compiled_fn is not None:
            try:
                return self.compiled_fn(*args, **kwargs)
            except Exception as err:  # a backend that fails at the first call (missing compiler, ...)
                self._fall_back(err)
        return self.fn(*args, **kwargs)


EVAL_COMPILE_OPTIONS = {"freezing": True}  # inference only: see _evaluation_fn


def configure_device(model, device, amp, channels_last):
    """TF32 matmuls on CUDA; bf16 autocast for the networks only (`amp`); channels_last convolutions."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if amp:
        model.amp_dtype = torch.bfloat16
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x, device, channels_last=False):
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


# ---------------------------------------------------------------------------------------------------
# Latent distributions
# ---------------------------------------------------------------------------------------------------
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
    there but its float32 gradient is not (relative error 1e-4 at z = -60, 10% at z = -3000,
    torch 2.14), so below z = -LOG_NDTR_ASYMPTOTIC use the asymptotic series (Abramowitz & Stegun
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
# Objective (Burda et al. 2015, eq. 6) and the test log-likelihood estimator
# ---------------------------------------------------------------------------------------------------
def observe(model, z, eval_pmf=False):
    """p(x|z); with eval_pmf, its probability of the 8-bit values (`discretized()`: the Gaussian, trained as
    a density, becomes the mass of each value's bin; the discrete models are unchanged)."""
    px_z = model.decode(z)
    return px_z.discretized() if eval_pmf else px_z


class OneLayerVAE(nn.Module):
    """The one-stochastic-layer VAE of chapters 1-4; a chapter sets `encoder` (x -> mu, log_sigma),
    `decoder` (z -> the raw parameters of p(x|z)), `observation` (raw parameters -> p(x|z)) and `latent_dim`.

    What the objective, the estimator and the grids ask of any model (a hierarchical one answers the same):
    `encode(x)` (the part of inference that sees only x, run once per image), `log_weight_parts`,
    `reconstruct(x)` and `generate(n)`. The networks run under `amp_dtype` autocast when it is set
    (`--amp`); their outputs are cast to float32 before any distribution sees them.
    """
    amp_dtype = None  # e.g. torch.bfloat16: autocast for the networks only

    def autocast(self, device_type):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def encode(self, x):
        """q(z|x) = N(mu, diag sigma^2), batch (B,), event (D,)."""
        with self.autocast(x.device.type):
            mu, log_sigma = self.encoder(x)  # (B, D) each
        return diagonal_gaussian(mu.float(), log_sigma.float())

    def decode(self, z):
        """p(x|z) for z of shape (*, D): batch shape (*), event (C, H, W)."""
        with self.autocast(z.device.type):
            out = self.decoder(z)  # (*, P, H, W): the observation model's raw parameters
        # Compiled on CPU, the networks and the likelihood ran slower as one graph than as two (inductor's
        # fused likelihood kernels read the convolutions' output badly), in training and in evaluation.
        torch._dynamo.graph_break()
        return self.observation(out.float())

    def log_weight_parts(self, x, k, eval_pmf=False, encoding=None):
        """log p(x|z_i), log p(z_i), log q(z_i|x) for z_1..z_k ~ q(z|x): a dict of (k, B) tensors.
        encoding: `encode(x)` if already computed."""
        qz_x = self.encode(x) if encoding is None else encoding
        z = qz_x.rsample((k,))  # (k, B, D)
        px_z = observe(self, z, eval_pmf)  # batch shape (k, B); x (B, C, H, W) broadcasts, no copies over k
        return {"log_px_z": px_z.log_prob(x), "log_pz": standard_normal(z.shape[-1], x.device).log_prob(z),
                "log_qz_x": qz_x.log_prob(z)}

    def reconstruct(self, x, eval_pmf=False):
        """p(x|z) with z ~ q(z|x), one z per image."""
        return observe(self, self.encode(x).sample(), eval_pmf)

    def generate(self, n, eval_pmf=False):
        """p(x|z) with z ~ p(z), n of them."""
        return observe(self, standard_normal(self.latent_dim, self.device()).sample((n,)), eval_pmf)

    def posterior_means(self, x):
        """E_q[z|x] for each stochastic layer (here one): a list of (B, D) tensors, to count active units."""
        return [self.encode(x).mean]

    def device(self):
        return next(self.parameters()).device


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


def _log_w_logsumexp(model, x, k, eval_pmf, encoding):
    """log sum_i w_i over k samples, per image (B,): the estimator's unit of work (compiled as one graph)."""
    return torch.logsumexp(log_weights(model, x, k, eval_pmf, encoding)["log_w"], dim=0)


_frozen = {"model": None, "versions": None, "fn": None}  # the compiled evaluation and what it froze


def _evaluation_fn(model, compile):
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
                       fn=compiled(_log_w_logsumexp, True, "evaluation", options=EVAL_COMPILE_OPTIONS))
    return _frozen["fn"]


@torch.no_grad()
def estimate_log_likelihood(model, x, num_samples=5000, max_rows=50_000, eval_pmf=False, progress=True,
                            compile=False):
    """log p(x) ~= log (1/S) sum_s p(x, z_s) / q(z_s|x) with S importance samples (Burda et al. 2015, sec. 5).

    Batched over images and chunked over samples, so that at most `max_rows` (sample, image) pairs
    go through the decoder at once (sized for the cache, not for memory); each image is
    encoded once, and the chunks are combined with log-sum-exp in float64.
    x: (N, C, H, W) on the model's device. Returns per-image estimates (N,) in nats (float64, CPU).
    """
    model.eval()
    chunk = min(num_samples, max_rows)
    images_per_batch = max(1, max_rows // chunk)
    lse_fn = _evaluation_fn(model, compile)
    # One preallocated result, not a list of small tensors: holding thousands of small tensors made the compiled
    # evaluation's memory grow by about 5 MB per image (model04, 2 CPU threads: 24 GB after 5000 test images).
    out = torch.empty(len(x), dtype=torch.float64)
    done = 0
    bar = tqdm(total=len(x), desc=f"log p(x), S={num_samples}", unit="img", disable=not progress, leave=False,
               dynamic_ncols=True)
    for xb in x.split(images_per_batch):
        encoding = model.encode(xb)
        lse = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, num_samples, chunk):
            lse = torch.logaddexp(lse, lse_fn(model, xb, min(chunk, num_samples - start), eval_pmf, encoding).double())
        out[done:done + len(xb)] = lse - math.log(num_samples)
        done += len(xb)
        bar.update(len(xb))
    bar.close()
    return out


def mean_and_stderr(values):
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else float("nan")


def bits_per_dim(nats, num_dims):
    """-log2 p(x) / D: nats per image -> bits per dimension (positive; lower is better)."""
    return -nats / (num_dims * math.log(2))


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------
IWAE_STAGES = 8  # Burda et al. 2015, sec. 5: stage i = 0..7 lasts 3^i epochs at lr 1e-3 * 10^(-i/7)
IWAE_STAGE_ENDS = [sum(3 ** j for j in range(i + 1)) for i in range(IWAE_STAGES)]  # in epochs: 1, 4, 13, ...
IWAE_EPOCHS = IWAE_STAGE_ENDS[-1]  # 3280


def iwae_lr(step, total_steps, base_lr=1e-3):
    """The paper's schedule, compressed into `total_steps`: the fraction of training done decides the stage."""
    position = IWAE_EPOCHS * step / max(total_steps, 1)
    stage = next((i for i, end in enumerate(IWAE_STAGE_ENDS) if position < end), IWAE_STAGES - 1)
    return base_lr * 10 ** (-stage / 7)


def constant_lr(step, total_steps, base_lr=1e-3):
    return base_lr


HOLD_FRACTION = 0.5  # hold-decay: base_lr for the first half of the steps ...
FINAL_LR_FACTOR = 0.1  # ... then a geometric decay to base_lr / 10 at the last step


def hold_decay_lr(step, total_steps, base_lr=1e-3):
    """base_lr for the first half of training, then geometric decay to base_lr/10: the same shape at any
    --epochs, so that a short run does not spend most of its steps at the final rate (as the paper's schedule,
    compressed, does: two thirds of its steps are at 1e-4)."""
    f = step / max(total_steps, 1)
    if f < HOLD_FRACTION:
        return base_lr
    return base_lr * FINAL_LR_FACTOR ** ((f - HOLD_FRACTION) / (1 - HOLD_FRACTION))


SCHEDULES = {"iwae": iwae_lr, "constant": constant_lr, "hold-decay": hold_decay_lr}


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0  # completed epochs
    perm: torch.Tensor = None  # this epoch's order of the training set
    pos: int = 0  # position in perm
    train_seconds: float = 0.0
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # (step, epoch, mean training bound over the interval)
    test_curve: list = field(default_factory=list)  # after each epoch: (epoch, step, test ELBO, rate, distortion)
    segments: list = field(default_factory=list)  # one dict per sitting: start, end, steps, seconds, hardware
    stopped_by_guard: dict = None  # set when the divergence guard ended training: step, epoch, reason
    recent_grad_norms: list = field(default_factory=list)  # of the last GRAD_NORM_WINDOW steps taken
    skips: list = field(default_factory=list)  # the first MAX_SKIPS_LISTED skipped steps: step, loss, norm, threshold


def save_checkpoint(path, model, optimizer, state, config):
    """Written to a temporary file, then renamed: an interrupted write never leaves a broken checkpoint."""
    blob = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "state": state.__dict__, "config": config, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    if not os.path.exists(path):
        raise UserError(f"No checkpoint at {path}. Train first (without --resume), or pass --checkpoint with "
                        f"the path of a checkpoint this script wrote.")
    try:
        blob = torch.load(path, map_location=device, weights_only=False)
        missing = {"model", "optimizer", "state", "config", "rng_cpu", "rng_cuda"} - set(blob)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        blob["state"] = TrainState(**blob["state"])
    except Exception as err:
        raise UserError(f"Cannot read the checkpoint {path} ({type(err).__name__}: {err}). It is damaged or was "
                        f"not written by this project; delete it and train again, or point --checkpoint "
                        f"at another file.") from None
    return blob


def restore(blob, model, optimizer=None, rng=True):
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as err:
        raise UserError(f"The checkpoint does not fit this model ({str(err).splitlines()[0]}). Was it written "
                        f"by another script or with other model flags? Config in the checkpoint: "
                        f"{blob['config']}") from None
    if optimizer is not None and blob["optimizer"] is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if rng:
        torch.set_rng_state(blob["rng_cpu"].cpu())
        if blob["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in blob["rng_cuda"]])


# ---------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------
COLOUR_SKIP_GRAD_NORM = 1e9  # a last resort: gradient norms up to 2e8 were seen in the first steps of --unbounded model03
# The mixture's first 50-epoch run (model04, seed 0) took a step whose gradient norm was 162 times the median of the
# 100 steps taken before it (step 1565; from step 101 to 1564 the largest ratio was 2.8), and Adam's update from it
# sent the encoder's log-sigma up to 20 three steps later; from step 1568 on every step was skipped. A relative guard
# (--skip-grad-ratio) skips such a step.
MIXTURE_SKIP_GRAD_RATIO = 10.0
GRAD_NORM_WINDOW = 100  # --skip-grad-ratio compares a step's gradient norm with the median of this many steps taken
MAX_SKIPS_LISTED = 1000  # skipped steps listed one by one in the results (all are counted)


class Diverged(UserError):
    pass


def _stop_on_sigterm():
    """SIGTERM (a scheduler's wall-time kill, `kill PID`; background jobs ignore Ctrl-C's SIGINT) stops
    training as Ctrl-C does: checkpoint, then exit. Returns the previous handler (None off the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def make_optimizer(model, lr, eps=1e-8):
    """Adam with its fused kernel (CPU and CUDA): one pass over all parameters; on model01's small step it
    took a third of the time of the foreach version."""
    return torch.optim.Adam(model.parameters(), lr=lr, eps=eps, fused=True)


def training_loss(model, k):
    """The function of a batch that training minimises: minus the mean IWAE bound (k = 1: the ELBO)."""
    return lambda x: -iwae_bound(model, x, k)["bound"].mean()


def train_step(model, optimizer, loss_fn, x, skip_grad_norm=math.inf):
    """One Adam step on loss_fn(x), unless the loss or the gradient norm is not finite or the norm exceeds
    skip_grad_norm. Returns the loss, the gradient norm and whether the step was taken."""
    loss = loss_fn(x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    stepped = bool(torch.isfinite(loss) and torch.isfinite(grad_norm) and grad_norm <= skip_grad_norm)
    if stepped:
        optimizer.step()
    return loss, grad_norm, stepped


def train(model, optimizer, data, *, batch_size, epochs, loss, lr_at, base_lr, state, ckpt_path, config,
          max_steps=None, skip_grad_norm=math.inf, skip_grad_ratio=math.inf, max_skips_in_a_row=100, checkpoint_minutes=10.0,
          time_limit_minutes=None, epoch_end=None, compile=False, compile_mode=None, channels_last=False,
          hardware="", command="", log_every=100, progress=True):
    """Maximise the IWAE bound with Adam, batch by batch, until `epochs` epochs or `max_steps` steps, or
    until `time_limit_minutes` of this sitting have passed (then the checkpoint is written and the caller
    sees state.step short of the end).

    The training set stays one tensor on the model's device (no DataLoader). A step whose loss or
    gradient norm is not finite, or whose gradient norm exceeds `skip_grad_norm`, or `skip_grad_ratio` times
    the median norm of the last GRAD_NORM_WINDOW steps taken (once there are that many), is skipped, counted
    and listed in state.skips; `max_skips_in_a_row` skips in a row stop the run. Checkpoints: every `checkpoint_minutes`, at the
    end, at the time limit and on Ctrl-C; `state` resumes exactly (the epoch's order, the position in it,
    the RNG). `epoch_end(model)`, if given, runs after every epoch and its tuple goes into state.test_curve.
    Each sitting is recorded in state.segments, with `command`, the command line that ran it.
    """
    device = next(model.parameters()).device
    train_x = data.train.to(device)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    last_step = total_steps if max_steps is None else min(total_steps, max_steps)
    if state.step >= last_step:  # a finished run resumed (to evaluate it again): no new training segment
        return state
    skips_in_a_row, running, last_save = 0, [], time.time()
    loss_fn = compiled(loss, compile, "training", compile_mode)
    segment = {"start": _now(), "end": None, "first_step": state.step, "last_step": state.step,
               "seconds": 0.0, "hardware": hardware, "command": command}
    state.segments.append(segment)
    bar = tqdm(total=last_step, initial=min(state.step, last_step), desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    model.train()
    t_start = time.time()
    t0 = t_start - state.train_seconds
    deadline = math.inf if time_limit_minutes is None else t_start + 60 * time_limit_minutes

    def checkpoint():
        now = time.time()
        state.train_seconds = now - t0
        segment.update(end=_now(), last_step=state.step, seconds=round(now - t_start, 1))
        save_checkpoint(ckpt_path, model, optimizer, state, config)

    previous_sigterm = _stop_on_sigterm()
    state.stopped_by_guard = None
    try:
        while state.step < last_step and time.time() < deadline:
            if state.perm is None:
                state.perm, state.pos = torch.randperm(n), 0
            idx = state.perm[state.pos:state.pos + batch_size].to(device)
            x = to_device(data.train_batch(train_x[idx]), device, channels_last)
            lr = lr_at(state.step, total_steps, base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            threshold = skip_grad_norm
            if math.isfinite(skip_grad_ratio) and len(state.recent_grad_norms) >= GRAD_NORM_WINDOW:
                threshold = min(threshold, skip_grad_ratio * statistics.median(state.recent_grad_norms))
            loss, grad_norm, stepped = train_step(model, optimizer, loss_fn, x, threshold)
            if stepped:
                skips_in_a_row = 0
                running.append(-loss.item())
                state.recent_grad_norms = state.recent_grad_norms[1 - GRAD_NORM_WINDOW:] + [grad_norm.item()]
            else:
                state.skipped_steps += 1
                skips_in_a_row += 1
                if len(state.skips) < MAX_SKIPS_LISTED:
                    state.skips.append({"step": state.step + 1, "loss": _finite_or_none(loss.item()),
                                        "grad_norm": _finite_or_none(grad_norm.item()),
                                        "threshold": _finite_or_none(threshold)})
                if skips_in_a_row >= max_skips_in_a_row:
                    # the skipped steps left the weights as the last step taken made them: keep those, as a result
                    state.stopped_by_guard = {
                        "step": state.step + 1, "epoch": state.epoch, "skipped_in_a_row": skips_in_a_row,
                        "reason": f"{skips_in_a_row} steps in a row had a non-finite loss or a gradient norm "
                                  f"above {threshold:g} (last loss {loss.item():.4g}, gradient norm "
                                  f"{grad_norm.item():.4g})"}
            state.step += 1
            state.pos += batch_size
            if state.pos >= n:
                state.epoch, state.perm = state.epoch + 1, None
                if epoch_end is not None:
                    state.test_curve.append((state.epoch, state.step, *epoch_end(model)))
                    model.train()
            if running and (state.step % log_every == 0 or state.step == last_step):
                state.history.append((state.step, state.epoch, sum(running) / len(running)))
                postfix = {"bound": f"{state.history[-1][2]:.2f}", "lr": f"{lr:.1e}", "epoch": state.epoch,
                           "skipped": state.skipped_steps}
                if state.test_curve:
                    postfix["test_elbo"] = f"{state.test_curve[-1][2]:.2f}"
                bar.set_postfix(postfix)
                running = []
            bar.update(1)
            if state.stopped_by_guard is not None:
                break
            if time.time() - last_save > 60 * checkpoint_minutes:
                checkpoint()
                last_save = time.time()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise UserError(f"Interrupted at step {state.step}; saved {ckpt_path}. Continue with the same command "
                        f"and --resume.") from None
    finally:
        _restore_sigterm(previous_sigterm)
    bar.close()
    checkpoint()
    return state


# ---------------------------------------------------------------------------------------------------
# Grids and plots
# ---------------------------------------------------------------------------------------------------
def observation_mean(px_z, mc_draws=100):
    """E[x|z], exact where the distribution has it, else the mean of `mc_draws` draws (said in the results)."""
    try:
        return px_z.mean, "exact"
    except NotImplementedError:
        return monte_carlo_mean(px_z, mc_draws), f"monte carlo, {mc_draws} draws"


@torch.no_grad()
def save_grids(model, x, out_dir, name, eval_pmf, nrow=8):
    """<name>_imgs.png: x; _recs.png: E[x|z], z ~ q(z|x); _samples.png: E[x|z], z ~ p(z);
    _samples_var.png: x ~ p(x|z) for the same z. Returns how the means were computed."""
    from torchvision.utils import save_image
    model.eval()
    recs, how = observation_mean(model.reconstruct(x, eval_pmf))
    px_z = model.generate(len(x), eval_pmf)
    samples, _ = observation_mean(px_z)
    for suffix, images in [("imgs", x), ("recs", recs), ("samples", samples), ("samples_var", px_z.sample())]:
        save_image(images.clamp(0, 1).cpu(), os.path.join(out_dir, f"{name}_{suffix}.png"), nrow=nrow, padding=1)
    return how


@torch.no_grad()
def save_layer_grid(model, out_dir, name, eval_pmf, rows=6, draws=3):
    """<name>_layers.png, for a model with several stochastic layers (its `top_down` and `generate(z_top=...)`,
    as model05's): what each layer encodes. Row r is one ancestral draw z_L..z_1 from the prior; its first
    column is E[x|z] for it, then, for j = 1 .. L-1, `draws` columns that keep z_L..z_j+1 of the row and
    redraw z_j..z_1 from the prior (VDVAE shows its layers so). Returns how the means were computed."""
    from torchvision.utils import save_image
    model.eval()
    _, layers = model.top_down(rows)
    z_row = [z for z, _, _ in layers]  # top first, (rows, D_i) each
    px_z = model.generate(rows, eval_pmf, z_top=z_row)
    first, how = observation_mean(px_z)
    columns = [first.unsqueeze(1)]  # (rows, 1, C, H, W)
    num_layers = len(z_row)
    for j in range(1, num_layers):
        kept = [z.repeat_interleave(draws, dim=0) for z in z_row[:num_layers - j]]  # (rows * draws, D_i)
        means, _ = observation_mean(model.generate(rows * draws, eval_pmf, z_top=kept))
        columns.append(means.unflatten(0, (rows, draws)))  # (rows, draws, C, H, W)
    grid = torch.cat(columns, dim=1)  # (rows, 1 + (L-1) draws, C, H, W)
    save_image(grid.flatten(0, 1).clamp(0, 1).cpu(), os.path.join(out_dir, f"{name}_layers.png"),
               nrow=grid.shape[1], padding=1)
    return how


def plot_history(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if history:
        steps, _, bounds = zip(*history)
        ax.plot(steps, bounds, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training bound (nats / image)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_top(curves, jump=2.0):
    """The top of the y-axis for curves of bits/dim (lower is better): the highest point that is not `jump` or
    more above its own curve's median, plus a margin. One epoch far off (one of model05 --obs mixture's) would
    otherwise flatten every curve into a line."""
    kept = [b for bpd in curves for b in bpd if b < statistics.median(bpd) + jump]
    return max(kept) + 0.05 * max(max(kept) - min(kept), 0.1)


def plot_colour_curves(results_paths, path):
    """One figure with every colour run's per-epoch test ELBO (bits/dim on the fixed test subset). Returns
    the number of curves drawn (none: no figure)."""
    runs = []
    for p in sorted(results_paths):
        with open(p) as f:
            r = json.load(f)
        if r.get("test_curve") and "elbo_bpd" in r["test_curve"][0]:
            runs.append(r)
    if not runs:
        return 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = [([row["epoch"] for row in r["test_curve"]], [row["elbo_bpd"] for row in r["test_curve"]]) for r in runs]
    top = curve_top([bpd for _, bpd in curves])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r, (epochs, bpd) in zip(runs, curves):
        line, = ax.plot(epochs, [min(value, top) for value in bpd], marker=".", lw=1, label=r["model"])
        for epoch, value in zip(epochs, bpd):
            if value > top:  # off the scale: drawn at the top edge, with its value
                ax.plot([epoch], [top], marker="^", color=line.get_color())
                ax.annotate(f"{value:.1f} (off the scale)", (epoch, top), xytext=(4, -12),
                            textcoords="offset points", fontsize=7, color=line.get_color(),
                            bbox=dict(facecolor="white", edgecolor="none", alpha=0.9))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test ELBO, bits/dim (first {runs[0].get('test_curve_images')} test images)")
    ax.set_title(f"colour models on {runs[0]['dataset']} (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no curve hides behind it
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(runs)


# ---------------------------------------------------------------------------------------------------
# The command-line contract and the experiment every script runs
# ---------------------------------------------------------------------------------------------------
def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def make_parser(doc, *, epochs, batch_size, k, lr, schedule, eval_max_rows, eval_samples=5000,
                skip_grad_norm=math.inf, skip_grad_ratio=math.inf):
    """The flags every modelNN.py keeps; the script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where the dataset is, or is downloaded to")
    p.add_argument("--out-dir", default="assets", help="grids, results JSON, training curve and checkpoint go here")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epochs (the schedule is spread over them)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); the schedule still spans --epochs")
    p.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                   help="stop training cleanly after this many minutes of this sitting, write the checkpoint and "
                        "print the command that resumes it (for wall-time limits)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per optimizer step")
    p.add_argument("--k", type=positive_int, default=k, help="importance samples in the training bound (1 = ELBO)")
    p.add_argument("--lr", type=float, default=lr, help="base learning rate of Adam")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=schedule,
                   help="learning-rate schedule: constant; hold-decay (the base rate for the first half, then a "
                        "geometric decay to a tenth); iwae (Burda et al.'s 8 stages, compressed into --epochs)")
    p.add_argument("--eval-samples", type=positive_int, default=eval_samples,
                   help="importance samples S for the test log-likelihood")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--eval-max-rows", type=positive_int, default=eval_max_rows,
                   help="(sample, image) pairs per decoder pass in evaluation (sized for the cache; see bench.py)")
    p.add_argument("--s-sweep", type=positive_int, nargs="+", default=None, metavar="S",
                   help="also estimate log p(x) with each of these numbers of importance samples on the first "
                        "--s-sweep-images test images (how the estimate moves with S)")
    p.add_argument("--s-sweep-images", type=positive_int, default=1000, help="test images for --s-sweep")
    p.add_argument("--curve-images", type=int, default=1000,
                   help="after every epoch, the test ELBO (k=1) on the first N test images goes into the results "
                        "(0 = off)")
    p.add_argument("--skip-grad-norm", type=float, default=skip_grad_norm,
                   help="skip (and count) a step whose gradient norm exceeds this, as well as any non-finite step")
    p.add_argument("--skip-grad-ratio", type=positive_float, default=skip_grad_ratio,
                   help=f"also skip a step whose gradient norm exceeds this many times the median of the last "
                        f"{GRAD_NORM_WINDOW} steps taken (inf = off): one outlier step can wreck Adam's weights")
    p.add_argument("--max-skips", type=positive_int, default=100, help="stop the run after this many skipped steps in a row")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default: one per physical core)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the training step and the evaluation's log-weights (same numbers, faster; "
                        "falls back to eager with a warning where compilation is unavailable)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks only; likelihoods and log-weights stay float32 "
                        "(default: on for CUDA, off for CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the convolutions (default: on for CUDA, off for CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out-dir (or --checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint")
    p.add_argument("--eval-only", action="store_true", help="no training: evaluate --checkpoint and write grids and results")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (default: <out-dir>/<model>_checkpoint.pt)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="minutes between checkpoints during training")
    p.add_argument("--no-download", action="store_true", help="never try to download the dataset")
    return p


# flags that may change between a run and its --resume without changing the run
RESUMABLE_CHANGES = {"max_skips", "skip_grad_norm", "skip_grad_ratio", "data_dir", "out_dir", "max_steps", "eval_samples", "eval_limit",
                     "eval_max_rows", "device", "threads", "resume", "overwrite", "eval_only", "checkpoint",
                     "checkpoint_minutes", "no_download", "time_limit", "compile", "amp", "channels_last",
                     "s_sweep", "s_sweep_images"}


@torch.no_grad()
def heldout_elbo(model, x, eval_pmf, batch_size=500):
    """Mean ELBO (k = 1) over x, and its rate and distortion, in nats per image: the per-epoch curve."""
    model.eval()
    parts = [iwae_bound(model, xb, 1, eval_pmf) for xb in x.split(batch_size)]
    return tuple(torch.cat([p[key] for p in parts]).mean().item() for key in ("bound", "rate", "distortion"))


ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2015, sec. 5.2: unit u is active if Cov_x(E_q[z_u|x]) > 0.01


@torch.no_grad()
def balance_stats(model, x, eval_pmf, batch_size=500):
    """What the story's explanation is about, on x (nats per image): the ELBO (k = 1) split into the rate
    KL(q(z|x) || p(z)) (one sample, in all and per stochastic layer, bottom first; per layer also the median
    and the largest over images) and the distortion -E log p(x|z); the mean log-scale (log-std for a Gaussian)
    that p(x|z) predicts for z ~ q(z|x); and the active units per layer (ACTIVE_UNIT_THRESHOLD)."""
    model.eval()
    rate, rate_layers, distortion, spread, means = [], [], [], [], []
    for xb in x.split(batch_size):
        parts = model.log_weight_parts(xb, 1, eval_pmf)
        rate.append((parts["log_qz_x"] - parts["log_pz"])[0])  # (B,)
        rate_layers.append(parts.get("rate_layers", rate[-1][None, :, None])[0])  # (B, L)
        distortion.append(-parts["log_px_z"][0])
        px_z = model.reconstruct(xb, eval_pmf)
        spread.append(px_z.mean_log_scale().item() * len(xb) if hasattr(px_z, "mean_log_scale") else None)
        means.append(model.posterior_means(xb))
    rate, distortion = torch.cat(rate).double(), torch.cat(distortion).double()
    rate_layers = torch.cat(rate_layers).double()  # (N, L)
    layer_means = [torch.cat(layer).flatten(1) for layer in zip(*means)]  # per layer: (N, D_i)
    return {"elbo_nats": -(rate + distortion).mean().item(), "rate_nats": rate.mean().item(),
            "distortion_nats": distortion.mean().item(),
            "rate_per_layer_nats": rate_layers.mean(0).tolist(),
            # a mean of one-sample rates can be ruled by one rare draw (model05's mixture); these show it
            "rate_per_layer_median_nats": rate_layers.median(0).values.tolist(),
            "rate_per_layer_max_nats": rate_layers.max(0).values.tolist(),
            "mean_log_scale": None if None in spread else sum(spread) / len(x),  # None: p(x|z) has no scale
            "active_units": [int((m.var(0) > ACTIVE_UNIT_THRESHOLD).sum()) for m in layer_means],
            "latent_units": [m.shape[1] for m in layer_means], "images": len(x)}


IMAGE_STATS_IMAGES = 1000  # image_stats: at most this many of the evaluated test images, as many prior draws


def roughness(x):
    """How speckled each image of x (N, C, H, W) in [0, 1] is: the mean absolute difference between
    neighbouring pixels (right and below), in 8-bit levels (0 .. 255). (N,)"""
    across = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1)
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
    return torch.cat([across, down], 1).mean(1) * 255


@torch.no_grad()
def image_stats(model, x, eval_pmf, batch_size=100):
    """Whether the images p(x|z) gives look like the data, in one number each: the roughness (mean and standard
    error over images) of the test images x, of the reconstructions' means (z ~ q(z|x)), of the samples' means
    (z ~ p(z), as many as x) and of draws from p(x|z) for the same z, all clamped to [0, 1] as the grids are."""
    model.eval()
    found = {"data": [], "reconstruction_means": [], "sample_means": [], "draws": []}
    for xb in x.split(batch_size):
        px_z = model.generate(len(xb), eval_pmf)
        recs, _ = observation_mean(model.reconstruct(xb, eval_pmf))
        means, _ = observation_mean(px_z)
        for key, images in [("data", xb), ("reconstruction_means", recs), ("sample_means", means),
                            ("draws", px_z.sample())]:
            found[key].append(roughness(images.float().clamp(0, 1)))
    stats = {key: mean_and_stderr(torch.cat(values)) for key, values in found.items()}
    return {"roughness_levels": {key: mean for key, (mean, _) in stats.items()},
            "roughness_stderr": {key: stderr for key, (_, stderr) in stats.items()}, "images": len(x)}


def _finite_or_none(value):
    """JSON has no infinity or NaN: such a number (an unset threshold, a non-finite loss) is written as null."""
    return value if value is None or math.isfinite(value) else None


def resume_command(script, argv):
    argv = [a for a in argv if a != "--overwrite"]
    return "python " + " ".join([script, *argv, *([] if "--resume" in argv else ["--resume"])])


def run_experiment(args, argv, *, name, script, build_model, data, eval_pmf, report_bpd, adam_eps=1e-8,
                   extra_grids=None, objective=None):
    """Seed, build the model, train (or resume, or only load), evaluate log p(x) on the test set, write grids
    (and `extra_grids(model, out_dir, name, eval_pmf)`, if given) and results. `objective`: (the function of a
    model that returns its training loss of a batch, a line that names it for the results); default minus the IWAE
    bound with --k samples. Returns the results dict, or None when --time-limit stopped training before its end."""
    if args.resume and args.eval_only:
        raise UserError("--resume and --eval-only do not go together: --resume continues training, --eval-only "
                        "evaluates a finished checkpoint. Pass one of them.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    seed_everything(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, f"{name}_checkpoint.pt")
    config = {"model": name, "dataset": data.name, **vars(args)}
    model = configure_device(build_model().to(device), device, amp, channels_last)
    optimizer = make_optimizer(model, args.lr, adam_eps)

    if args.eval_only or args.resume:
        blob = load_checkpoint(ckpt_path, device)
        if blob["config"].get("model") != name:
            raise UserError(f"{ckpt_path} was written by {blob['config'].get('model')}, not {name}.")
        state = blob["state"]
        if args.resume:
            changed = {key: (blob["config"].get(key), value) for key, value in config.items()
                       if key not in RESUMABLE_CHANGES and blob["config"].get(key) != value}
            if changed:
                raise UserError("--resume needs the flags of the run it continues; these differ (checkpoint, now): "
                                + ", ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in changed.items())
                                + ". Pass the same values, or start afresh with --overwrite.")
        restore(blob, model, None if args.eval_only else optimizer, rng=args.resume)
        train_config = blob["config"]
    else:
        if os.path.exists(ckpt_path) and not args.overwrite:
            raise UserError(f"{ckpt_path} holds the checkpoint of an earlier run. Pass --resume to continue it, "
                            f"--overwrite to start afresh (it is replaced), or another --out-dir.")
        state, train_config = TrainState(), config
    make_loss, objective_name = objective or (lambda m: training_loss(m, args.k), f"IWAE bound, k = {args.k}")
    steps_per_epoch = math.ceil(len(data.train) / train_config["batch_size"])
    planned_steps = train_config["epochs"] * steps_per_epoch
    x_test = data.test[:args.eval_limit] if args.eval_limit else data.test
    x_test = to_device(data.test_batch(x_test), device, channels_last)
    hardware = hardware_name(device)
    command = "python " + " ".join([script, *argv])

    if not args.eval_only:
        curve_x = to_device(data.test_batch(data.test[:args.curve_images]), device, channels_last)
        epoch_end = (lambda m: heldout_elbo(m, curve_x, eval_pmf)) if args.curve_images > 0 else None
        state = train(model, optimizer, data, batch_size=args.batch_size, epochs=args.epochs, loss=make_loss(model),
                      lr_at=SCHEDULES[args.schedule], base_lr=args.lr, state=state, ckpt_path=ckpt_path,
                      config=config, max_steps=args.max_steps, skip_grad_norm=args.skip_grad_norm,
                      skip_grad_ratio=args.skip_grad_ratio,
                      max_skips_in_a_row=args.max_skips, checkpoint_minutes=args.checkpoint_minutes,
                      time_limit_minutes=args.time_limit, epoch_end=epoch_end, compile=args.compile,
                      compile_mode="reduce-overhead" if device.type == "cuda" else None,
                      channels_last=channels_last, hardware=hardware, command=command)
        if state.stopped_by_guard is None and state.step < min(planned_steps, args.max_steps or planned_steps):
            print(f"{name}: stopped at the time limit after step {state.step} of {planned_steps} (epoch "
                  f"{state.epoch}); saved {ckpt_path}. Resume with:\n  {resume_command(script, argv)}")
            return None

    t0 = time.time()
    llh = estimate_log_likelihood(model, x_test, args.eval_samples, args.eval_max_rows, eval_pmf,
                                  compile=args.compile)
    eval_seconds = time.time() - t0
    llh_nats, llh_stderr = mean_and_stderr(llh)
    balance = balance_stats(model, x_test, eval_pmf)
    s_sweep = []
    for s in args.s_sweep or []:
        sweep_x = to_device(data.test_batch(data.test[:args.s_sweep_images]), device, channels_last)
        t_s = time.time()
        nats, stderr = mean_and_stderr(estimate_log_likelihood(model, sweep_x, s, args.eval_max_rows, eval_pmf,
                                                               compile=args.compile))
        s_sweep.append({"S": s, "images": len(sweep_x), "llh_nats": nats, "stderr": stderr,
                        "seconds": round(time.time() - t_s, 1)})
    mean_how = save_grids(model, x_test[:64], args.out_dir, name, eval_pmf)
    if extra_grids is not None:
        extra_grids(model, args.out_dir, name, eval_pmf)
    texture = image_stats(model, x_test[:IMAGE_STATS_IMAGES], eval_pmf)
    plot_history(state.history, os.path.join(args.out_dir, f"{name}_curve.png"), f"{name} on {data.name}")

    results = {
        "model": name, "dataset": data.name, "parameters": sum(p.numel() for p in model.parameters()),
        "test_llh_nats": llh_nats, "test_llh_stderr": llh_stderr,
        "eval_samples": args.eval_samples, "eval_images": len(x_test), "eval_seconds": round(eval_seconds, 1),
        "eval_hardware": hardware, "eval_compiled": args.compile,
        "k": train_config["k"], "objective": objective_name, "epochs": train_config["epochs"], "epochs_completed": state.epoch,
        "steps": state.step, "planned_steps": planned_steps, "shortened": state.step < planned_steps,
        "batch_size": train_config["batch_size"], "lr": train_config["lr"], "schedule": train_config["schedule"],
        "seed": train_config["seed"], "skipped_steps": state.skipped_steps, "skips": state.skips,
        "skip_grad_norm": _finite_or_none(train_config.get("skip_grad_norm")),
        "skip_grad_ratio": _finite_or_none(train_config.get("skip_grad_ratio")),
        "train_seconds": round(state.train_seconds, 1), "train_device": train_config["device"],
        "train_segments": state.segments, "test_curve_images": train_config.get("curve_images", 0),
        "test_curve": [dict(zip(("epoch", "step", "elbo_nats", "rate_nats", "distortion_nats"), row))
                       for row in state.test_curve],
        "test_balance": balance, "image_stats": texture, "s_sweep": s_sweep,
        "device": str(device), "hardware": hardware, "torch_version": torch.__version__,
        "command": command, "eval_only": args.eval_only,
        "samples_mean": mean_how, "finished": _now(),
    }
    if state.stopped_by_guard is not None:
        results["stopped_by_guard"] = state.stopped_by_guard
    if report_bpd:
        num_dims = x_test[0].numel()
        results["test_bpd"] = bits_per_dim(llh_nats, num_dims)
        results["test_bpd_stderr"] = llh_stderr / (num_dims * math.log(2))
        for row in results["test_curve"] + results["s_sweep"]:
            nats = row["elbo_nats"] if "elbo_nats" in row else row["llh_nats"]
            row["elbo_bpd" if "elbo_nats" in row else "bpd"] = bits_per_dim(nats, num_dims)
    path = os.path.join(args.out_dir, f"{name}_results.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(f"{path}.tmp", path)
    if report_bpd:
        plot_colour_curves([os.path.join(args.out_dir, f) for f in os.listdir(args.out_dir)
                            if f.endswith("_results.json")], os.path.join(args.out_dir, "colour_curves.png"))
    summary = (f"{name}: test log p(x) = {llh_nats:.2f} +- {llh_stderr:.2f} nats"
               + (f" = {results['test_bpd']:.3f} bits/dim" if report_bpd else "")
               + f" (S={args.eval_samples}, {len(x_test)} test images); wrote {path}")
    print(summary)
    if state.stopped_by_guard is not None and not args.eval_only:
        guard = state.stopped_by_guard
        raise Diverged(f"Training diverged: {guard['reason']} at step {guard['step']} (epoch {guard['epoch']}). "
                       f"The weights of the last step taken were evaluated and written as the result above "
                       f"(stopped_by_guard in {path}); the checkpoint {ckpt_path} holds them. Lower --lr to "
                       f"train further.")
    return results


def cli(run, argv):
    """Run `run(argv)`; a UserError becomes a one-paragraph message on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
