"""Chapter 2: a Gaussian p(x|z) on colour images, with its variance bounded below by a tanh.

What changed since model01: the data are 8-bit colour images (CIFAR-10 by default), so a Bernoulli
no longer fits; the networks become convolutional. The observation model is a Gaussian per
sub-pixel whose log-variance goes through tanh, so that exp(-1) <= variance <= e (the bound of the
original vae-mdl). `--unbounded` removes the tanh: the model can then shrink the variance, and the
draws from p(x|z) show what that does.

    objective:  L_k(x) = E log (1/k) sum_i N(x; mu(z_i), diag sigma^2(z_i)) p(z_i) / q(z_i|x)   (k = 1: ELBO)
    log sigma^2 = tanh(decoder output)   (bounded)   or   decoder output   (--unbounded)

Training uses the Gaussian density, as the story does; the test log-likelihood is the probability
of the 8-bit pixel values, the Gaussian mass of each value's bin (the edge bins take the tails),
reported in bits/dim so that every colour model compares with every other.

`--dequantize` trains on (k + u - 1/2)/255, u ~ U(0, 1), instead of k/255 (uniform dequantization, Theis et
al. 2016): the Gaussian is then a density on continuous data and its bound cannot grow without limit. With
--unbounded it answers the chapter's question: is it the Gaussian, or the missing dequantization, that
breaks the unbounded model? (Its ELBO on dequantized data, minus D log 255, bounds the discrete
log-likelihood; the test number is, as for the others, the probability of the 8-bit values.)

`--beta B` is the beta-VAE (Higgins et al. 2017) the original set aside as "equivalent to lower bounding the
variance": trained on E log N(x; mu, 1) - B KL(q(z|x) || p(z)), the squared error against B times the rate. That is
B times the ELBO of a Gaussian whose variance is fixed at B, plus a constant (Rybkin et al. 2021), so p(x|z) is
that Gaussian, N(mu, B), in the grids and the test log-likelihood. Read with a unit variance, the objective bounds
no likelihood; read with variance B, it is B times a bound.

    beta-VAE:   B * L_1(x) = E -|x - mu(z)|^2 / 2 - B KL(q(z|x) || p(z)) + const,   log sigma^2 = log B fixed

Run:  python model02.py --data-dir DIR   (bounded)
      python model02.py --data-dir DIR --unbounded
      python model02.py --data-dir DIR --unbounded --dequantize
      python model02.py --data-dir DIR --beta 0.3679   (beta = e^-1, the bounded model's variance floor)
It writes runs/model02_{imgs,recs,samples,samples_var,curve}.png, model02_results.json and
model02_checkpoint.pt (model02_unbounded_* with --unbounded, ..._dequantized_* with --dequantize, model02_beta<B>_*
with --beta).
It prints the test bits/dim, to set beside the run's row of the README's provenance table (its standard error is
over test images; how far a retrained run lands from it is not measured).
"""
import math

import torch
from torch import nn

import common
import data
import experiment

# config: the argparse defaults below (python model02.py --help)
LATENT_DIM = 128  # one stochastic layer
CHANNELS = 32  # width of the convolutional stacks
EPOCHS = 50
BATCH_SIZE = 64
K = 1  # importance samples in training: the ELBO
LR = 1e-3
EVAL_SAMPLES = 100  # importance samples S for the test log-likelihood (README: why 100)
EVAL_MAX_ROWS = 100  # (sample, image) pairs per decoder pass in evaluation: sized for the cache (bench.py)
EVAL_PMF = True  # score the probability of the 8-bit values, in bits/dim
SKIP_GRAD_NORM = 1e9  # skip a step with a larger gradient norm: a last resort (README: the training guard)


def conv_stack(channels_in, width):
    """Three stride-2 convolutions: 32x32 -> 4x4."""
    return nn.Sequential(
        nn.Conv2d(channels_in, width, 4, 2, 1), nn.SiLU(),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.SiLU(),
        nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.SiLU(),
    )


def deconv_stack(width, channels_out):
    """Three stride-2 transposed convolutions 4x4 -> 32x32, then a stride-1 convolution, so that no
    2x2 block of output pixels is a projection of a single feature (the original vae-mdl's note)."""
    return nn.Sequential(
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.SiLU(),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.SiLU(),
        nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(),
        nn.Conv2d(width, channels_out, 3, 1, 1),
    )


