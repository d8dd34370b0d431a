"""Chapter 1: a Bernoulli IWAE on binarized MNIST, reproducing Burda et al. 2015.

Before anything else, check the machinery (objective, estimator, schedule) against a published number:
the paper's one-stochastic-layer IWAE with k = 5 reaches a test log-likelihood of -85.54 nats
(Burda et al. 2015, table 1); the original vae-mdl reached -85.02.

    objective:  L_k(x) = E_{z_1..z_k ~ q(z|x)} log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)
    p(x|z) = prod_pixels Bernoulli(x; sigmoid(decoder(z))),  p(z) = N(0, I),  q(z|x) = N(mu(x), sigma(x)^2)

Run:  python model01.py --data-dir ../shared/data
      (the paper's full schedule: 3280 epochs; --epochs N compresses it into N epochs)
It writes assets/model01_{imgs,recs,samples,samples_var,curve}.png, model01_results.json and
model01_checkpoint.pt, and prints the test log-likelihood estimated with 5000 importance samples.
"""
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent

import common
import data

# config: the argparse defaults below (python model01.py --help); the ones that define the paper's run:
LATENT_DIM = 50  # Burda et al. 2015, sec. 5: one stochastic layer of 50 units
HIDDEN = 200  # two deterministic layers of 200 tanh units, in encoder and decoder
EPOCHS = common.IWAE_EPOCHS  # 3280: stages i = 0..7 of 3^i epochs, lr 1e-3 * 10^(-i/7)
BATCH_SIZE = 20
K = 5
ADAM_EPS = 1e-4  # the paper's Adam: beta1 = 0.9, beta2 = 0.999, eps = 1e-4


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
        mu, log_sigma = self.net(x.flatten(1)).chunk(2, dim=-1)  # (B, D) each; sigma = exp(linear output)
        return common.diagonal_gaussian(mu, log_sigma)


class Decoder(nn.Module):
    def __init__(self, x_shape=(1, 28, 28), hidden=HIDDEN, latent_dim=LATENT_DIM):
        super().__init__()
        self.x_shape = x_shape
        self.net = mlp([latent_dim, hidden, hidden, x_shape[0] * x_shape[1] * x_shape[2]])

    def forward(self, z):
        logits = self.net(z).view(-1, *self.x_shape)  # (N, 1, 28, 28)
        return bernoulli(logits)


def bernoulli(logits):
    """p(x|z): independent Bernoulli pixels, x in {0, 1}; log_prob sums over (C, H, W); mean = sigmoid(logits)."""
    return Independent(Bernoulli(logits=logits, validate_args=False), 3, validate_args=False)


class VAE(nn.Module):
    def __init__(self, latent_dim=LATENT_DIM):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder, self.decoder = Encoder(latent_dim=latent_dim), Decoder(latent_dim=latent_dim)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    @torch.no_grad()
    def init_output_bias(self, train_mean):
        """Output bias = logit of the training mean, so training starts at the pixel marginals (Burda et al.)."""
        p = train_mean.clamp(1e-3, 1 - 1e-3).flatten()
        self.decoder.net[-1].bias.copy_(torch.log(p) - torch.log1p(-p))


def run(argv):
    parser = common.make_parser(__doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, k=K, lr=1e-3, schedule="iwae",
                                eval_max_rows=50_000)
    parser.add_argument("--binarization", choices=["dynamic", "static"], default="dynamic",
                        help="dynamic: a fresh binarization of every training batch (the paper); static: one fixed "
                             "binarization of the training set (not comparable with the paper's numbers)")
    args = parser.parse_args(argv)
    mnist = data.load_mnist(args.data_dir, args.binarization, download=not args.no_download)

    def build_model():
        model = VAE()
        model.init_output_bias(mnist.train_mean())
        return model

    return common.run_experiment(args, argv, script="model01.py",
                                 name="model01", build_model=build_model, data=mnist, eval_pmf=False,
                                 report_bpd=False, adam_eps=ADAM_EPS)


def main(argv=None):
    return common.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
