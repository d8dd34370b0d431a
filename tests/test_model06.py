"""model06: the deep hierarchy's interface (log-weight parts and rates per layer at four resolutions), its
initialisation, the bounds that keep its latent scales sane whatever the heads output, and main([...]) end to end
on tiny fake CIFAR-10."""
import json
import math

import pytest
import torch
from torch.distributions import kl_divergence

import common
import evaluation
import model05
import model06

GRIDS = ["imgs", "recs", "samples", "samples_var", "layers", "temperatures"]
B, M = model05.JOINT_LOG_SIGMA_BOUND, model05.JOINT_MEAN_BOUND
# the largest KL(q||p) per unit that |log sigma| <= B and |mu| <= M allow, for q and p alike:
# log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2 <= 2B + (e^4B + 4M^2 e^2B - 1) / 2
KL_MAX_PER_UNIT = 2 * B + (math.exp(4 * B) + 4 * M ** 2 * math.exp(2 * B) - 1) / 2


def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def dims(layers, latent_channels=model06.LATENT_CHANNELS):
    """Units per stochastic layer, bottom layer first."""
    per_block = [latent_channels * r * r for r, n in zip(model06.RESOLUTIONS, layers) for _ in range(n)]
    return per_block[::-1]


# ---------------------------------------------------------------------------------------------------
# The convolutional hierarchy
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("observation", [model06.MixtureObservation(), model06.LogisticObservation()])
def test_interface_shapes_rates_and_gradients(observation):
    torch.manual_seed(0)
    model, x = model06.VAE(observation), pixels(3)
    with torch.no_grad():  # away from the initial q = p, so that the rates are not all zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    parts = model.log_weight_parts(x, k=2, eval_pmf=True)
    for key in ["log_px_z", "log_pz", "log_qz_x"]:
        assert parts[key].shape == (2, 3) and torch.isfinite(parts[key]).all(), key
    layers = sum(model06.LAYERS)
    assert parts["rate_layers"].shape == (2, 3, layers)
    assert (parts["rate_layers"] != 0).all()
    assert torch.allclose(parts["rate_layers"].sum(-1), parts["log_qz_x"] - parts["log_pz"], rtol=1e-5, atol=1e-2)
    (-common.iwae_bound(model, x, k=2)["bound"].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.generate(5).batch_shape == (5,) and model.reconstruct(x).batch_shape == (3,)
    means = model.posterior_means(x)
    assert [tuple(m.shape) for m in means] == [(3, d) for d in model.latent_dims]
    assert model.latent_dims == dims(model06.LAYERS)
    assert model.latent_dims[0] == 8 * 16 * 16 and model.latent_dims[-1] == 8  # bottom at 16x16, top at 1x1


@pytest.mark.parametrize("layers", [(1, 1, 1, 1), (2, 1, 3, 1)])
def test_layers_at_four_resolutions(layers):
    model = model06.VAE(model06.LogisticObservation(), layers=layers)
    x = pixels(2)
    assert model.log_weight_parts(x, k=3)["rate_layers"].shape == (3, 2, sum(layers))
    assert [m.shape[1] for m in model.posterior_means(x)] == dims(layers)
    assert len(model.encode(x)) == sum(layers)
    assert [f.shape[-1] for f in model.encode(x)] == [r for r, n in zip(model06.RESOLUTIONS, layers) for _ in range(n)]


def test_width_flags_set_the_networks_widths():
    args = model06.parser().parse_args(["--width", "24", "--bottleneck", "8", "--layers", "1", "1", "1", "1"])
    model = model06.build_model(args)
    assert model.encoder.stem.out_channels == 24 and model.h_top.shape[1] == 24
    inner = [m.out_channels for block in model.blocks for m in block.residual.branch if isinstance(m, torch.nn.Conv2d)]
    assert inner == [8, 8, 8, 24] * 4
    assert model.log_weight_parts(pixels(2), k=1)["rate_layers"].shape == (1, 2, 4)
    defaults = model06.parser().parse_args([])
    assert (defaults.width, defaults.bottleneck) == (model06.CHANNELS, model06.BOTTLENECK)


def test_every_p_starts_as_the_standard_normal_and_q_near_it():
    """The prior heads' last convolutions start at zero (VDVAE's zero_last), the posterior heads' scaled down: every
    p(z_i|z_>i) starts as N(0, I) and every q(z_i|z_>i, x) close to it, though not equal (the encoder is heard)."""
    torch.manual_seed(0)
    model, x = model06.VAE(model06.MixtureObservation()), pixels(2)
    _, layers = model.top_down(2, model.encode(x))
    for _, pz, qz in layers:
        assert torch.equal(pz.mean, torch.zeros_like(pz.mean)) and torch.equal(pz.stddev, torch.ones_like(pz.stddev))
        assert 0 < qz.mean.abs().max() < 0.04 and 0 < qz.stddev.log().abs().max() < 0.04  # unscaled: about 0.08
        assert kl_divergence(qz, pz).max() < 5e-4 * qz.event_shape[0]
    assert len(layers) == sum(model06.LAYERS)


def test_residual_branches_start_scaled_down():
    """Each residual branch's last convolution, and z's projection, start at 1/sqrt(number of branches) of
    PyTorch's default scale (uniform in +-1/sqrt(fan_in)), so that the state's variance does not grow with depth."""
    torch.manual_seed(0)
    model = model06.VAE(model06.LogisticObservation())
    cells = [m for m in model.modules() if isinstance(m, model06.ResidualCell)]
    assert len(cells) == sum(model06.LAYERS) + model06.ENCODER_CELLS * len(model06.RESOLUTIONS)
    scale = 1 / math.sqrt(len(cells))
    convs = [cell.branch[-1] for cell in cells] + [block.z_proj for block in model.blocks]
    for conv in convs:
        default = 1 / math.sqrt(conv.weight[0].numel())  # kaiming_uniform_(a=sqrt(5)) bound
        assert 0.8 * scale * default < conv.weight.abs().max() <= scale * default


def test_the_top_down_state_keeps_its_scale_with_depth():
    torch.manual_seed(0)
    x = pixels(4)
    spread = {}
    for layers in [(1, 1, 1, 1), (4, 8, 8, 8)]:
        model = model06.VAE(model06.LogisticObservation(), layers=layers)
        with torch.no_grad():
            spread[layers] = model.top_down(4, model.encode(x))[0].std().item()
    assert 0.75 < spread[(4, 8, 8, 8)] / spread[(1, 1, 1, 1)] < 1.5  # without the scaling: sqrt(7)


# ---------------------------------------------------------------------------------------------------
# Latent scales that stay sane (a rare draw ruled model05's first mixture run: a mean bottom-layer rate of 1.3e7 nats)
# ---------------------------------------------------------------------------------------------------
def extreme_outputs(latent_channels, size, value=1e3, seed=0):
    """Raw head outputs of +-value, every sign pattern over the units: (N, 2Z, size, size) for prior and posterior."""
    g = torch.Generator().manual_seed(seed)
    sign = lambda: torch.randint(0, 2, (64, 2 * latent_channels, size, size), generator=g).float() * 2 - 1
    return value * sign(), value * sign()


@pytest.mark.parametrize("value", [1e3, -1e3, 7.0])
def test_extreme_head_outputs_keep_log_sigmas_means_and_kl_bounded(value):
    block = model06.TopDownBlock(16, 8, 4, kernel=3, scale=1.0)
    prior_out, posterior_out = extreme_outputs(4, 4, value)
    prior_out[:, :, 0, 0] = value  # somewhere both heads push the same way: the sum is clamped, not each part
    posterior_out[:, :, 0, 0] = value
    pz, qz = block.latent(prior_out, posterior_out)
    for dist in (pz, qz):
        assert dist.stddev.log().abs().max() <= B + 1e-5 and dist.mean.abs().max() <= M + 1e-5
    kl = kl_divergence(qz, pz)  # (64,): one layer of 4 * 4 * 4 = 64 units
    assert torch.isfinite(kl).all() and kl.max() <= 64 * KL_MAX_PER_UNIT
    assert KL_MAX_PER_UNIT < 4225  # the number the docstring states
    z = qz.rsample()
    assert torch.isfinite(qz.log_prob(z) - pz.log_prob(z)).all()


def test_the_bound_catches_model05s_separately_clamped_posterior():
    """The check above fails for model05's parametrisation: there the posterior's log-std, the prior's plus a
    shift, each clamped to +-5 on its own, reaches 10."""
    prior_out, posterior_out = torch.full((1, 4, 4, 4), 1e3), torch.full((1, 4, 4, 4), 1e3)
    _, qz = model05.TopDownBlock(8, 8, 2, bounds="shift").latent(prior_out, posterior_out)
    assert qz.stddev.log().max() > 2 * model05.LATENT_LOG_SIGMA_BOUND - 1e-3 > B
    _, qz = model06.TopDownBlock(8, 4, 2, kernel=3, scale=1.0).latent(prior_out, posterior_out)
    assert qz.stddev.log().max() <= B + 1e-5


def test_a_model_with_saturated_heads_gives_finite_rates_and_gradients():
    torch.manual_seed(0)
    model, x = model06.VAE(model06.MixtureObservation(), layers=(1, 1, 1, 1)), pixels(3)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):  # prior's means and log-stds at -1e3, posterior's at +1e3, or turned
            block.prior_head[-1].bias.fill_(-1e3 if i % 2 else 1e3)
            block.posterior_head[-1].bias.fill_(1e3 if i % 2 else -1e3)
            block.posterior_head[-1].bias[:block.latent_channels].mul_(-1)
    parts = model.log_weight_parts(x, k=4)
    rate = parts["rate_layers"]  # (4, 3, L)
    assert torch.isfinite(rate).all() and torch.isfinite(parts["log_px_z"]).all()
    for (z, _, qz), d in zip(model.top_down(3, model.encode(x))[1], reversed(model.latent_dims)):
        assert qz.stddev.log().abs().max() <= B + 1e-5 and z.shape == (3, d)
    (-common.iwae_bound(model, x, k=2)["bound"].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# The layer grid's interface: the top layers kept, the rest redrawn
# ---------------------------------------------------------------------------------------------------
def model_with_dependent_priors(prior_bias=0.0):
    """A small model06 whose priors depend on the layers above (and, with prior_bias, are off N(0, I))."""
    torch.manual_seed(0)
    model = model06.VAE(model06.LogisticObservation(), layers=(1, 1, 1, 1))
    with torch.no_grad():
        for block in model.blocks:
            block.prior_head[-1].weight.normal_(0, 0.1)
            block.prior_head[-1].bias.normal_(0, prior_bias)
    return model


def test_top_layers_are_kept_and_the_rest_redrawn():
    model = model_with_dependent_priors()
    _, layers = model.top_down(4)
    z_all = [z for z, _, _ in layers]
    assert torch.equal(model.generate(4, z_top=z_all).mean, model.generate(4, z_top=z_all).mean)
    _, again = model.top_down(4, z_top=z_all[:2])
    assert all(torch.equal(a[0], b) for a, b in zip(again[:2], z_all[:2]))
    assert not torch.equal(again[2][0], z_all[2])


def test_layer_grid_layout(tmp_path):
    from PIL import Image
    model = model06.VAE(model06.LogisticObservation(), layers=(1, 1, 1, 1))
    assert evaluation.save_layer_grid(model, tmp_path, "m", eval_pmf=True, rows=2, draws=3) == "exact"
    columns = 1 + 3 * 3  # the row's draw, then 3 redraws below each of the top three layers
    assert Image.open(tmp_path / "m_layers.png").size == (1 + columns * 33, 1 + 2 * 33)


def test_temperature_scales_the_prior_spread_of_every_layer():
    model = model_with_dependent_priors(prior_bias=0.5)
    first, second = (model.generate(3, temperature=0.0).mean for _ in range(2))
    assert torch.allclose(first, second)  # t = 0: every layer at its prior mean, nothing random left
    noise = {}
    for t in (1.0, 0.5):  # the same noise: each layer's draw is t times as many of its own prior's std from its mean
        torch.manual_seed(1)
        noise[t] = [(z - pz.mean) / pz.stddev for z, pz, _ in model.top_down(3, temperature=t)[1]]
    assert all(torch.allclose(half, 0.5 * full, atol=1e-5) for half, full in zip(noise[0.5], noise[1.0]))
    torch.manual_seed(2)  # t = 1 is plain ancestral sampling from the prior, draw for draw
    h, plain = model.initial_state(3), []
    for block in model.blocks:
        pz, _ = block.latent(block.prior_net(h))
        plain.append(pz.rsample())
        h = block.update(h, plain[-1])
    torch.manual_seed(2)
    assert all(torch.equal(z, p) for (z, _, _), p in zip(model.top_down(3, temperature=1.0)[1], plain))


def test_temperature_rows_hold_means_then_draws_of_the_same_z():
    torch.manual_seed(0)
    model = model06.VAE(model06.LogisticObservation(), layers=(1, 1, 1, 1))
    rows = evaluation.temperature_rows(model, eval_pmf=True, temperatures=(1.0, 0.0), columns=3)
    assert rows.shape == (2, 6, 3, 32, 32)
    cold = rows[1]  # t = 0: z is the prior's mean, so the means repeat and the draws differ around them
    assert torch.allclose(cold[0], cold[1]) and not torch.equal(cold[3], cold[4])
    assert not torch.allclose(rows[0][0], rows[0][1])  # t = 1: three different z


def test_every_temperature_row_draws_the_same_noise_and_the_grid_follows_the_callers_seed():
    torch.manual_seed(0)
    model = model06.VAE(model06.LogisticObservation(), layers=(1, 1, 1, 1))
    torch.manual_seed(3)
    rows = evaluation.temperature_rows(model, eval_pmf=True, temperatures=(0.8, 0.8, 1.0), columns=3)
    after = torch.get_rng_state()
    assert torch.equal(rows[0], rows[1])  # one column is one sample, cooled or not
    torch.manual_seed(3)
    torch.randint(2 ** 31, ())
    assert torch.equal(torch.get_rng_state(), after)  # the caller's generator moved by the one draw of the seed
    torch.manual_seed(3)
    assert torch.equal(evaluation.temperature_rows(model, eval_pmf=True, temperatures=(1.0,), columns=3)[0], rows[2])
    torch.manual_seed(4)
    assert not torch.equal(evaluation.temperature_rows(model, eval_pmf=True, temperatures=(1.0,), columns=3)[0], rows[2])


# ---------------------------------------------------------------------------------------------------
# main([...]) on tiny fake CIFAR-10 (20 training images per file: 100 images)
# ---------------------------------------------------------------------------------------------------
def args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--max-steps", "2", "--eval-samples", "2",
            "--eval-limit", "4", "--curve-images", "4", "--device", "cpu", "--no-compile", "--epochs", "1",
            "--batch-size", "8", "--no-download", *extra]


