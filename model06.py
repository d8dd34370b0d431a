"""Chapter 6: a deeper hierarchy: residual cells, spatial latents at four resolutions, many stochastic layers.

What changed since model05: the size and the shape of the hierarchy. model05 has three stochastic layers at 4x4 and
8x8 between shallow convolutional stacks; the VAEs that reach 2.9 bits/dim on CIFAR-10 (VDVAE, Child 2021: 2.87;
NVAE, Vahdat & Kautz 2020: 2.91) stack many layers of spatial latents, from 1x1 up to the image's resolution,
between residual cells. Here:
  - every network is made of VDVAE's bottleneck blocks (a 1x1 convolution down to a narrower width, two 3x3
    convolutions, a 1x1 convolution back up), residual where they keep the width;
  - the latents are maps at 1x1, 4x4, 8x8 and 16x16: 4 + 5 + 4 + 1 = 14 layers by default (`--layers`);
  - inference is model05's, bidirectional: a bottom-up pass of residual cells keeps its features at each
    resolution, and each top-down block forms p(z_i|z_>i) from the state and q(z_i|z_>i, x) from the state and
    the bottom-up features at its resolution; the state moves up a resolution by nearest-neighbour copies plus a
    learnt bias (VDVAE), and the decoder reads it at 16x16;
  - the decoder's last convolution is 1x1 (VDVAE's out_conv): model05's 3x3 one at 32x32 took about a quarter of
    its training step on CPU, time spent here on the hierarchy instead.
The sizes are chosen for 2 CPU cores, to train in under 3 hours at bench.py's rate (README, Reproduce): one width of
96 channels with a bottleneck of 48 (VDVAE's is a quarter of the width), 1.92M weights (model05: 1.07M), 25 epochs
with model01's hold-decay schedule (the base learning rate for half the steps, then a geometric decay to a tenth).
The first runs used a width of 64 and a bottleneck of 32 for 50 epochs at a constant learning rate: their test
curves swung by up to hundreds of nats from epoch to epoch (README, the colour runs' test curves), which the decay
calms, and a profile of the compiled training step on CPU spent most of the narrow network's step in the backward
passes of narrow convolutions on small maps and in the fused elementwise kernels of 14 layers (activations, soft
clamps, KL terms), which read and write more than they compute; the wider one trains at about model05's share of the
cores' FLOP rate (README, chapter 6). The sizes were chosen on the mixture: the free logistic scored better at the
first sizes (README, chapter 6). The observation model is model05's: model03's logistic (`--obs logistic`, its
variance bound, `--unbounded`) or model04's mixture (`--obs mixture`, the default; `--components`), imported from
those chapters' scripts.

Latent scales that stay sane. A rare draw ruled model05's first mixture run (`--latent-bounds shift`): its results
gave the bottom layer a mean rate of 12.9 million nats over 10,000 one-sample draws. There the posterior's log-std is
the prior's plus a shift, each soft-clamped to +-5 on its own, so it can reach 10. Here, as VDVAE and NVAE do:
  - the last convolution of the prior's head starts at zero, so every p starts as N(0, I); the last convolutions of
    the posterior's head and of each residual branch, and z's projection into the state, start scaled by
    1/sqrt(number of residual branches), with zero biases, so that q starts near p and the state's variance does
    not grow with depth (VDVAE);
  - means and log-stds are soft-clamped, the posterior's as a whole (NVAE: the prior's raw outputs plus the
    posterior's shift, then one clamp): means to +-M = +-5 as NVAE's, log-stds to a tighter +-B = +-2. Whatever the
    heads output, KL(q||p) <= 2B + (e^4B + 4M^2 e^2B - 1)/2 = 4,224 nats per latent unit (model05.joint_latents:
    model05 --latent-bounds joint applies the same bounds to chapter 5's hierarchy);
  - a step whose gradient norm is 10x the median of the last 100 is skipped, as model04's and model05's are
    (VDVAE skips above a fixed norm).

    objective:  L_k(x) = E log (1/k) sum_j w_j,
                log w = log p(x|z) + sum_i [log p(z_i|z_>i) - log q(z_i|z_>i, x)],  z ~ q, drawn top to bottom

Run:  python model06.py --data-dir DIR      (mixture, 14 layers: on 2 CPU cores longer than one
                                              sitting; add --time-limit MINUTES, then --resume)
      python model06.py --data-dir DIR --obs logistic --unbounded
It writes runs/model06_mixture_{imgs,recs,samples,samples_var,curve,layers,temperatures}.png,
model06_mixture_results.json and model06_mixture_checkpoint.pt (model06_logistic[_unbounded]_* with --obs logistic).
As model05's, model06_*_layers.png shows what each layer encodes: each row keeps one draw of the top layers from the
prior and resamples the layers below it. model06_*_temperatures.png shows samples from the prior with every layer's
standard deviation scaled by a temperature t <= 1 (evaluation.TEMPERATURES, VDVAE's).
It prints the test bits/dim, to set beside the run's row of the README's provenance table (its standard error is
over test images; how far a retrained run lands from it is not measured).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import common
import data
import evaluation
import experiment
from model03 import LogisticObservation  # chapter 3's p(x|z): a discretized logistic per sub-pixel
from model04 import NUM_COMPONENTS, MixtureObservation  # chapter 4's: a mixture with RGB autoregression
from model05 import joint_latents  # the latent bounds above, model05's --latent-bounds joint

# config: the argparse defaults below (python model06.py --help)
RESOLUTIONS = (1, 4, 8, 16)  # of the latent maps, top first; the decoder reads the state at the last one
LAYERS = (4, 5, 4, 1)  # stochastic layers at each resolution: 14 in all
LATENT_CHANNELS = 8  # maps per stochastic layer: 8 units at 1x1, 128 at 4x4, 512 at 8x8, 2048 at 16x16
CHANNELS = 96  # width of the bottom-up features and of the top-down state, at every resolution
BOTTLENECK = 48  # the inner width of the bottleneck blocks (VDVAE's: a quarter of the width)
OLDER_CHECKPOINTS = {"width": 64, "bottleneck": 32}  # what checkpoints written before --width and --bottleneck used
ENCODER_CELLS = 1  # residual cells of the bottom-up pass at each resolution (VDVAE: 3 to 11)
OUT_CHANNELS = 32  # width of the decoder at 32x32 (model05's)
EPOCHS = 25
SCHEDULE = "hold-decay"  # model01's; the docstring says why
BATCH_SIZE = 64
K = 1  # importance samples in training: the ELBO
LR = 1e-3
EVAL_SAMPLES = 100  # importance samples S for the test log-likelihood, as chapters 2-5
EVAL_MAX_ROWS = 100  # (sample, image) pairs per decoder pass in evaluation: sized for the cache (bench.py)
EVAL_PMF = True  # score the probability of the 8-bit values, in bits/dim
SKIP_GRAD_NORM = 1e9  # skip a step with a larger gradient norm: a last resort (README: the training guard)
SKIP_GRAD_RATIO = 10.0  # and one whose norm is 10x the median norm of the last 100 steps, as model04


def head(channels_in, hidden, channels_out, kernel=3):
    """VDVAE's bottleneck block (Child 2021, fig. 3): SiLU, 1x1 convolution down to `hidden`, twice SiLU and a
    kernel x kernel convolution, SiLU, 1x1 convolution to `channels_out`: the prior, posterior and residual branches.
    At 1x1 the kernels are 1x1, as VDVAE's are below 3x3."""
    return nn.Sequential(nn.SiLU(), nn.Conv2d(channels_in, hidden, 1),
                         nn.SiLU(), nn.Conv2d(hidden, hidden, kernel, 1, kernel // 2),
                         nn.SiLU(), nn.Conv2d(hidden, hidden, kernel, 1, kernel // 2),
                         nn.SiLU(), nn.Conv2d(hidden, channels_out, 1))


class ResidualCell(nn.Module):
    """h + head(h), the last convolution scaled by `scale` (VDVAE: 1/sqrt(number of residual branches)) and its bias
    zero, so that the state's variance does not grow with depth."""

    def __init__(self, width, hidden, kernel, scale):
        super().__init__()
        self.branch = head(width, hidden, width, kernel)
        with torch.no_grad():
            self.branch[-1].weight.mul_(scale)
            self.branch[-1].bias.zero_()  # as VDVAE's zero_bias

    def forward(self, h):
        return h + self.branch(h)


class Upsample(nn.Module):
    """The state at one resolution -> the next: nearest-neighbour copies plus a learnt bias map (VDVAE's bias_xs)."""

    def __init__(self, width, resolution_in, resolution_out):
        super().__init__()
        self.factor = resolution_out // resolution_in
        self.bias = nn.Parameter(torch.zeros(1, width, resolution_out, resolution_out))

    def forward(self, h):
        return F.interpolate(h, scale_factor=self.factor, mode="nearest") + self.bias


class Encoder(nn.Module):
    """The bottom-up pass: a stride-2 convolution to 16x16 (VDVAE has cells at 32x32 too), then at each resolution,
    finest first, an average pool down to it and `cells` residual cells, keeping the features there. Returns one
    feature map per top-down block, top block first."""

    def __init__(self, channels, width, hidden, resolutions, cells, scale):
        super().__init__()
        self.resolutions = resolutions  # per block, top first
        self.levels = sorted(set(resolutions), reverse=True)  # 16, 8, 4, 1
        self.stem = nn.Conv2d(channels, width, 4, 2, 1)  # (B, W, 16, 16)
        self.cells = nn.ModuleList([nn.Sequential(*[ResidualCell(width, hidden, 3 if r > 1 else 1, scale)
                                                    for _ in range(cells)]) for r in self.levels])

    def forward(self, x):
        h, features = self.stem(x), {}
        for r, cells in zip(self.levels, self.cells):
            h = cells(F.avg_pool2d(h, h.shape[-1] // r) if h.shape[-1] != r else h)  # (B, W, r, r)
            features[r] = h
        return [features[r] for r in self.resolutions]


class TopDownBlock(nn.Module):
    """One stochastic layer z_i: `latent_channels` maps at the resolution of the state h (VDVAE's DecBlock,
    Child 2021). p(z_i|z_>i) = N(mu_p, sigma_p) from h; q(z_i|z_>i, x) from h and the bottom-up features, as a
    shift of the prior's raw outputs (NVAE's residual normal distribution, Vahdat & Kautz 2020; VDVAE forms q from
    the same inputs without the shift). Then z_i is projected into h, a residual cell follows, and the last block
    at a resolution moves h up to the next (`up`). z_i is flattened: (N, latent_channels * H * W)."""

    def __init__(self, width, hidden, latent_channels, kernel, scale, up=None):
        super().__init__()
        self.latent_channels = latent_channels
        self.prior_head = head(width, hidden, 2 * latent_channels, kernel)
        self.posterior_head = head(2 * width, hidden, 2 * latent_channels, kernel)
        self.z_proj = nn.Conv2d(latent_channels, width, 1)
        self.residual = ResidualCell(width, hidden, kernel, scale)
        self.up = up if up is not None else nn.Identity()
        with torch.no_grad():  # p starts as N(0, I) (VDVAE's zero_last), q near it, and z adds little to h
            self.prior_head[-1].weight.zero_()
            for last in (self.posterior_head[-1], self.z_proj):
                last.weight.mul_(scale)
            for last in (self.prior_head[-1], self.posterior_head[-1], self.z_proj):
                last.bias.zero_()

    def prior_net(self, h):
        return self.prior_head(h)  # (N, 2Z, H, W)

    def posterior_net(self, h, feature):
        return self.posterior_head(torch.cat([h, feature], dim=1))  # (N, 2Z, H, W)

    def latent(self, prior_out, posterior_out=None):
        return joint_latents(prior_out, posterior_out)

    def update(self, h, z):
        h = h + self.z_proj(z.reshape(len(z), self.latent_channels, *h.shape[-2:]))
        return self.up(self.residual(h))


class Decoder(nn.Module):
    """The top-down state at 16x16 -> the observation model's raw parameters at 32x32: model05's stride-2 transposed
    convolution, then a 1x1 convolution (VDVAE's out_conv) where model05 has a 3x3 one."""

    def __init__(self, num_params, width=CHANNELS, out_channels=OUT_CHANNELS):
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(), nn.ConvTranspose2d(width, out_channels, 4, 2, 1),
            nn.SiLU(), nn.Conv2d(out_channels, num_params, 1),
        )

    def forward(self, h):
        out = self.net(h.reshape(-1, *h.shape[-3:]))  # (N, P, 32, 32), N = all of h's leading dims
        return out.reshape(*h.shape[:-3], *out.shape[1:])  # (*, P, 32, 32)


class VAE(common.HierarchicalVAE):
    """layers[j] stochastic layers of `latent_channels` maps at RESOLUTIONS[j], top first, between residual cells of
    one width, then the decoder from 16x16 and p(x|z) = observation(decoder(h))."""

    def __init__(self, observation, channels=3, layers=LAYERS, width=CHANNELS, hidden=BOTTLENECK,
                 latent_channels=LATENT_CHANNELS, encoder_cells=ENCODER_CELLS):
        super().__init__()
        resolutions = [r for r, n in zip(RESOLUTIONS, layers) for _ in range(n)]  # per block, top first
        scale = 1 / math.sqrt(len(resolutions) + encoder_cells * len(RESOLUTIONS))  # per residual branch (VDVAE)
        self.encoder = Encoder(channels, width, hidden, resolutions, encoder_cells, scale)
        blocks = []
        for i, r in enumerate(resolutions):
            r_next = resolutions[i + 1] if i + 1 < len(resolutions) else r
            up = Upsample(width, r, r_next) if r_next != r else None
            blocks.append(TopDownBlock(width, hidden, latent_channels, 3 if r > 1 else 1, scale, up))
        self.blocks = nn.ModuleList(blocks)
        self.h_top = nn.Parameter(torch.zeros(1, width, RESOLUTIONS[0], RESOLUTIONS[0]))  # VDVAE starts from zeros
        self.decoder = Decoder(observation.num_params(channels), width)
        self.observation = observation
        self.latent_dims = [latent_channels * r * r for r in reversed(resolutions)]  # bottom layer first

    def initial_state(self, n):
        return self.h_top.expand(n, -1, -1, -1)  # (n, W, 1, 1)


def parser():
    p = experiment.make_parser(__doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, k=K, lr=LR, schedule=SCHEDULE,
                               eval_max_rows=EVAL_MAX_ROWS, eval_samples=EVAL_SAMPLES,
                               skip_grad_norm=SKIP_GRAD_NORM,
                               skip_grad_ratio=SKIP_GRAD_RATIO)
    p.add_argument("--dataset", choices=["cifar10", "svhn"], default="cifar10", help="colour dataset")
    p.add_argument("--layers", type=experiment.positive_int, nargs=len(RESOLUTIONS), default=list(LAYERS),
                   metavar="N", help="stochastic layers at " + ", ".join(f"{r}x{r}" for r in RESOLUTIONS))
    p.add_argument("--width", type=experiment.positive_int, default=CHANNELS,
                   help="channels of the bottom-up features and of the top-down state, at every resolution")
    p.add_argument("--bottleneck", type=experiment.positive_int, default=BOTTLENECK,
                   help="inner width of the bottleneck blocks")
    p.add_argument("--obs", choices=["logistic", "mixture"], default="mixture",
                   help="p(x|z): model03's discretized logistic or model04's mixture of them")
    p.add_argument("--unbounded", action="store_true",
                   help="--obs logistic only: no bound on the variance, the log-scale is the decoder's raw output")
    p.add_argument("--components", type=experiment.positive_int, default=NUM_COMPONENTS,
                   help="--obs mixture only: mixture components per pixel")
    return p


def build_model(args):
    observation = (MixtureObservation(args.components) if args.obs == "mixture"
                   else LogisticObservation(bounded=not args.unbounded))
    return VAE(observation, layers=args.layers, width=args.width, hidden=args.bottleneck)


def run(argv):
    args = parser().parse_args(argv)
    if args.obs != "logistic" and args.unbounded:
        raise common.UserError("--unbounded removes the logistic's variance bound, so it needs --obs logistic; the "
                               "mixture has no bound to remove (only model04's log-scale floor). Drop --unbounded "
                               "or pass --obs logistic.")
    if args.obs != "mixture" and args.components != NUM_COMPONENTS:
        raise common.UserError("--components is the number of mixture components, so it needs --obs mixture. Drop "
                               "--components or pass --obs mixture.")
    images = data.load_colour(args.dataset, args.data_dir, download=not args.no_download)
    name = f"model06_{args.obs}" + ("_unbounded" if args.unbounded else "")
    return experiment.run_experiment(args, argv, script="model06.py", name=name, data=images, eval_pmf=EVAL_PMF,
                                     build_model=lambda: build_model(args),
                                     extra_grids=evaluation.save_hierarchy_grids, older_checkpoints=OLDER_CHECKPOINTS)


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
