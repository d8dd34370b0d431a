"""Chapter 4: a mixture of discretized logistics with autoregression over R, G, B (PixelCNN++).

What changed since model03: the observation model again. One logistic per sub-pixel, independent
across channels, cannot say "this pixel is either dark blue or light grey", nor that a pixel's green
goes with its red. PixelCNN++ (Salimans et al. 2017, sec. 2.1-2.2) gives each pixel a mixture of K
components, and within a component lets the mean of G move with the value of R, and B's with R and G.
No bound on the variance: only PixelCNN++'s floor on the log-scale (LOG_SCALE_MIN).

    objective:  L_k(x) = E log (1/k) sum_i P(x | z_i) p(z_i) / q(z_i|x),
    P(x_pixel|z) = sum_j pi_j DL(r; mu_jr, s_jr) DL(g; mu_jg + a_j r, s_jg) DL(b; mu_jb + b_j r + c_j g, s_jb)
    with DL the discretized logistic of model03 and (a_j, b_j, c_j) = tanh(decoder output).

`--components K` and `--no-autoregression` take the change apart: K = 1 with autoregression, or ten components
with independent channels (coefficients fixed at 0), each against model03 --unbounded and model04.

Run:  python model04.py --data-dir DIR
      python model04.py --data-dir DIR --components 1
      python model04.py --data-dir DIR --no-autoregression
It writes runs/model04_{imgs,recs,samples,samples_var,curve}.png, model04_results.json and
model04_checkpoint.pt (model04_1component_*, model04_no_autoregression_* for the ablations). With autoregression
the grid of samples' means is a Monte Carlo mean (100 draws): the exact mean is a sum over 256^3 colours per pixel.
It prints the test bits/dim, to set beside the run's row of the README's provenance table (its standard error is
over test images; how far a retrained run lands from it is not measured).
"""
import argparse

import torch
from torch import nn

import common
import data
import experiment

# config: the argparse defaults below (python model04.py --help)
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
SKIP_GRAD_RATIO = 10.0  # and one whose norm is 10x the median norm of the last 100 steps: one such
                        # step wrecked this chapter's first 50-epoch run (README: the training guard)
NUM_COMPONENTS = 10  # mixture components per pixel (PixelCNN++ uses 5 to 10)
LOG_SCALE_MIN = -7.0  # floor on the log-scale, as PixelCNN++ (there on [-1, 1] data)


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


class MixtureObservation(nn.Module):
    """p(x|z): per pixel, a mixture of K discretized logistics over (R, G, B), with G's mean moving with R
    and B's with R and G inside each component (PixelCNN++), or channels independent (`autoregressive` False)."""

    def __init__(self, num_components=NUM_COMPONENTS, autoregressive=True, num_bins=data.NUM_BINS):
        super().__init__()
        self.num_components, self.autoregressive, self.num_bins = num_components, autoregressive, num_bins

    def num_params(self, channels):
        if channels != 3:
            raise common.UserError(f"the mixture is written for RGB (3 channels); the data have {channels}")
        per_channel = 3 if self.autoregressive else 2  # loc, log-scale (and a coefficient)
        return self.num_components * (1 + per_channel * channels)  # and a logit per component

    def forward(self, out):
        k = self.num_components
        logits = out[..., :k, :, :]  # (*, K, H, W)
        params = out[..., k:, :, :].unflatten(-3, (-1, k, 3))  # (*, 3 or 2, K, C, H, W): loc, log-scale(, coeffs)
        loc, log_scale, *coeffs = params.unbind(-5)  # (*, K, C, H, W) each
        coeffs = torch.tanh(coeffs[0]) if self.autoregressive else None
        return common.DiscretizedLogisticMixture(logits, loc, log_scale.clamp(min=LOG_SCALE_MIN), coeffs,
                                                 num_bins=self.num_bins)


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
                           skip_grad_norm=SKIP_GRAD_NORM,
                           skip_grad_ratio=SKIP_GRAD_RATIO)
    p.add_argument("--dataset", choices=["cifar10", "svhn"], default="cifar10", help="colour dataset")
    p.add_argument("--components", type=experiment.positive_int, default=NUM_COMPONENTS,
                   help="mixture components per pixel")
    p.add_argument("--autoregression", action=argparse.BooleanOptionalAction, default=True,
                   help="G's mean moves with R, B's with R and G (PixelCNN++); --no-autoregression: independent channels")
    return p


def build_model(args):
    return VAE(MixtureObservation(args.components, args.autoregression))


def run(argv):
    args = parser().parse_args(argv)
    images = data.load_colour(args.dataset, args.data_dir, download=not args.no_download)
    name = ("model04" + (f"_{args.components}component{'s' * (args.components > 1)}" if args.components != NUM_COMPONENTS else "")
            + ("" if args.autoregression else "_no_autoregression"))
    return experiment.run_experiment(args, argv, script="model04.py", name=name, data=images, eval_pmf=EVAL_PMF,
                                            build_model=lambda: build_model(args))


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
