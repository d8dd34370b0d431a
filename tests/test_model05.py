"""model05: the top-down machinery against a two-layer linear-Gaussian hierarchy whose p(x) is known in closed
form, the convolutional hierarchy's interface, and main([...]) end to end on tiny fake CIFAR-10."""
import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

import common
import evaluation
import model05

GRIDS = ["imgs", "recs", "samples", "samples_var", "layers"]


# ---------------------------------------------------------------------------------------------------
# A two-layer linear-Gaussian hierarchy through common.HierarchicalVAE's top-down pass
# ---------------------------------------------------------------------------------------------------
class LinearBlock(nn.Module):
    """p(z_i|z_>i) = N(A z_>i + a, s_i^2 I) (A = 0, a = 0, s = 1 at the top); q(z_i|z_>i, x) = the exact
    conditional posterior with its mean shifted and its scale widened, so that the weights vary."""

    def __init__(self, A, a, s, x_map, x_shift, s_x):
        super().__init__()
        self.A, self.a, self.s = A, a, s
        self.x_map, self.x_shift, self.s_x = x_map, x_shift, s_x  # x = x_map z_i + x_shift + N(0, s_x^2) given z_>i
        precision = torch.eye(len(a), dtype=A.dtype) / s ** 2 + x_map.T @ torch.linalg.solve(s_x, x_map)
        self.post_cov = torch.linalg.inv(precision)

    def prior_net(self, h):
        return h @ self.A.T + self.a  # (N, D_i)

    def posterior_net(self, h, x):
        mean_p = self.prior_net(h)
        info = mean_p / self.s ** 2 + torch.linalg.solve(self.s_x, (x - self.x_shift).T).T @ self.x_map
        return info @ self.post_cov.T + 0.3  # exact posterior mean, shifted

    def latent(self, prior_out, posterior_out=None):
        pz = Independent(Normal(prior_out, self.s), 1)
        if posterior_out is None:
            return pz, None
        return pz, Independent(Normal(posterior_out, 1.3 * self.post_cov.diagonal().sqrt()), 1)

    def update(self, h, z):
        return z


