"""Long runs: --time-limit and sittings, the per-epoch test curve, the schedule, dequantization and the
rate/distortion/active-unit statistics in the results."""
import json
import math

import pytest
import torch

import common
import data
import evaluation
import model01
import model02
import model03
import training

NO_COMPILE = ["--no-compile"]  # these tests are about the run's bookkeeping; test_speed_paths checks compile


def mnist_args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--eval-samples", "3", "--eval-limit", "8",
            "--device", "cpu", "--epochs", "2", "--batch-size", "16", "--no-download", *NO_COMPILE, *extra]


def test_time_limit_stops_cleanly_and_resume_finishes(mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert model01.main(mnist_args(mnist_dir, out, "--time-limit", "0.000001")) == 0
    printed = capsys.readouterr().out
    assert "stopped at the time limit" in printed and "--resume" in printed
    assert (out / "model01_checkpoint.pt").exists() and not (out / "model01_results.json").exists()
    resume = printed.split("Resume with:")[1].split()  # the exact command it printed
    assert resume[:2] == ["python", "model01.py"]
    argv = [a for a in resume[2:]]
    argv[argv.index("--time-limit") + 1] = "60"
    assert model01.main(argv) == 0
    res = json.loads((out / "model01_results.json").read_text())
    assert res["steps"] == res["planned_steps"] == 8 and not res["shortened"]
    assert len(res["train_segments"]) == 2
    first, second = res["train_segments"]
    assert first["first_step"] == 0 and first["last_step"] == second["first_step"] and second["last_step"] == 8
    assert all(s["hardware"].startswith("CPU") and s["end"] for s in res["train_segments"])
    assert first["command"].startswith("python model01.py --data-dir") and "--time-limit 0.000001" in first["command"]
    assert second["command"] == "python model01.py " + " ".join(argv) == res["command"]
    # resuming the finished run evaluates it again without a new (empty) training segment
    assert model01.main(argv) == 0
    again = json.loads((out / "model01_results.json").read_text())
    assert again["train_segments"] == res["train_segments"] and again["steps"] == 8
    assert again["settings"]["eval_max_rows"] == model01.EVAL_MAX_ROWS  # the CPU's default, as resolved


def test_per_epoch_curve_balance_and_colour_figure(cifar_bin_dir, tmp_path):
    # 20 fake training images in batches of 8: 3 steps an epoch, 2 epochs
    out = tmp_path / "out"
    argv = ["--data-dir", str(cifar_bin_dir), "--out-dir", str(out), "--eval-samples", "2", "--eval-limit", "6",
            "--device", "cpu", "--epochs", "2", "--batch-size", "8", "--no-download", "--curve-images", "5",
            "--s-sweep", "1", "3", "--s-sweep-images", "4", *NO_COMPILE]
    assert model03.main(argv) == 0
    res = json.loads((out / "model03_results.json").read_text())
    assert [row["epoch"] for row in res["test_curve"]] == [1, 2]
    for row in res["test_curve"]:
        assert row["elbo_nats"] == pytest.approx(-row["rate_nats"] - row["distortion_nats"], rel=1e-5)
        assert row["elbo_bpd"] == pytest.approx(common.bits_per_dim(row["elbo_nats"], 3072))
    b = res["test_balance"]
    assert b["images"] == 6 and b["latent_units"] == [model03.LATENT_DIM] and 0 <= b["active_units"][0] <= 128
    assert b["elbo_nats"] == pytest.approx(-b["rate_nats"] - b["distortion_nats"], rel=1e-6)
    assert sum(b["rate_per_layer_nats"]) == pytest.approx(b["rate_nats"], rel=1e-6)
    assert math.isfinite(b["mean_log_scale"])
    assert [s["S"] for s in res["s_sweep"]] == [1, 3] and all(s["images"] == 4 for s in res["s_sweep"])
    assert (out / "colour_curves.png").stat().st_size > 0
    assert res["parameters"] == sum(p.numel() for p in model03.VAE(model03.LogisticObservation()).parameters())
    t = res["image_stats"]
    fake_test = data.load_cifar10(str(cifar_bin_dir), download=False).test
    assert t["images"] == res["eval_images"] == 6  # the evaluated test images (at most IMAGE_STATS_IMAGES)
    assert t["roughness_levels"]["data"] == pytest.approx(
        evaluation.roughness(fake_test[:t["images"]].float() / 255).double().mean().item(), rel=1e-5)
    assert set(t["roughness_levels"]) == {"data", "reconstruction_means", "sample_means", "draws"}
    assert all(0 <= v <= 255 for v in t["roughness_levels"].values())


def test_active_units_count_only_units_whose_mean_moves():
    """Burda et al.'s criterion: Cov_x E_q[z_u] > 0.01. Units whose posterior mean ignores x are inactive."""
    torch.manual_seed(0)
    model = model03.VAE(model03.LogisticObservation())
    last = model.encoder.net[-1]  # Linear -> (mu, log_sigma)
    with torch.no_grad():
        last.weight[:64].zero_()  # mu_0..63 = bias: the same for every image
        last.weight[64:128].normal_(0, 1.0)  # mu_64..127 move a lot with x
    x = torch.randint(0, 256, (50, 3, 32, 32)).float() / 255
    stats = evaluation.balance_stats(model, x, eval_pmf=True)
    assert stats["active_units"] == [64]


class RareHugeRate(torch.nn.Module):
    """Two stochastic layers whose one-sample rates are read off the image: layer 1 is 10 nats but 10^6 for one
    image; layer 2 is the image's index."""
    def log_weight_parts(self, x, k, eval_pmf=False):
        index = x[:, 0, 0, 0]
        bottom = torch.where(index == 3, 1e6, 10.0)
        rate_layers = torch.stack([bottom, index], -1)[None]  # (1, B, 2)
        zeros = torch.zeros(1, len(x))
        return {"log_qz_x": rate_layers.sum(-1), "log_pz": zeros, "log_px_z": zeros, "rate_layers": rate_layers}

    def reconstruct(self, x, eval_pmf=False):
        return common.Gaussian(x, torch.zeros_like(x))

    def posterior_means(self, x):
        return [x.flatten(1)[:, :2], x.flatten(1)[:, :1]]


def test_balance_reports_median_and_largest_rate_beside_the_mean():
    x = torch.arange(9.0)[:, None, None, None].expand(9, 1, 2, 2)
    b = evaluation.balance_stats(RareHugeRate(), x, eval_pmf=False, batch_size=4)
    assert b["rate_per_layer_nats"] == pytest.approx([(8 * 10 + 1e6) / 9, 4.0])
    assert b["rate_per_layer_median_nats"] == [10.0, 4.0] and b["rate_per_layer_max_nats"] == [1e6, 8.0]
    assert b["rate_nats"] == pytest.approx(sum(b["rate_per_layer_nats"]))


def test_roughness_is_the_mean_step_between_neighbouring_pixels_in_levels():
    flat = torch.full((1, 3, 4, 4), 0.5)
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., 1::2] = 1.0  # columns alternate 0, 1: every step across is 255 levels, every step down 0
    across, down = 3 * 4, 4 * 3  # neighbouring pairs
    assert evaluation.roughness(flat).tolist() == [0.0]
    assert evaluation.roughness(stripes).item() == pytest.approx(255 * across / (across + down))
    assert evaluation.roughness(torch.cat([flat[:, :1], stripes])).tolist() == pytest.approx([0.0, 127.5])


