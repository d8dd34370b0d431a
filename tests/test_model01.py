"""model01 end to end on tiny fake MNIST (torchvision's idx files), through main([...])."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import model01

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = ["imgs", "recs", "samples", "samples_var"]


def args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--eval-samples", "3", "--eval-limit", "8",
            "--device", "cpu", "--epochs", "2", "--batch-size", "16", "--no-download", *extra]


def results(out_dir, name="model01"):
    with open(os.path.join(out_dir, f"{name}_results.json")) as f:
        return json.load(f)


def test_smoke_run_writes_grids_and_results(mnist_dir, tmp_path):
    out = tmp_path / "out"
    assert model01.main(args(mnist_dir, out, "--max-steps", "2")) == 0
    for grid in GRIDS:
        assert (out / f"model01_{grid}.png").stat().st_size > 0
    res = results(out)
    for key in ["model", "dataset", "test_llh_nats", "test_llh_stderr", "eval_samples", "eval_images", "k",
                "epochs", "steps", "train_seconds", "device", "torch_version", "command"]:
        assert key in res
    assert math.isfinite(res["test_llh_nats"]) and res["test_llh_nats"] < 0
    assert res["steps"] == 2 and res["eval_samples"] == 3 and res["eval_images"] == 8 and res["shortened"]
    assert res["command"].startswith("python model01.py --data-dir")


def test_resume_continues_exactly(mnist_dir, tmp_path):
    # 64 images / 16 = 4 steps per epoch: stop mid-epoch at step 3, resume to step 6 (into epoch 2)
    assert model01.main(args(mnist_dir, tmp_path / "a", "--max-steps", "6")) == 0
    assert model01.main(args(mnist_dir, tmp_path / "b", "--max-steps", "3")) == 0
    assert model01.main(args(mnist_dir, tmp_path / "b", "--max-steps", "6", "--resume")) == 0
    a = torch.load(tmp_path / "a" / "model01_checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "model01_checkpoint.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 6 and b["state"]["epoch"] == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    ra, rb = results(tmp_path / "a"), results(tmp_path / "b")
    assert rb["steps"] == 6
    for key in ["test_llh_nats", "test_curve"]:  # what the user reads
        assert ra[key] == rb[key], key


def test_resume_refuses_other_flags(mnist_dir, tmp_path, capsys):
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "1")) == 0
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "2", "--resume", "--k", "3")) == 2
    assert "--resume needs the flags" in capsys.readouterr().err


def test_an_unfinished_run_is_never_replaced_and_a_finished_one_is_run_again(mnist_dir, tmp_path, capsys):
    assert model01.main(args(mnist_dir, tmp_path, "--time-limit", "1e-9")) == 0  # stops at once: unfinished, at step 0
    assert model01.main(args(mnist_dir, tmp_path)) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert not (tmp_path / "model01_results.json").exists()
    assert model01.main(args(mnist_dir, tmp_path, "--resume")) == 0  # finishes it
    assert results(tmp_path)["steps"] == 8
    assert model01.main(args(mnist_dir, tmp_path, "--epochs", "1")) == 0  # a finished run: starts afresh
    assert "finished run: starting afresh" in capsys.readouterr().err
    assert results(tmp_path)["steps"] == 4


def test_a_shipped_reference_run_is_not_replaced(mnist_dir, monkeypatch, tmp_path, capsys):
    import experiment
    shipped = tmp_path / "assets"
    assert model01.main(args(mnist_dir, shipped, "--max-steps", "2")) == 0  # stands for a shipped run
    before = {f.name: f.read_bytes() for f in shipped.iterdir()}
    monkeypatch.setattr(experiment, "SHIPPED", str(shipped))
    for extra in [[], ["--resume"], ["--eval-only"]]:  # a fresh run, one resumed, one evaluated again
        assert model01.main(args(mnist_dir, shipped, "--max-steps", "2", *extra)) == 2, extra
        assert "shipped reference run" in capsys.readouterr().err
    ckpt = str(shipped / "model01_checkpoint.pt")
    assert model01.main(args(mnist_dir, tmp_path / "mine", "--max-steps", "2", "--resume", "--checkpoint", ckpt)) == 2
    assert "shipped reference run" in capsys.readouterr().err  # it would train on into that checkpoint
    assert model01.main(args(mnist_dir, shipped / "checks", "--eval-only", "--checkpoint", ckpt)) == 2  # nor in it
    assert "shipped reference run" in capsys.readouterr().err
    assert model01.main(args(mnist_dir, tmp_path / "check", "--eval-only", "--checkpoint", ckpt)) == 0  # reads only
    assert {f.name: f.read_bytes() for f in shipped.iterdir()} == before


def test_eval_only_reproduces_the_number(mnist_dir, tmp_path):
    assert model01.main(args(mnist_dir, tmp_path / "run", "--max-steps", "2", "--eval-samples", "200")) == 0
    trained = results(tmp_path / "run")
    ckpt = str(tmp_path / "run" / "model01_checkpoint.pt")
    assert model01.main(args(mnist_dir, tmp_path / "eval", "--eval-only", "--checkpoint", ckpt,
                             "--eval-samples", "200")) == 0
    again = results(tmp_path / "eval")
    assert again["eval_only"] and again["steps"] == trained["steps"]
    assert abs(again["test_llh_nats"] - trained["test_llh_nats"]) < 1.0  # 200 samples, same 8 images


def test_unreadable_checkpoint_is_a_clear_error(mnist_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert model01.main(args(mnist_dir, tmp_path, "--eval-only", "--checkpoint", str(bad))) == 2
    err = capsys.readouterr().err
    assert "Cannot read the checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "set to `False`" not in err  # one paragraph, not torch's advice


class RunsCode:
    """A pickle that would run `touch <marker>` when loaded."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(mnist_dir, tmp_path, capsys):
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "1")) == 0
    ckpt = tmp_path / "model01_checkpoint.pt"
    blob = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "ran"
    blob["state"]["history"] = [RunsCode(marker)]
    crafted = tmp_path / "crafted.pt"
    torch.save(blob, crafted)
    assert model01.main(args(mnist_dir, tmp_path / "eval", "--eval-only", "--checkpoint", str(crafted))) == 2
    err = capsys.readouterr().err
    assert "Refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    # the project's own checkpoint still loads
    assert model01.main(args(mnist_dir, tmp_path / "eval", "--eval-only", "--checkpoint", str(ckpt))) == 0


