"""model02-04 end to end on tiny fake CIFAR-10 / SVHN files, through main([...])."""
import json
import math
import types

import pytest
import torch

import model02
import model03
import model04
import training
from conftest import write_svhn

GRIDS = ["imgs", "recs", "samples", "samples_var"]


def args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--eval-samples", "2", "--eval-limit", "6",
            "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--no-download", *extra]


@pytest.mark.parametrize("script,flags,name", [
    (model02, [], "model02"), (model02, ["--unbounded"], "model02_unbounded"),
    (model03, [], "model03"), (model03, ["--unbounded"], "model03_unbounded"),
    (model04, [], "model04"),
])
def test_smoke_run_writes_grids_and_results(cifar_bin_dir, tmp_path, script, flags, name):
    out = tmp_path / "out"
    assert script.main(args(cifar_bin_dir, out, "--max-steps", "2", *flags)) == 0
    for grid in GRIDS:
        assert (out / f"{name}_{grid}.png").stat().st_size > 0
    res = json.loads((out / f"{name}_results.json").read_text())
    assert res["dataset"] == "cifar10" and res["steps"] == 2 and res["eval_images"] == 6
    assert math.isfinite(res["test_bpd"]) and res["test_bpd"] > 0
    assert res["test_bpd"] == pytest.approx(-res["test_llh_nats"] / (3072 * math.log(2)))
    assert res["command"].startswith(f"python {script.__name__}.py --data-dir")
    assert res["samples_mean"] == ("monte carlo, 100 draws" if name == "model04" else "exact")


def test_svhn(tmp_path):
    write_svhn(tmp_path)
    assert model03.main(args(tmp_path, tmp_path / "out", "--max-steps", "1", "--dataset", "svhn")) == 0
    assert json.loads((tmp_path / "out" / "model03_results.json").read_text())["dataset"] == "svhn"


def test_unbounded_flag_changes_the_observation_model():
    z = torch.randn(2, model03.LATENT_DIM)
    torch.manual_seed(0)
    bounded = model03.VAE(model03.LogisticObservation(bounded=True))
    torch.manual_seed(0)
    unbounded = model03.VAE(model03.LogisticObservation(bounded=False))
    with torch.no_grad():
        unbounded.decoder.net[-1].bias.fill_(-5.0)  # a tiny log-scale, which only the unbounded model allows
        bounded.decoder.net[-1].bias.fill_(-5.0)
        s_bounded, s_unbounded = bounded.decode(z).log_scale, unbounded.decode(z).log_scale
    variance = lambda log_scale: (2 * log_scale).exp() * math.pi ** 2 / 3
    assert variance(s_bounded).min() >= math.exp(-1) - 1e-6
    assert variance(s_unbounded).max() < math.exp(-1)


def test_gaussian_bound_is_exp_minus_one():
    obs_bounded, obs_free = model02.GaussianObservation(True), model02.GaussianObservation(False)
    out = torch.cat([torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), -30.0)], dim=1)
    assert obs_bounded(out).log_var.min() >= -1.0
    assert obs_free(out).log_var.max() == -30.0


def test_huge_steps_are_skipped_and_counted(cifar_bin_dir, tmp_path):
    out = tmp_path / "out"
    assert model03.main(args(cifar_bin_dir, out, "--max-steps", "3", "--skip-grad-norm", "1e-12")) == 0
    res = json.loads((out / "model03_results.json").read_text())
    assert res["skipped_steps"] == 3 and res["steps"] == 3


def test_many_skips_in_a_row_stop_the_run_and_the_stop_is_a_result(cifar_bin_dir, tmp_path, capsys):
    code = model02.main(args(cifar_bin_dir, tmp_path, "--skip-grad-norm", "1e-12", "--max-skips", "4"))
    assert code == 2
    err = capsys.readouterr().err
    assert "Training diverged: 4 steps in a row" in err and "Traceback" not in err
    res = json.loads((tmp_path / "model02_results.json").read_text())
    assert res["stopped_by_guard"]["step"] == 4 and res["stopped_by_guard"]["skipped_in_a_row"] == 4
    assert res["shortened"] and res["steps"] == 4 and math.isfinite(res["test_bpd"])
    assert (tmp_path / "model02_samples_var.png").exists()
    # --eval-only on the guard's checkpoint gives the result back, with the stop recorded
    assert model02.main(args(cifar_bin_dir, tmp_path, "--eval-only")) == 0
    again = json.loads((tmp_path / "model02_results.json").read_text())
    assert again["stopped_by_guard"] == res["stopped_by_guard"] and again["steps"] == 4


def test_mixture_needs_rgb():
    with pytest.raises(Exception, match="3 channels"):
        model04.MixtureObservation().num_params(1)


def test_a_step_far_above_the_recent_gradient_norms_is_skipped(tmp_path):
    """--skip-grad-ratio: the gradient norms are 1, 1.1, 1.2, ... except one of 1000 at step 120; with the ratio
    guard that step (and only it) is skipped and listed, without it every step is taken."""
    def run(ratio):
        calls = [0]

        model = torch.nn.Linear(1, 1, bias=False)

        def loss(x):
            calls[0] += 1
            scale = 1000.0 if calls[0] == 120 else 1.0 + 0.1 * (calls[0] % 3)
            return scale * model.weight.sum()
        data = types.SimpleNamespace(train=torch.zeros(150, 1), train_batch=lambda x: x)
        plan = training.Plan(batch_size=1, epochs=1, lr_at=training.constant_lr, base_lr=1e-3)
        return training.train(model, training.make_optimizer(model, 1e-3), loss, data, training.TrainState(), plan,
                              training.Sitting(str(tmp_path / f"ratio{ratio}.pt"), {}),
                              training.SkipGuard(ratio=ratio), progress=False)

    guarded = run(10.0)
    assert guarded.step == 150 and guarded.skipped_steps == 1 and len(guarded.skips) == 1
    assert guarded.skips[0]["step"] == 120 and guarded.skips[0]["grad_norm"] == pytest.approx(1000.0)
    assert guarded.skips[0]["threshold"] == pytest.approx(11.0)  # 10 x the median of 1, 1.1, 1.2, ...
    assert len(guarded.recent_grad_norms) == training.GRAD_NORM_WINDOW
    assert run(math.inf).skipped_steps == 0


