"""Chapter 1: a Bernoulli IWAE on binarized MNIST, reproducing Burda et al. 2015.

Before anything else, check the machinery (objective, estimator, schedule) against a published number:
the paper's one-stochastic-layer IWAE with k = 5 reaches a test log-likelihood of -85.54 nats
(Burda et al. 2015, table 1); the original vae-mdl reached -85.02.

    objective:  L_k(x) = E_{z_1..z_k ~ q(z|x)} log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)
    p(x|z) = prod_pixels Bernoulli(x; sigmoid(decoder(z))),  p(z) = N(0, I),  q(z|x) = N(mu(x), sigma(x)^2)

Departure from the paper: batches of 100 (the paper: 20) and the hold-decay schedule (lr 1e-3 for the first
half of the epochs, then a geometric decay to 1e-4), 1500 epochs: the paper's 3280 epochs of batches of 20
(8 stages, lr 1e-3 * 10^(-i/7) for 3^i epochs) are eleven times as many steps (README: the times on 2 cores).
The paper's protocol is  --batch-size 20 --schedule iwae --epochs 3280.

Run:  python model01.py --data-dir DIR
      (--epochs N spreads the same schedule over N epochs; --time-limit MINUTES stops and resumes)
It writes runs/model01_{imgs,recs,samples,samples_var,curve}.png, model01_results.json and
model01_checkpoint.pt, and prints the test log-likelihood estimated with 5000 importance samples, to set beside
the README's provenance table (its standard error is over test images; how far a retrained run lands is not
measured).
"""
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent

import common
import data
import experiment

# config: the argparse defaults below (python model01.py --help); the ones that define the paper's run:
LATENT_DIM = 50  # Burda et al. 2015, sec. 5: one stochastic layer of 50 units
HIDDEN = 200  # two deterministic layers of 200 tanh units, in encoder and decoder
EPOCHS = 1500  # with hold-decay (the README's run); the paper: 3280 epochs (training.IWAE_EPOCHS = 3280) of its 8-stage schedule
BATCH_SIZE = 100  # the paper: 20
SCHEDULE = "hold-decay"  # the paper: "iwae"
K = 5
ADAM_EPS = 1e-4  # the paper's Adam: beta1 = 0.9, beta2 = 0.999, eps = 1e-4
EVAL_SAMPLES = 5000  # importance samples S for the test log-likelihood (the paper's)
EVAL_PMF = False  # the Bernoulli scores binary pixels as they are
EVAL_MAX_ROWS = 2500  # (sample, image) pairs per decoder pass in evaluation: sized for the cache (bench.py)


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])  # the last layer is linear


class Encoder(nn.Module):
    def __init__(self, x_dim=784, hidden=HIDDEN, latent_dim=LATENT_DIM):
        super().__init__()
        self.net = mlp([x_dim, hidden, hidden, 2 * latent_dim])

    def forward(self, x):
        return self.net(x.flatten(1)).chunk(2, dim=-1)  # mu, log_sigma: (B, D) each; sigma = exp(linear output)


class Decoder(nn.Module):
    def __init__(self, x_shape=(1, 28, 28), hidden=HIDDEN, latent_dim=LATENT_DIM):
        super().__init__()
        self.x_shape = x_shape
        self.net = mlp([latent_dim, hidden, hidden, x_shape[0] * x_shape[1] * x_shape[2]])

    def forward(self, z):
        return self.net(z).view(*z.shape[:-1], *self.x_shape)  # logits (*, 1, 28, 28)


def bernoulli(logits):
    """p(x|z): independent Bernoulli pixels, x in {0, 1}; log_prob sums over (C, H, W); mean = sigmoid(logits)."""
    return Independent(Bernoulli(logits=logits, validate_args=False), 3, validate_args=False)


class VAE(common.OneLayerVAE):
    """q(z|x) = N(encoder(x)), p(z) = N(0, I), p(x|z) = bernoulli(decoder(z)); the IWAE bound, the estimator
    and the grids come from common.OneLayerVAE."""
    def __init__(self, latent_dim=LATENT_DIM):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder, self.decoder = Encoder(latent_dim=latent_dim), Decoder(latent_dim=latent_dim)
        self.observation = bernoulli

    @torch.no_grad()
    def init_output_bias(self, train_mean):
        """Output bias = logit of the training mean, so training starts at the pixel marginals (Burda et al.)."""
        p = train_mean.clamp(1e-3, 1 - 1e-3).flatten()
        self.decoder.net[-1].bias.copy_(torch.log(p) - torch.log1p(-p))


def parser():
    p = experiment.make_parser(__doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, k=K, lr=1e-3, schedule=SCHEDULE,
                           eval_max_rows=EVAL_MAX_ROWS, eval_samples=EVAL_SAMPLES)
    p.add_argument("--binarization", choices=["dynamic", "static"], default="dynamic",
                   help="dynamic: a fresh binarization of every training batch (the paper); static: one fixed "
                        "binarization of the training set (not comparable with the paper's numbers)")
    return p


def build_model(args, train_mean=None):
    model = VAE()
    if train_mean is not None:
        model.init_output_bias(train_mean)
    return model


def run(argv):
    args = parser().parse_args(argv)
    mnist = data.load_mnist(args.data_dir, args.binarization, download=not args.no_download)
    return experiment.run_experiment(args, argv, script="model01.py", name="model01",
                                     build_model=lambda: build_model(args, mnist.train_mean()), data=mnist,
                                     eval_pmf=EVAL_PMF, adam_eps=ADAM_EPS)


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
