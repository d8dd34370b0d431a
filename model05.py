"""Chapter 5: several stochastic layers, a top-down hierarchy with bidirectional inference.

What changed since model04: the latent variables. State-of-the-art VAEs (ladder VAE, BIVA, VDVAE, NVAE)
pair the mixture of discretized logistics with many stochastic layers; is it the hierarchy that balances
the observation model against the KL terms, so that samples from the prior become meaningful? Here one
z becomes L layers z_1 (bottom) .. z_L (top), each a few maps at 4x4 or 8x8. Inference is bidirectional
(Sonderby et al. 2016, ladder VAE; Kingma et al. 2016, IAF; Child 2021, VDVAE): a bottom-up pass over
x, then top-down blocks that each form the prior p(z_i|z_>i) from the top-down state
and the posterior q(z_i|z_>i, x) from that state and the bottom-up features of its resolution. The
generative model and the inference network share the top-down pass. The decoder sees the top-down state
after the last layer, which carries every z (as in VDVAE and NVAE), so p(x|z) is p(x|z_1..z_L).
The observation model is model03's logistic (`--obs logistic`, its variance bound, `--unbounded`) or
model04's mixture (`--obs mixture`, the default), imported from those chapters' scripts: only the latents change.
The hierarchy's interface (the top-down pass, the log-weight parts per layer) is common.HierarchicalVAE.
The latents' scales are soft-clamped (`--latent-bounds`): `joint`, the default, bounds them as chapter 6 does
(`joint_latents`); `shift`, the first runs' (the shipped logistic's), bounds the prior's log-std and the posterior's
shift of it to +-5 each, so the posterior's can reach 10 and, rarely, rule a run's rate.

    objective:  L_k(x) = E log (1/k) sum_j w_j,
                log w = log p(x|z) + sum_i [log p(z_i|z_>i) - log q(z_i|z_>i, x)],  z ~ q, drawn top to bottom

Run:  python model05.py --data-dir DIR              (mixture, 3 layers)
      python model05.py --data-dir DIR --obs logistic --unbounded --layers 2 --dataset svhn
                                   (close to the original vae-mdl's try: two layers, SVHN)
It writes runs/model05_mixture_{imgs,recs,samples,samples_var,curve,layers}.png, model05_mixture_results.json
and model05_mixture_checkpoint.pt (model05_logistic[_unbounded]_* with --obs logistic). model05_*_layers.png
shows what each layer encodes: each row keeps one draw of the top layers from the prior and resamples the
layers below it.
It prints the test bits/dim, to set beside the run's row of the README's provenance table (its standard error is
over test images; how far a retrained run lands from it is not measured).
"""

import torch
from torch import nn

import common
import data
import evaluation
import experiment
from model03 import LogisticObservation  # chapter 3's p(x|z): a discretized logistic per sub-pixel
from model04 import NUM_COMPONENTS, MixtureObservation  # chapter 4's: a mixture with RGB autoregression

# config: the argparse defaults below (python model05.py --help)
LAYERS = 3  # stochastic layers: the top half (rounded up) at 4x4, the rest at 8x8
LATENT_CHANNELS = 8  # maps per stochastic layer: 128 units at 4x4, 512 at 8x8
CHANNELS = 32  # width of the convolutional stacks (the top-down state has 4x this at 4x4, 2x at 8x8)
EPOCHS = 50
BATCH_SIZE = 64
K = 1  # importance samples in training: the ELBO
LR = 1e-3
LATENT_BOUNDS = "joint"  # how p(z_i|z_>i) and q(z_i|z_>i, x) are bounded (--latent-bounds; LATENTS below)
LATENT_LOG_SIGMA_BOUND = 5.0  # shift: log-std of p(z_i|z_>i) and the posterior's shift of it: 5 tanh(raw / 5) (NVAE)
JOINT_LOG_SIGMA_BOUND = 2.0  # joint (chapter 6's): B, log-std of p and of q = 2 tanh(raw / 2)
JOINT_MEAN_BOUND = 5.0  # joint: M, their means = 5 tanh(raw / 5), as NVAE's soft_clamp5 (shift: none)
OLDER_CHECKPOINTS = {"latent_bounds": "shift"}  # what checkpoints written before --latent-bounds existed used
EVAL_SAMPLES = 100  # importance samples S for the test log-likelihood, as chapters 2-4
EVAL_MAX_ROWS = 100  # (sample, image) pairs per decoder pass in evaluation: sized for the cache (bench.py)
EVAL_PMF = True  # score the probability of the 8-bit values, in bits/dim
SKIP_GRAD_NORM = 1e9  # skip a step with a larger gradient norm: a last resort (README: the training guard)
SKIP_GRAD_RATIO = 10.0  # and one whose norm is 10x the median norm of the last 100 steps, as model04


