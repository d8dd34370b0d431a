"""What a trained model is measured and shown by, besides its test log-likelihood (`common.estimate_log_likelihood`):
the held-out ELBO with its rate and distortion (the per-epoch curve), the balance statistics (rate per layer, the
log-scale p(x|z) predicts, active units), roughness, and the pictures: grids of data, reconstructions, means and draws
of p(x|z), the layer grid of a hierarchy, the training curve and the colour runs' test curves.
"""
import json
import math
import os
import statistics

import torch

from common import iwae_bound, mean_and_stderr, monte_carlo_mean

# ---------------------------------------------------------------------------------------------------
# Held-out statistics
# ---------------------------------------------------------------------------------------------------
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


TEMPERATURES = (1.0, 0.9, 0.8, 0.7)  # rows of <name>_temperatures.png: VDVAE's (its sampling notebook)


@torch.no_grad()
def temperature_rows(model, eval_pmf, temperatures=TEMPERATURES, columns=8):
    """For a hierarchy (`generate(temperature=...)`), per temperature t: `columns` draws of z from the prior with
    every layer's standard deviation times t, their means E[x|z], then one draw x ~ p(x|z) for each of the same z.
    (len(temperatures), 2 * columns, C, H, W); t = 1 is the prior itself. Every row draws the same noise, so that a
    column is one sample cooled (VDVAE's notebook draws afresh at each t)."""
    model.eval()
    seed = int(torch.randint(2 ** 31, ()))  # one draw of the caller's generator: the grid still follows the run's seed
    device = next(model.parameters()).device
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's state comes back
        for t in temperatures:
            torch.manual_seed(seed)
            px_z = model.generate(columns, eval_pmf, temperature=t)
            means, _ = observation_mean(px_z)
            rows.append(torch.cat([means, px_z.sample()]))  # (2 * columns, C, H, W)
    return torch.stack(rows)


def save_hierarchy_grids(model, out_dir, name, eval_pmf):
    """A hierarchy's extra grids: <name>_layers.png (save_layer_grid) and <name>_temperatures.png."""
    save_layer_grid(model, out_dir, name, eval_pmf)
    save_temperature_grid(model, out_dir, name, eval_pmf)


def save_temperature_grid(model, out_dir, name, eval_pmf):
    """<name>_temperatures.png: the prior's samples at TEMPERATURES, means beside draws, one labelled row per
    temperature."""
    rows = temperature_rows(model, eval_pmf)
    save_labelled_grid(list(rows.clamp(0, 1).cpu()), [f"t = {t:g}" for t in TEMPERATURES],
                       ["prior samples at temperature t: means", "draws, same z"],
                       os.path.join(out_dir, f"{name}_temperatures.png"), label_inches=0.8)


def save_labelled_grid(rows, row_labels, titles, path, label_inches=4.2):
    """One picture of labelled rows: rows[i] (len(titles) * n, C, H, W) in [0, 1] is split into len(titles)
    groups of n images, set apart by white space, each group under its title, the row's label on its left (in a
    margin of label_inches)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    n = len(rows[0]) // len(titles)
    gap = torch.ones(3, rows[0].shape[-2] + 2, 8)  # white space between the groups of a row (the images and padding)
    strips = []
    for row in rows:
        groups = [make_grid(g, nrow=n, padding=1, pad_value=1.0) for g in row.split(n)]
        strips.append(torch.cat([torch.cat([g, gap[:, :g.shape[1]]], 2) for g in groups], 2)[:, :, :-8])
    grid = make_grid(torch.stack(strips), nrow=1, padding=4, pad_value=1.0)  # (3, H, W)
    height, width = grid.shape[1:]
    left, top = label_inches, 0.4  # inches for the row labels and the column titles
    w, h = width / 60, height / 60
    fig = plt.figure(figsize=(w + left, h + top))
    ax = fig.add_axes([left / (w + left), 0.0, w / (w + left), h / (h + top)])
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    group = (width - 8) / len(titles)
    ax.set_xticks([(j + 0.5) * group for j in range(len(titles))], titles, fontsize=9)
    ax.xaxis.set_ticks_position("top")
    ax.set_yticks([4 + (i + 0.5) * (height - 4) / len(rows) for i in range(len(rows))], row_labels, fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def plot_colour_curves(results_paths, path, labels=None):
    """One figure with every colour run's per-epoch test ELBO (bits/dim on the fixed test subset), in the order of
    results_paths, each curve named by labels[run name] (default: the run's name). Returns the number of curves
    drawn (none: no figure)."""
    runs = []
    for p in results_paths:
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
    for i, (r, (epochs, bpd)) in enumerate(zip(runs, curves)):  # ten colours, then the same with another dash
        line, = ax.plot(epochs, [value if value <= top else math.nan for value in bpd], marker=".", lw=1,
                        color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                        label=(labels or {}).get(r["model"], r["model"]))  # the line breaks at an off-scale epoch
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