class Encoder(nn.Module):
    def __init__(self, channels=3, width=CHANNELS, latent_dim=LATENT_DIM):
        super().__init__()
        self.net = nn.Sequential(conv_stack(channels, width), nn.Flatten(), nn.Linear(4 * width * 16, 2 * latent_dim))

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)  # mu, log_sigma: (B, D) each


class Decoder(nn.Module):
    def __init__(self, num_params, width=CHANNELS, latent_dim=LATENT_DIM):
        super().__init__()
        self.width = width
        self.fc = nn.Sequential(nn.Linear(latent_dim, 4 * width * 16), nn.SiLU())
        self.net = deconv_stack(width, num_params)

    def forward(self, z):
        out = self.net(self.fc(z).view(-1, 4 * self.width, 4, 4))  # (N, P, 32, 32), N = all of z's leading dims
        return out.reshape(*z.shape[:-1], *out.shape[1:])  # (*, P, 32, 32)


class GaussianObservation(nn.Module):
    """p(x|z): a Gaussian per sub-pixel, log-variance bounded by tanh unless `bounded` is False, or fixed at
    log `variance` (the decoder then gives the loc alone) when a variance is given."""
    def __init__(self, bounded=True, variance=None, num_bins=data.NUM_BINS):
        super().__init__()
        self.bounded, self.variance, self.num_bins = bounded, variance, num_bins

    def num_params(self, channels):
        return channels if self.variance else 2 * channels  # loc, and a (log-)spread per channel unless fixed

    def forward(self, out):
        if self.variance:
            return common.Gaussian(out, torch.full_like(out, math.log(self.variance)), num_bins=self.num_bins)
        loc, raw_log_var = out.chunk(2, dim=-3)  # (*, C, H, W) each
        return common.Gaussian(loc, common.bound_log_var(raw_log_var, self.bounded), num_bins=self.num_bins)


class VAE(common.OneLayerVAE):
    """q(z|x) = N(encoder(x)), p(z) = N(0, I), p(x|z) = observation(decoder(z)); the bound, the estimator
    and the grids come from common.OneLayerVAE."""
    def __init__(self, observation, channels=3, latent_dim=LATENT_DIM):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = Encoder(channels, latent_dim=latent_dim)
        self.decoder = Decoder(observation.num_params(channels), latent_dim=latent_dim)
        self.observation = observation


def parser():
    p = experiment.make_parser(__doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, k=K, lr=LR, schedule="constant",
                           eval_max_rows=EVAL_MAX_ROWS, eval_samples=EVAL_SAMPLES,
                           skip_grad_norm=SKIP_GRAD_NORM)
    p.add_argument("--dataset", choices=["cifar10", "svhn"], default="cifar10", help="colour dataset")
    p.add_argument("--unbounded", action="store_true", help="no tanh on the log-variance (variance unbounded)")
    p.add_argument("--dequantize", action="store_true",
                   help="train on uniformly dequantized pixels (Theis et al. 2016): a density on continuous data, "
                        "whose objective bounds the discrete log-likelihood")
    p.add_argument("--beta", type=experiment.positive_float, default=None,
                   help="train the beta-VAE with this weight on the rate and the squared error (variance fixed at "
                        "beta; see the docstring) instead of the ELBO")
    return p


def build_model(args):
    return VAE(GaussianObservation(bounded=not args.unbounded, variance=args.beta))


def beta_vae_objective(beta):
    """The beta-VAE's loss as B times minus the ELBO of N(mu, B): |x - mu|^2 / 2 + B KL, up to a constant."""
    def make_loss(model):
        return lambda x: -beta * common.iwae_bound(model, x, 1)["bound"].mean()
    return make_loss, f"beta-VAE, beta = {beta:g}: E log N(x; mu, 1) - beta KL (not a bound on log p(x))"


def run(argv):
    args = parser().parse_args(argv)
    images = data.load_colour(args.dataset, args.data_dir, download=not args.no_download)
    if args.beta is not None and (args.unbounded or args.k != 1):
        raise common.UserError("--beta fixes the variance at beta and trains on one sample (k = 1): drop "
                               "--unbounded and --k.")
    images.dequantize_train = args.dequantize
    name = ("model02" + ("_unbounded" if args.unbounded else "") + ("_dequantized" if args.dequantize else "")
            + (f"_beta{args.beta:g}" if args.beta is not None else ""))
    return experiment.run_experiment(args, argv, script="model02.py", name=name, data=images, eval_pmf=EVAL_PMF,
                                            build_model=lambda: build_model(args),
                                            objective=beta_vae_objective(args.beta) if args.beta is not None else None)


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