def head(channels_in, hidden, channels_out):
    """SiLU, 3x3 convolution, SiLU, 1x1 convolution: the prior, posterior and residual branches of a
    top-down block (VDVAE's bottleneck block, shallower)."""
    return nn.Sequential(nn.SiLU(), nn.Conv2d(channels_in, hidden, 3, 1, 1),
                         nn.SiLU(), nn.Conv2d(hidden, channels_out, 1))


def soft_clamp(raw, bound):
    """bound * tanh(raw / bound): the identity near 0, never past +-bound (NVAE's soft_clamp5, Vahdat & Kautz 2020)."""
    return bound * torch.tanh(raw / bound)


def shift_latents(prior_out, posterior_out=None):
    """p(z_i|z_>i) and q(z_i|z_>i, x) (None without posterior_out) from the heads' outputs (N, 2Z, H, W), over the
    flattened maps: means free, the prior's log-std soft-clamped to +-5 and the posterior's shift of it to +-5 on
    its own, so the posterior's log-std can reach +-10 (the shipped runs of this chapter)."""
    mu_p, raw_p = (t.flatten(1) for t in prior_out.chunk(2, dim=1))  # (N, Z*H*W) each
    log_sigma_p = soft_clamp(raw_p, LATENT_LOG_SIGMA_BOUND)
    pz = common.diagonal_gaussian(mu_p, log_sigma_p)
    if posterior_out is None:
        return pz, None
    dmu, raw_q = (t.flatten(1) for t in posterior_out.chunk(2, dim=1))  # (N, Z*H*W) each
    return pz, common.diagonal_gaussian(mu_p + dmu, log_sigma_p + soft_clamp(raw_q, LATENT_LOG_SIGMA_BOUND))


def joint_latents(prior_out, posterior_out=None):
    """As shift_latents, bounded as chapter 6 bounds them: means soft-clamped to +-M, log-stds to +-B, the
    posterior's shift added to the prior's raw outputs before the one clamp (NVAE), so that its log-std stays in
    +-B too. Whatever the heads output, KL(q||p) <= 2B + (e^4B + 4M^2 e^2B - 1)/2 per latent unit."""
    raw_mu_p, raw_p = (t.flatten(1) for t in prior_out.chunk(2, dim=1))  # (N, Z*H*W) each
    pz = common.diagonal_gaussian(soft_clamp(raw_mu_p, JOINT_MEAN_BOUND), soft_clamp(raw_p, JOINT_LOG_SIGMA_BOUND))
    if posterior_out is None:
        return pz, None
    dmu, draw_q = (t.flatten(1) for t in posterior_out.chunk(2, dim=1))  # (N, Z*H*W) each
    return pz, common.diagonal_gaussian(soft_clamp(raw_mu_p + dmu, JOINT_MEAN_BOUND),
                                        soft_clamp(raw_p + draw_q, JOINT_LOG_SIGMA_BOUND))


LATENTS = {"shift": shift_latents, "joint": joint_latents}


class Encoder(nn.Module):
    """The bottom-up pass: model04's three stride-2 convolutions, keeping the features at 8x8 and 4x4.
    Returns one feature map per top-down block, top block first."""

    def __init__(self, channels, width, resolutions):
        super().__init__()
        self.resolutions = resolutions  # per block, top first: 4 or 8
        self.to_8x8 = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.SiLU(),
                                    nn.Conv2d(width, 2 * width, 4, 2, 1), nn.SiLU())
        self.to_4x4 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.SiLU())

    def forward(self, x):
        f_8x8 = self.to_8x8(x)  # (B, 2W, 8, 8)
        f_4x4 = self.to_4x4(f_8x8)  # (B, 4W, 4, 4)
        return [f_4x4 if r == 4 else f_8x8 for r in self.resolutions]