class LinearGaussianHierarchy(common.HierarchicalVAE):
    """p(z2) = N(0, I), p(z1|z2) = N(A z2 + a, s1^2 I), p(x|z1) = N(B z1 + b, s^2 I), so that
    p(x) = N(B a + b, B (A A^T + s1^2 I) B^T + s^2 I). Float32, as the networks are; x: (N, 1, 1, x_dim)."""

    def __init__(self, x_dim=4, d1=3, d2=2, s1=0.7, s=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A, self.a = torch.randn(d1, d2, generator=g), torch.randn(d1, generator=g)
        self.B, self.b = torch.randn(x_dim, d1, generator=g), torch.randn(x_dim, generator=g)
        self.s1, self.s = s1, s
        eye = lambda n: torch.eye(n)
        # q(z2|x): x = (BA) z2 + (Ba + b) + noise of covariance s1^2 B B^T + s^2 I
        top = LinearBlock(torch.zeros(d2, 1), torch.zeros(d2), 1.0, self.B @ self.A, self.B @ self.a + self.b,
                          s1 ** 2 * self.B @ self.B.T + s ** 2 * eye(x_dim))
        bottom = LinearBlock(self.A, self.a, s1, self.B, self.b, s ** 2 * eye(x_dim))  # q(z1|z2, x)
        self.blocks = nn.ModuleList([top, bottom])
        self.encoder = nn.Flatten()  # the "bottom-up features" are x itself, for both blocks
        self.dummy = nn.Parameter(torch.zeros(1))  # device() needs a parameter

    def encode(self, x):
        features = super().encode(x)
        return [features, features]

    def initial_state(self, n):
        return torch.zeros(n, 1)

    def decode(self, h):
        loc = (h @ self.B.T + self.b).unflatten(-1, (1, 1, -1))  # (*, 1, 1, x_dim)
        return Independent(Normal(loc, self.s), 3)

    def exact_log_px(self, x):
        A, B = self.A.double(), self.B.double()
        eye = lambda n: torch.eye(n, dtype=torch.float64)
        cov = B @ (A @ A.T + self.s1 ** 2 * eye(len(A))) @ B.T + self.s ** 2 * eye(len(B))
        return MultivariateNormal(B @ self.a.double() + self.b.double(), cov).log_prob(x.flatten(1).double())


@pytest.fixture
def hierarchy():
    torch.manual_seed(1)
    model = LinearGaussianHierarchy()
    z2 = torch.randn(16, 2)
    z1 = z2 @ model.A.T + model.a + model.s1 * torch.randn(16, 3)
    x = (z1 @ model.B.T + model.b + model.s * torch.randn(16, 4)).view(16, 1, 1, 4)
    return model, x


def test_estimator_recovers_the_exact_log_likelihood(hierarchy):
    model, x = hierarchy
    exact = model.exact_log_px(x)
    torch.manual_seed(0)
    est = torch.stack([common.estimate_log_likelihood(model, x, 2000, max_rows=5000, progress=False)
                       for _ in range(10)])  # 2000 samples each, 2 images per chunk of 5000 rows
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(len(est))
    assert ((mean - exact).abs() < 4 * stderr + 1e-3).all()
    assert stderr.max() < 0.05  # the tolerance stays tight
    # with one sample the estimate is the ELBO, visibly below log p(x): the check above can fail
    est_1 = torch.stack([common.estimate_log_likelihood(model, x, 1, progress=False) for _ in range(10)])
    assert not ((est_1.mean(0) - exact).abs() < 4 * est_1.std(0) / math.sqrt(10) + 1e-3).all()


def test_k1_is_the_elbo_written_from_the_formulas(hierarchy):
    model, x = hierarchy
    torch.manual_seed(0)
    out = common.iwae_bound(model, x, k=1)
    torch.manual_seed(0)  # the same draws, in the same order: z2 ~ q(z2|x), then z1 ~ q(z1|z2, x)
    top, bottom = model.blocks
    x_flat = x.flatten(1)
    _, q2 = top.latent(torch.zeros(16, 2), top.posterior_net(torch.zeros(16, 1), x_flat))
    z2 = q2.rsample()
    _, q1 = bottom.latent(bottom.prior_net(z2), bottom.posterior_net(z2, x_flat))
    z1 = q1.rsample()
    normal = lambda value, loc, scale: Normal(loc, scale).log_prob(value).sum(-1)
    elbo = (normal(x_flat, z1 @ model.B.T + model.b, model.s) + normal(z1, z2 @ model.A.T + model.a, model.s1)
            + normal(z2, 0.0, 1.0) - q1.log_prob(z1) - q2.log_prob(z2))
    assert torch.allclose(out["bound"], elbo, atol=1e-4)
    assert torch.allclose(out["bound"], -out["rate"] - out["distortion"], atol=1e-4)


def test_layer_rates_add_up_and_the_top_one_averages_to_its_kl(hierarchy):
    model, x = hierarchy
    torch.manual_seed(0)
    parts = model.log_weight_parts(x, k=20000)
    assert parts["rate_layers"].shape == (20000, 16, 2)
    assert torch.allclose(parts["rate_layers"].sum(-1), parts["log_qz_x"] - parts["log_pz"], atol=1e-4)
    top = model.blocks[0]
    q2 = top.latent(torch.zeros(16, 2), top.posterior_net(torch.zeros(16, 1), x.flatten(1)))[1]
    kl = kl_divergence(q2, Independent(Normal(torch.zeros(2), 1.0), 1))
    assert torch.allclose(parts["rate_layers"][..., -1].mean(0), kl, atol=0.05)  # the last layer is the top one
    assert not torch.allclose(parts["rate_layers"][..., 0].mean(0), kl, atol=0.05)


# ---------------------------------------------------------------------------------------------------
# The convolutional hierarchy
# ---------------------------------------------------------------------------------------------------
def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


@pytest.mark.parametrize("observation", [model05.MixtureObservation(), model05.LogisticObservation()])
def test_interface_shapes_rates_and_gradients(observation):
    torch.manual_seed(0)
    model, x = model05.VAE(observation, layers=3), pixels(4)
    parts = model.log_weight_parts(x, k=2, eval_pmf=True)
    for key in ["log_px_z", "log_pz", "log_qz_x"]:
        assert parts[key].shape == (2, 4) and torch.isfinite(parts[key]).all(), key
    assert parts["rate_layers"].shape == (2, 4, 3)
    assert torch.allclose(parts["rate_layers"].sum(-1), parts["log_qz_x"] - parts["log_pz"], rtol=1e-5, atol=1e-3)
    (-common.iwae_bound(model, x, k=3)["bound"].mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.generate(5).batch_shape == (5,) and model.reconstruct(x).batch_shape == (4,)
    means = model.posterior_means(x)
    assert [tuple(m.shape) for m in means] == [(4, 512), (4, 128), (4, 128)] == [(4, d) for d in model.latent_dims]


@pytest.mark.parametrize("layers,dims", [(1, [128]), (2, [512, 128]), (4, [512, 512, 128, 128])])
def test_layers_at_two_resolutions(layers, dims):
    model = model05.VAE(model05.LogisticObservation(), layers=layers)
    x = pixels(2)
    assert model.log_weight_parts(x, k=3)["rate_layers"].shape == (3, 2, layers)
    assert [m.shape[1] for m in model.posterior_means(x)] == dims


def test_channels_last_gives_the_same_log_weights():
    torch.manual_seed(0)
    model, x = model05.VAE(model05.MixtureObservation()), pixels(3)
    torch.manual_seed(1)
    plain = common.log_weights(model, x, k=2)
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    cl = common.log_weights(model, x.contiguous(memory_format=torch.channels_last), k=2)
    for key in ["log_w", "rate_layers"]:
        assert torch.allclose(plain[key], cl[key], rtol=1e-4, atol=1e-2), key


def test_bf16_networks_give_float32_log_weights():
    torch.manual_seed(0)
    model, x = model05.VAE(model05.MixtureObservation(), layers=2), pixels(2)
    torch.manual_seed(1)
    full = model.log_weight_parts(x, k=2)
    model.amp_dtype = torch.bfloat16
    torch.manual_seed(1)
    half = model.log_weight_parts(x, k=2)
    for key, value in half.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert torch.allclose(half["log_px_z"], full["log_px_z"], rtol=0.05)  # bf16 networks, the same model


def test_top_layers_are_kept_and_the_rest_redrawn():
    torch.manual_seed(0)
    model = model05.VAE(model05.LogisticObservation(), layers=3)
    _, layers = model.top_down(4)
    z_all = [z for z, _, _ in layers]
    same = model.generate(4, z_top=z_all).mean, model.generate(4, z_top=z_all).mean
    assert torch.equal(*same)  # every layer given: nothing is drawn
    _, again = model.top_down(4, z_top=z_all[:2])
    assert all(torch.equal(a[0], b) for a, b in zip(again[:2], z_all[:2]))
    assert not torch.equal(again[2][0], z_all[2])


def test_posterior_starts_as_a_shift_of_the_prior():
    block = model05.TopDownBlock(8, 8, 2, bounds="shift")
    prior_out = torch.cat([torch.full((1, 2, 4, 4), 0.5), torch.full((1, 2, 4, 4), -100.0)], dim=1)
    pz, qz = block.latent(prior_out, torch.zeros(1, 4, 4, 4))
    assert torch.equal(pz.mean, qz.mean) and torch.equal(pz.stddev, qz.stddev)
    assert pz.stddev.min() >= math.exp(-model05.LATENT_LOG_SIGMA_BOUND)  # the bound on the log-std holds
    assert pz.batch_shape == (1,) and pz.event_shape == (32,)


def test_joint_latent_bounds_keep_the_posterior_within_chapter_6s_bounds():
    """--latent-bounds joint (chapter 6's) reaches the blocks: means within +-M and log-stds within +-B, whatever
    the heads output (test_model06 shows that shift's posterior log-std reaches 10)."""
    prior_out, posterior_out = torch.full((1, 4, 4, 4), 1e3), torch.full((1, 4, 4, 4), 1e3)
    for sign in (1, -1):
        pz, qz = model05.TopDownBlock(8, 8, 2, bounds="joint").latent(sign * prior_out, sign * posterior_out)
        for d in (pz, qz):
            assert d.stddev.log().abs().max() <= model05.JOINT_LOG_SIGMA_BOUND + 1e-5
            assert d.mean.abs().max() <= model05.JOINT_MEAN_BOUND + 1e-5


def test_unbounded_flag_changes_the_logistic():
    out = torch.cat([torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), -5.0)], dim=1)
    variance = lambda log_scale: (2 * log_scale).exp() * math.pi ** 2 / 3
    assert variance(model05.LogisticObservation(bounded=True)(out).log_scale).min() >= math.exp(-1) - 1e-6
    assert variance(model05.LogisticObservation(bounded=False)(out).log_scale).max() < math.exp(-1)