def test_an_out_dir_that_cannot_be_made_is_a_clear_error(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert model01.main(args(mnist_dir, blocker / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "Cannot create the output folder" in err and "Traceback" not in err


def test_missing_data_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "model01.py", "--data-dir", str(tmp_path / "nowhere"), "--no-download"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "MNIST" in proc.stderr and "train-images-idx3-ubyte" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_states_defaults():
    proc = subprocess.run([sys.executable, "model01.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for expected in ["--eval-samples", "(default: 5000)", "(default: 1500)", "(default: 5)", "{dynamic,static}"]:
        assert expected in text


@pytest.mark.parametrize("flag", [["--k", "0"], ["--device", "tpu"], ["--binarization", "half"], ["--lr", "0"],
                                  ["--lr", "-1e-3"], ["--curve-images", "-1"], ["--skip-grad-norm", "0"],
                                  ["--checkpoint-minutes", "0"], ["--threads", "-2"], ["--lr", "nan"],
                                  ["--resume", "--eval-only"]])
def test_bad_flags_are_errors(flag):
    with pytest.raises(SystemExit) as exit_:
        model01.main(flag)
    assert exit_.value.code == 2


@pytest.mark.parametrize("case, message", [
    ("missing", "No checkpoint at"),
    ("other chapter", "was written by model03, not model01"),
    ("other shape", "The checkpoint does not fit this model"),
    ("not ours", "It was not written by this project"),
])
def test_a_checkpoint_that_cannot_be_used_is_a_one_paragraph_error(mnist_dir, tmp_path, capsys, case, message):
    assert model01.main(args(mnist_dir, tmp_path / "run", "--max-steps", "1")) == 0
    blob = torch.load(tmp_path / "run" / "model01_checkpoint.pt", weights_only=False)
    path = tmp_path / "edited.pt"
    if case == "other chapter":
        blob["config"]["model"] = "model03"
    elif case == "other shape":
        blob["model"][next(iter(blob["model"]))] = torch.zeros(3, 3)
    elif case == "not ours":
        blob = {"model": blob["model"]}
    if case != "missing":
        torch.save(blob, path)
    capsys.readouterr()
    assert model01.main(args(mnist_dir, tmp_path / "eval", "--eval-only", "--checkpoint", str(path))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line.startswith("error:") for line in err.strip().splitlines()] == [True]  # one paragraph


def test_asking_for_a_gpu_where_there_is_none_is_a_clear_error(mnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "1", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA GPU here" in err
    assert [line.startswith("error:") for line in err.strip().splitlines()] == [True]


def test_ctrl_c_outside_training_is_a_one_paragraph_message(mnist_dir, tmp_path, capsys, monkeypatch):
    import experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "evaluate_run", interrupted)
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "2")) == 130
    err = capsys.readouterr().err
    assert "error: interrupted" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert model01.main(args(mnist_dir, tmp_path, "--max-steps", "2", "--resume")) == 0  # the trained run, evaluated