class TopDownBlock(nn.Module):
    """One stochastic layer z_i: `latent_channels` maps at the resolution of the state h (VDVAE's DecBlock,
    Child 2021). p(z_i|z_>i) = N(mu_p, sigma_p) from h; q(z_i|z_>i, x) = N(mu_p + dmu, sigma_p e^dlog_sigma)
    from h and the bottom-up features, a shift of the prior (NVAE's residual normal distribution, Vahdat &
    Kautz 2020; VDVAE forms q from the same inputs without the shift). Then z_i is projected into h, a
    residual branch follows, and the last block at 4x4 upsamples h to 8x8 (`up`). z_i is flattened:
    (N, latent_channels * H * W)."""

    def __init__(self, width, feature_channels, latent_channels, up=None, bounds=LATENT_BOUNDS):
        super().__init__()
        self.latent_channels, self.bounds = latent_channels, bounds
        self.prior_head = head(width, width // 2, 2 * latent_channels)
        self.posterior_head = head(width + feature_channels, width // 2, 2 * latent_channels)
        self.z_proj = nn.Conv2d(latent_channels, width, 1)
        self.residual = head(width, width // 2, width)
        self.up = up if up is not None else nn.Identity()
        nn.init.zeros_(self.prior_head[-1].weight)  # every prior starts as N(0, I)
        nn.init.zeros_(self.prior_head[-1].bias)

    def prior_net(self, h):
        return self.prior_head(h)  # (N, 2Z, H, W)

    def posterior_net(self, h, feature):
        return self.posterior_head(torch.cat([h, feature], dim=1))  # (N, 2Z, H, W)

    def latent(self, prior_out, posterior_out=None):
        return LATENTS[self.bounds](prior_out, posterior_out)

    def update(self, h, z):
        h = h + self.z_proj(z.reshape(len(z), self.latent_channels, *h.shape[-2:]))
        return self.up(h + self.residual(h))


class Decoder(nn.Module):
    """The top-down state at 8x8 -> the observation model's raw parameters at 32x32: model04's last two
    stride-2 transposed convolutions and its stride-1 convolution."""

    def __init__(self, num_params, width=CHANNELS):
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(), nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.SiLU(), nn.ConvTranspose2d(width, width, 4, 2, 1),
            nn.SiLU(), nn.Conv2d(width, num_params, 3, 1, 1),
        )

    def forward(self, h):
        out = self.net(h.reshape(-1, *h.shape[-3:]))  # (N, P, 32, 32), N = all of h's leading dims
        return out.reshape(*h.shape[:-3], *out.shape[1:])  # (*, P, 32, 32)


class VAE(common.HierarchicalVAE):
    """L stochastic layers of `latent_channels` maps, the top half (rounded up) at 4x4 and the rest at 8x8,
    then model04's decoder from 8x8 and p(x|z) = observation(decoder(h))."""

    def __init__(self, observation, channels=3, layers=LAYERS, width=CHANNELS, latent_channels=LATENT_CHANNELS,
                 bounds=LATENT_BOUNDS):
        super().__init__()
        resolutions = [4] * (layers - layers // 2) + [8] * (layers // 2)  # per block, top first
        self.encoder = Encoder(channels, width, resolutions)
        blocks = []
        for i, r in enumerate(resolutions):
            state = 4 * width if r == 4 else 2 * width  # channels of h, and of the bottom-up features, at r
            last_at_4x4 = r == 4 and resolutions[i + 1:i + 2] != [4]
            up = nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1) if last_at_4x4 else None
            blocks.append(TopDownBlock(state, state, latent_channels, up, bounds))
        self.blocks = nn.ModuleList(blocks)
        self.h_top = nn.Parameter(torch.zeros(1, 4 * width, 4, 4))  # the state above z_L (VDVAE starts from zeros)
        self.decoder = Decoder(observation.num_params(channels), width)
        self.observation = observation
        self.latent_dims = [latent_channels * r * r for r in reversed(resolutions)]  # bottom layer first

    def initial_state(self, n):
        return self.h_top.expand(n, -1, -1, -1)  # (n, 4W, 4, 4)


def parser():
    p = experiment.make_parser(__doc__, epochs=EPOCHS, batch_size=BATCH_SIZE, k=K, lr=LR, schedule="constant",
                           eval_max_rows=EVAL_MAX_ROWS, eval_samples=EVAL_SAMPLES,
                           skip_grad_norm=SKIP_GRAD_NORM,
                           skip_grad_ratio=SKIP_GRAD_RATIO)
    p.add_argument("--dataset", choices=["cifar10", "svhn"], default="cifar10", help="colour dataset")
    p.add_argument("--layers", type=experiment.positive_int, default=LAYERS,
                   help="stochastic layers (the top half, rounded up, at 4x4, the rest at 8x8)")
    p.add_argument("--obs", choices=["logistic", "mixture"], default="mixture",
                   help="p(x|z): model03's discretized logistic or model04's mixture of them")
    p.add_argument("--unbounded", action="store_true",
                   help="--obs logistic only: no bound on the variance, the log-scale is the decoder's raw output")
    p.add_argument("--components", type=experiment.positive_int, default=NUM_COMPONENTS,
                   help="--obs mixture only: mixture components per pixel")
    p.add_argument("--latent-bounds", choices=sorted(LATENTS), default=LATENT_BOUNDS,
                   help="joint: chapter 6's, means within +-5 and both log-stds within +-2, the posterior's bounded "
                        "as a whole; shift: the prior's log-std and the posterior's shift of it each within +-5, means "
                        "free (the first runs', the shipped logistic's). --resume and --eval-only take the "
                        "checkpoint's (shift for a checkpoint older than this flag)")
    return p


def build_model(args):
    observation = (MixtureObservation(args.components) if args.obs == "mixture"
                   else LogisticObservation(bounded=not args.unbounded))
    return VAE(observation, layers=args.layers, bounds=args.latent_bounds)


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
    name = f"model05_{args.obs}" + ("_unbounded" if args.unbounded else "")
    return experiment.run_experiment(args, argv, script="model05.py", name=name, data=images, eval_pmf=EVAL_PMF,
                                            build_model=lambda: build_model(args),
                                            extra_grids=evaluation.save_layer_grid, older_checkpoints=OLDER_CHECKPOINTS)


def main(argv=None):
    return experiment.cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