# ---------------------------------------------------------------------------------------------------
# main([...]) on tiny fake CIFAR-10 (20 training images per file: 100 images, 13 steps of 8 per epoch)
# ---------------------------------------------------------------------------------------------------
def args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--eval-samples", "2", "--eval-limit", "6",
            "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--no-download", *extra]


# The mixture runs eagerly (compiling it costs ~100 s here; model04's test compiles the same observation model);
# the logistic run goes through torch.compile, which sees the same top-down pass.
@pytest.mark.parametrize("flags,name", [(["--no-compile"], "model05_mixture"),
                                        (["--obs", "logistic", "--unbounded"], "model05_logistic_unbounded")])
def test_smoke_run_writes_grids_and_results(cifar_bin_dir, tmp_path, flags, name):
    out = tmp_path / "out"
    assert model05.main(args(cifar_bin_dir, out, "--max-steps", "2", *flags)) == 0
    for grid in GRIDS:
        assert (out / f"{name}_{grid}.png").stat().st_size > 0
    res = json.loads((out / f"{name}_results.json").read_text())
    assert res["model"] == name and res["dataset"] == "cifar10" and res["steps"] == 2 and res["eval_images"] == 6
    assert math.isfinite(res["test_bpd"]) and res["test_bpd"] > 0
    assert res["command"].startswith("python model05.py --data-dir")