# The mixture's layer grid is of Monte Carlo means (100 draws an image), so its run has fewer layers; the
# logistic's means are exact, so its run has the default ones.
@pytest.mark.parametrize("flags,name,layers", [(["--layers", "1", "2", "1", "1"], "model06_mixture", (1, 2, 1, 1)),
                                               (["--obs", "logistic", "--unbounded"], "model06_logistic_unbounded",
                                                model06.LAYERS)])
def test_smoke_run_writes_grids_and_results(cifar_bin_dir, tmp_path, flags, name, layers):
    out = tmp_path / "out"
    assert model06.main(args(cifar_bin_dir, out, *flags)) == 0
    for grid in GRIDS:
        assert (out / f"{name}_{grid}.png").stat().st_size > 0
    res = json.loads((out / f"{name}_results.json").read_text())
    assert res["model"] == name and res["dataset"] == "cifar10" and res["steps"] == 2 and res["eval_images"] == 4
    assert math.isfinite(res["test_bpd"]) and res["test_bpd"] > 0
    balance = res["test_balance"]
    assert len(balance["rate_per_layer_nats"]) == sum(layers) and balance["latent_units"] == dims(layers)
    assert all(math.isfinite(r) for r in balance["rate_per_layer_nats"])
    assert res["command"].startswith("python model06.py --data-dir")
    assert res["skip_grad_ratio"] == model06.SKIP_GRAD_RATIO