def test_a_lasting_rise_of_the_gradient_norm_is_followed_not_skipped_until_the_run_stops(tmp_path):
    """The gradient norm is 1 for 120 steps, then 20 for good (as a free scale sharpens): the ratio guard skips the
    first steps of the rise, until the skipped norms are half the window, then takes every step; a median of the
    steps taken only would stay at 1 and stop the run after 100 skips in a row."""
    model = torch.nn.Linear(1, 1, bias=False)
    calls = [0]

    def loss(x):
        calls[0] += 1
        return (1.0 if calls[0] <= 120 else 20.0) * model.weight.sum()
    data = types.SimpleNamespace(train=torch.zeros(300, 1), train_batch=lambda x: x)
    plan = training.Plan(batch_size=1, epochs=1, lr_at=training.constant_lr, base_lr=1e-3)
    state = training.train(model, training.make_optimizer(model, 1e-3), loss, data, training.TrainState(), plan,
                           training.Sitting(str(tmp_path / "rise.pt"), {}), training.SkipGuard(ratio=10.0),
                           progress=False)
    assert state.stopped_by_guard is None and state.step == 300
    assert state.skipped_steps == training.GRAD_NORM_WINDOW // 2  # steps 121-170; at 171 the median is 10.5
    assert [s["step"] for s in state.skips] == list(range(121, 121 + training.GRAD_NORM_WINDOW // 2))


def test_evaluation_is_float32_whatever_the_training_precision(cifar_bin_dir, tmp_path):
    """--amp trains the networks in bf16; scoring a checkpoint must not depend on it (the results say so)."""
    assert model03.main(args(cifar_bin_dir, tmp_path / "run", "--max-steps", "2", "--no-compile")) == 0
    ckpt = str(tmp_path / "run" / "model03_checkpoint.pt")
    found = {}
    for amp in ["--amp", "--no-amp"]:
        out = tmp_path / amp
        assert model03.main(args(cifar_bin_dir, out, "--eval-only", "--checkpoint", ckpt, "--no-compile", amp)) == 0
        found[amp] = json.loads((out / "model03_results.json").read_text())
    assert found["--amp"]["test_llh_nats"] == found["--no-amp"]["test_llh_nats"]
    assert found["--amp"]["settings"]["amp"] and found["--amp"]["settings"]["eval_dtype"] == "float32"
    assert not found["--amp"]["settings"]["tf32"]  # TF32 is for CUDA, and only with --amp


def test_beta_vae_fixes_the_variance_and_trains_on_beta_times_the_elbo(cifar_bin_dir, tmp_path, capsys):
    model = model02.build_model(model02.parser().parse_args(["--beta", "0.25"]))
    px_z = model.observation(torch.zeros(2, 3, 4, 4))  # the decoder gives the loc alone
    assert torch.allclose(px_z.log_var, torch.full((2, 3, 4, 4), math.log(0.25)))
    x = torch.rand(5, 3, 32, 32)
    make_loss, name = model02.beta_vae_objective(0.25)
    torch.manual_seed(0)
    loss = make_loss(model)(x)
    torch.manual_seed(0)
    elbo = model02.common.iwae_bound(model, x, 1)["bound"].mean()
    assert loss.item() == pytest.approx(-0.25 * elbo.item(), rel=1e-6) and "not a bound" in name
    out = tmp_path / "out"
    assert model02.main(args(cifar_bin_dir, out, "--max-steps", "2", "--beta", "0.3679")) == 0
    res = json.loads((out / "model02_beta0.3679_results.json").read_text())
    assert res["objective"].startswith("beta-VAE") and math.isfinite(res["test_bpd"])
    capsys.readouterr()
    assert model02.main(args(cifar_bin_dir, out, "--beta", "0.5", "--unbounded")) == 2
    assert "--beta fixes the variance" in capsys.readouterr().err


@pytest.mark.parametrize("flags,name,params", [
    (["--components", "1"], "model04_1component", 1 * (1 + 3 * 3)),
    (["--no-autoregression"], "model04_no_autoregression", 10 * (1 + 2 * 3)),
])
def test_the_mixture_taken_apart(cifar_bin_dir, tmp_path, flags, name, params):
    args_ = model04.parser().parse_args(flags)
    observation = model04.build_model(args_).observation
    assert observation.num_params(3) == params
    px_z = observation(torch.randn(2, params, 4, 4))
    assert (px_z.coeffs is None) == ("--no-autoregression" in flags)
    x = torch.randint(0, 256, (2, 3, 4, 4)) / 255
    assert torch.isfinite(px_z.log_prob(x)).all()
    assert model04.main(args(cifar_bin_dir, tmp_path, "--max-steps", "2", *flags)) == 0
    assert (tmp_path / f"{name}_results.json").exists() and not (tmp_path / "model04_results.json").exists()