def test_layer_grid_layout(tmp_path):
    from PIL import Image
    model = model05.VAE(model05.LogisticObservation(), layers=3)
    assert evaluation.save_layer_grid(model, tmp_path, "m", eval_pmf=True, rows=2, draws=3) == "exact"
    columns = 1 + 2 * 3  # the row's draw, then 3 redraws of z_1, then 3 of z_2 and z_1
    assert Image.open(tmp_path / "m_layers.png").size == (1 + columns * 33, 1 + 2 * 33)


def test_resume_continues_exactly(cifar_bin_dir, tmp_path):
    # 100 images / 8 = 13 steps per epoch: stop at step 2, resume to step 4
    common_flags = ["--obs", "logistic", "--layers", "2", "--no-compile"]
    assert model05.main(args(cifar_bin_dir, tmp_path / "a", "--max-steps", "4", *common_flags)) == 0
    assert model05.main(args(cifar_bin_dir, tmp_path / "b", "--max-steps", "2", *common_flags)) == 0
    assert model05.main(args(cifar_bin_dir, tmp_path / "b", "--max-steps", "4", "--resume", *common_flags)) == 0
    a = torch.load(tmp_path / "a" / "model05_logistic_checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "model05_logistic_checkpoint.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("flags,message", [(["--unbounded"], "--unbounded"),
                                           (["--obs", "logistic", "--components", "5"], "--components")])
def test_bad_combinations_are_errors(cifar_bin_dir, tmp_path, capsys, flags, message):
    assert model05.main(args(cifar_bin_dir, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flags_are_errors():
    with pytest.raises(SystemExit) as exit_:
        model05.main(["--obs", "gaussian"])
    assert exit_.value.code == 2


def test_resume_and_eval_only_take_the_latent_bounds_the_checkpoint_holds(cifar_bin_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """--eval-only and --resume take --latent-bounds from the checkpoint where the command leaves it out (a
    checkpoint written before the flag existed: shift) and refuse another value named on the command line."""
    flags = ["--obs", "logistic", "--layers", "2", "--no-compile"]
    run = tmp_path / "run"
    assert model05.main(args(cifar_bin_dir, run, "--max-steps", "2", "--latent-bounds", "joint", *flags)) == 0
    ckpt = run / "model05_logistic_checkpoint.pt"
    assert json.loads((run / "model05_logistic_results.json").read_text())["latent_bounds"] == "joint"
    used = []
    for bounds in ("shift", "joint"):
        monkeypatch.setitem(model05.LATENTS, bounds, lambda *a, bounds=bounds, f=model05.LATENTS[bounds]:
                            used.append(bounds) or f(*a))

    def evaluate(checkpoint, *extra):
        used.clear()
        out = tmp_path / "eval"
        rc = model05.main(args(cifar_bin_dir, out, "--eval-only", "--checkpoint", str(checkpoint), *flags, *extra))
        return rc and (rc, capsys.readouterr().err) or (
            json.loads((out / "model05_logistic_results.json").read_text())["latent_bounds"], set(used))
    assert evaluate(ckpt) == ("joint", {"joint"})
    blob = torch.load(ckpt, weights_only=False)
    del blob["config"]["latent_bounds"]  # as the shipped checkpoints of chapter 5, written before the flag
    torch.save(blob, tmp_path / "older.pt")
    assert evaluate(tmp_path / "older.pt") == ("shift", {"shift"})
    rc, err = evaluate(tmp_path / "older.pt", "--latent-bounds", "joint")
    assert rc == 2 and "trained with --latent-bounds shift, and this command asks for --latent-bounds joint" in err
    import results  # the summary figure and the temperature grid's redraw build models the same way
    assert results.model_from_checkpoint("model05_logistic", ckpt).blocks[0].bounds == "joint"
    assert results.model_from_checkpoint("model05_logistic", tmp_path / "older.pt").blocks[0].bounds == "shift"
    capsys.readouterr()
    assert model05.main(args(cifar_bin_dir, run, "--max-steps", "4", "--resume", "--latent-bounds=shift", *flags)) == 2
    assert "--latent-bounds joint" in capsys.readouterr().err
    assert model05.main(args(cifar_bin_dir, run, "--max-steps", "3", "--resume", *flags)) == 0
    assert torch.load(ckpt, weights_only=False)["config"]["latent_bounds"] == "joint"
    older = tmp_path / "older_run"
    older.mkdir()
    torch.save(blob, older / "model05_logistic_checkpoint.pt")
    assert model05.main(args(cifar_bin_dir, older, "--max-steps", "3", "--resume", *flags)) == 0
    resumed = torch.load(older / "model05_logistic_checkpoint.pt", weights_only=False)
    assert resumed["config"]["latent_bounds"] == "shift"