def test_an_abbreviated_flag_is_refused(capsys):
    """Else `--wid 64` would set --width unseen by --resume and --eval-only, which take the checkpoint's width
    where the command does not name the flag."""
    with pytest.raises(SystemExit):
        model06.parser().parse_args(["--wid", "64"])
    assert "unrecognized arguments: --wid" in capsys.readouterr().err


def test_eval_only_takes_the_widths_the_checkpoint_holds(cifar_bin_dir, tmp_path, capsys):
    """--eval-only builds the networks at the checkpoint's --width and --bottleneck where the command leaves them
    out (and refuses another width named); a checkpoint written before those flags existed holds model06's first
    sizes (OLDER_CHECKPOINTS)."""
    flags = ["--obs", "logistic", "--layers", "1", "1", "1", "1"]
    first = [str(model06.OLDER_CHECKPOINTS[key]) for key in ("width", "bottleneck")]
    assert first != [str(model06.CHANNELS), str(model06.BOTTLENECK)]  # else this test shows nothing
    run = tmp_path / "run"
    assert model06.main(args(cifar_bin_dir, run, "--width", first[0], "--bottleneck", first[1], *flags)) == 0
    trained = json.loads((run / "model06_logistic_results.json").read_text())["parameters"]
    ckpt = run / "model06_logistic_checkpoint.pt"
    blob = torch.load(ckpt, weights_only=False)
    del blob["config"]["width"], blob["config"]["bottleneck"]
    torch.save(blob, tmp_path / "older.pt")
    for checkpoint in (ckpt, tmp_path / "older.pt"):
        out = tmp_path / checkpoint.stem
        assert model06.main(args(cifar_bin_dir, out, "--eval-only", "--checkpoint", str(checkpoint), *flags)) == 0
        res = json.loads((out / "model06_logistic_results.json").read_text())
        assert (res["parameters"], [str(res["width"]), str(res["bottleneck"])]) == (trained, first)
    older = ["--eval-only", "--checkpoint", str(tmp_path / "older.pt"), "--width", str(model06.CHANNELS), *flags]
    assert model06.main(args(cifar_bin_dir, tmp_path / "refused", *older)) == 2
    assert f"trained with --width {first[0]}, and this command asks for --width {model06.CHANNELS}" in (
        capsys.readouterr().err)


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        model06.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Chapter 6" in text
    assert f"stochastic layers at 1x1, 4x4, 8x8, 16x16 (default: {list(model06.LAYERS)})" in text
    assert "(default: mixture)" in text


@pytest.mark.parametrize("flags,message", [(["--unbounded"], "--unbounded"),
                                           (["--obs", "logistic", "--components", "5"], "--components")])
def test_bad_combinations_are_errors(cifar_bin_dir, tmp_path, capsys, flags, message):
    assert model06.main(args(cifar_bin_dir, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags", [["--obs", "gaussian"], ["--layers", "1", "2", "3"],
                                   ["--layers", "0", "1", "1", "1"]])
def test_bad_flags_are_errors(flags):
    with pytest.raises(SystemExit) as exit_:
        model06.main(flags)
    assert exit_.value.code == 2