class ConstantNoise(torch.nn.Module):
    """p(x|z): the same wide logistic around grey for every z, so its means are flat and its draws speckled."""
    def generate(self, n, eval_pmf=False):
        return common.DiscretizedLogistic(torch.full((n, 3, 8, 8), 0.5), torch.full((n, 3, 8, 8), -2.0))

    def reconstruct(self, x, eval_pmf=False):
        return self.generate(len(x))


def test_image_stats_tell_means_from_draws():
    x = torch.rand(30, 3, 8, 8)
    t = evaluation.image_stats(ConstantNoise(), x, eval_pmf=True, batch_size=7)
    levels = t["roughness_levels"]
    assert t["images"] == 30 and levels["data"] == pytest.approx(evaluation.roughness(x).mean().item(), rel=1e-5)
    assert levels["sample_means"] == pytest.approx(0, abs=1e-3)
    assert levels["reconstruction_means"] == pytest.approx(0, abs=1e-3)
    assert levels["draws"] > 20 and t["roughness_stderr"]["draws"] < 2


def test_one_far_epoch_does_not_set_the_scale_of_the_curves():
    steady = [6.0, 5.5, 5.2, 5.1, 5.0]
    spiked = [5.8, 5.0, 37.5, 4.9, 4.8]
    top = evaluation.curve_top([steady, spiked])
    assert 6.0 < top < 6.2  # the steady curve's worst point, a margin, and not the spike
    assert evaluation.curve_top([steady, [5.8, 5.0, 6.9, 4.9, 4.8]]) > 6.9  # a rise of less than 2 bits stays in view


def test_hold_decay_schedule_has_the_same_shape_at_any_length():
    for total in (100, 10_000):
        lr = lambda f: training.hold_decay_lr(int(f * total), total, 1e-3)
        assert lr(0) == lr(0.49) == 1e-3
        assert lr(0.75) == pytest.approx(1e-3 * 0.1 ** 0.5, rel=0.05)
        assert lr(1.0) == pytest.approx(1e-4)
        assert all(lr(a / 100) >= lr(b / 100) for a, b in zip(range(100), range(1, 101)))


def test_dequantized_values_stay_in_their_bins():
    x = data.to_unit(torch.arange(256, dtype=torch.uint8).repeat(40))
    torch.manual_seed(0)
    y = data.dequantize(x)
    assert torch.equal(torch.round(y * 255), x * 255)  # each value stays in the bin scored as k
    offsets = (y - x) * 255  # uniform on [-1/2, 1/2)
    assert offsets.min() >= -0.5 and offsets.max() < 0.5 and abs(offsets.mean()) < 0.02
    assert offsets.std() == pytest.approx(1 / math.sqrt(12), rel=0.05)


