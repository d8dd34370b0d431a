"""Chapter 3: a discretized logistic p(x|z): a probability for each of the 256 pixel values.

What changed since model02: the observation model. The Gaussian was trained as a density on data that
take only 256 values, and only scored as a probability afterwards. Here p(x|z) is a distribution over
the 256 values themselves: a logistic per sub-pixel, binned (bin k covers k/255 +- 1/510, the edge
bins take the tails; PixelCNN++, Salimans et al. 2017), so the training objective and the test
log-likelihood are the same quantity. The same bound as model02 is kept on the variance of the
logistic (s^2 pi^2 / 3 in [exp(-1), e]); `--unbounded` removes it.

    objective:  L_k(x) = E log (1/k) sum_i P(x | z_i) p(z_i) / q(z_i|x),
                P(x|z) = prod_subpixels [sigmoid((x + 1/510 - mu) / s) - sigmoid((x - 1/510 - mu) / s)]
    log s = (tanh(decoder output) - log(pi^2 / 3)) / 2   (bounded)   or   decoder output   (--unbounded)

Run:  python model03.py --data-dir DIR   (bounded)
      python model03.py --data-dir DIR --unbounded
It writes runs/model03_{imgs,recs,samples,samples_var,curve}.png, model03_results.json and
model03_checkpoint.pt (model03_unbounded_* with --unbounded).
It prints the test bits/dim, to set beside the run's row of the README's provenance table (its standard error is
over test images; how far a retrained run lands from it is not measured).
"""
import math

from torch import nn

import common
import data
import experiment

# config: the argparse defaults below (python model03.py --help)
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
LOG_LOGISTIC_VAR_FACTOR = math.log(math.pi ** 2 / 3)  # variance of a logistic = s^2 pi^2 / 3


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


class LogisticObservation(nn.Module):
    """p(x|z): a discretized logistic per sub-pixel; the variance s^2 pi^2 / 3 is bounded as model02's
    Gaussian's (log-variance through tanh) unless `bounded` is False, when the log-scale is the raw output."""
    def __init__(self, bounded=True, num_bins=data.NUM_BINS):
        super().__init__()
        self.bounded, self.num_bins = bounded, num_bins

    def num_params(self, channels):
        return 2 * channels  # loc and a (log-)spread per channel

    def forward(self, out):
        loc, raw = out.chunk(2, dim=-3)  # (*, C, H, W) each
        log_scale = (common.bound_log_var(raw) - LOG_LOGISTIC_VAR_FACTOR) / 2 if self.bounded else raw
        return common.DiscretizedLogistic(loc, log_scale, num_bins=self.num_bins)


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
    p.add_argument("--unbounded", action="store_true",
                   help="no bound on the variance: the log-scale is the decoder's raw output")
    return p


def build_model(args):
    return VAE(LogisticObservation(bounded=not args.unbounded))


def run(argv):
    args = parser().parse_args(argv)
    images = data.load_colour(args.dataset, args.data_dir, download=not args.no_download)
    name = "model03_unbounded" if args.unbounded else "model03"
    return experiment.run_experiment(args, argv, script="model03.py", name=name, data=images, eval_pmf=EVAL_PMF,
                                            build_model=lambda: build_model(args))


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