def test_model02_dequantize_trains_on_noisy_pixels_and_is_named_so(cifar_bin_dir, tmp_path, monkeypatch):
    seen = []
    original = data.ImageData.train_batch
    monkeypatch.setattr(data.ImageData, "train_batch", lambda self, x: seen.append(original(self, x)) or seen[-1])
    out = tmp_path / "out"
    argv = ["--data-dir", str(cifar_bin_dir), "--out-dir", str(out), "--eval-samples", "2", "--eval-limit", "6",
            "--device", "cpu", "--max-steps", "2", "--batch-size", "8", "--no-download", "--unbounded",
            "--dequantize", *NO_COMPILE]
    assert model02.main(argv) == 0
    assert (out / "model02_unbounded_dequantized_results.json").exists()
    off_grid = [(b * 255 - torch.round(b * 255)).abs().max().item() for b in seen]
    assert min(off_grid) > 0.01  # not the 8-bit values themselves


def test_sigterm_stops_training_with_a_checkpoint(mnist_dir, tmp_path):
    """`kill PID` (SIGTERM: a scheduler's wall-time limit; background jobs ignore Ctrl-C) stops training as
    Ctrl-C does: a checkpoint, a one-paragraph message, exit status 2."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    argv = [sys.executable, "model01.py", *mnist_args(mnist_dir, out, "--epochs", "100000")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(log, "w") as err_file:
        proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        deadline = time.time() + 300
        while "train:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)  # until the progress bar shows that training runs
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 2, err
    assert "Interrupted at step" in err and "Traceback" not in err
    assert torch.load(out / "model01_checkpoint.pt", weights_only=False)["state"]["step"] > 0


def step_signalled_at(n):
    """training.train_step, but the n-th step's loss sends this process SIGTERM after it has drawn z."""
    import os
    import signal
    original, calls = training.train_step, []

    def step(model, optimizer, loss_fn, *rest):
        def loss(x):
            out = loss_fn(x)
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return original(model, optimizer, loss, *rest)
    return step


def test_a_signal_in_the_middle_of_a_step_stops_after_it_and_the_run_resumes_exactly(mnist_dir, tmp_path,
                                                                                     monkeypatch):
    """SIGTERM (or Ctrl-C) that lands while a step is under way (here: after its loss drew z, before Adam's
    update) stops training after that step, so the checkpoint holds whole steps and the RNG as they left it: the
    resumed run ends where an uninterrupted one does."""
    original = training.train_step
    assert model01.main(mnist_args(mnist_dir, tmp_path / "a", "--max-steps", "6")) == 0
    monkeypatch.setattr(training, "train_step", step_signalled_at(3))
    assert model01.main(mnist_args(mnist_dir, tmp_path / "b", "--max-steps", "6")) == 2  # interrupted
    b = torch.load(tmp_path / "b" / "model01_checkpoint.pt", weights_only=False)
    assert b["state"]["step"] == 3
    monkeypatch.setattr(training, "train_step", original)
    assert model01.main(mnist_args(mnist_dir, tmp_path / "b", "--max-steps", "6", "--resume")) == 0
    a = torch.load(tmp_path / "a" / "model01_checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "model01_checkpoint.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_second_signal_stops_at_once_without_a_checkpoint_of_a_half_done_step(mnist_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    import os
    import signal
    original = training.train_step

    def step_signalled_twice(model, optimizer, loss_fn, *rest):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the second: raised here, before this step's update
        return original(model, optimizer, loss_fn, *rest)

    monkeypatch.setattr(training, "train_step", step_signalled_twice)
    assert model01.main(mnist_args(mnist_dir, tmp_path, "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "Stopped at once at step 0, without a checkpoint" in err and "Traceback" not in err
    assert "no checkpoint of this run was written" in err
    assert not (tmp_path / "model01_checkpoint.pt").exists()


def test_a_signal_during_the_last_step_stops_the_run_before_its_evaluation(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "train_step", step_signalled_at(3))
    assert model01.main(mnist_args(mnist_dir, tmp_path, "--max-steps", "3")) == 2
    assert "Interrupted at step 3" in capsys.readouterr().err
    assert not (tmp_path / "model01_results.json").exists()


def test_reproduce_waits_for_a_run_that_ctrl_c_stops_cleanly(tmp_path):
    """The terminal sends Ctrl-C to reproduce.py and to its run; the run takes a moment to checkpoint, and
    reproduce.py waits for it instead of killing it (subprocess.call alone kills it after 0.25 s)."""
    import os
    import signal
    import sys
    import threading
    import time
    import reproduce
    pid_file = tmp_path / "pid"
    child = ("import os, signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: (time.sleep(1), sys.exit(3)))\n"
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
             "time.sleep(60)\n")

    def ctrl_c():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    assert reproduce.call_through_ctrl_c([sys.executable, "-c", child]) == 3  # its own exit, not SIGKILL's -9
