"""Every number in README.md's results tables is rendered from a results JSON under assets/.

The tables sit between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers; this test renders
them from the JSON files and fails if the README differs. `python tests/test_readme.py` rewrites them.
"""
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
README = os.path.join(ROOT, "README.md")

COLOUR_ROWS = [  # (results file, p(x|z), variance)
    ("model02", "Gaussian (trained as a density)", "bounded: log-variance = tanh"),
    ("model02_unbounded", "Gaussian (trained as a density)", "unbounded"),
    ("model03", "discretized logistic", "bounded: log-variance = tanh"),
    ("model03_unbounded", "discretized logistic", "unbounded"),
    ("model02_unbounded_dequantized", "Gaussian (trained on dequantized data)", "unbounded"),
    ("model04", "mixture of 10 discretized logistics, RGB autoregression", "log-scale >= -7"),
    ("model05_logistic_unbounded", "discretized logistic, 3 stochastic layers", "unbounded"),
    ("model05_mixture", "mixture of 10 discretized logistics, 3 stochastic layers", "log-scale >= -7"),
]


def load(name):
    path = os.path.join(ROOT, "assets", f"{name}_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def how(r, full_epochs=None):
    epochs = f"{r['epochs_completed']} of {r['epochs']}" if r["shortened"] else f"{r['epochs']}"
    if r.get("stopped_by_guard"):
        epochs += ", stopped by the divergence guard"
    if full_epochs and r["schedule"] == "iwae" and r["epochs"] < full_epochs:
        epochs += f" (the paper's {full_epochs}, compressed)"
    elif full_epochs:
        epochs += f" (batch {r['batch_size']}, {r['schedule']} schedule)"
    return f"{epochs} | {r['steps']} | {r['train_seconds'] / 60:.0f} min | {r['hardware']} | {commands(r)}"


def commands(r):
    """The command that wrote the results; where the sittings recorded theirs (train_segments), each sitting's
    command first, so that a run resumed across sittings or evaluated by a later --resume shows how it was trained."""
    trained = [s.get("command") for s in r["train_segments"]]
    if not any(trained) or trained == [r["command"]]:
        return f"`{r['command']}`"
    sittings = "; ".join(f"`{c}`" if c else "(this sitting's command was not recorded)" for c in trained)
    text = f"trained in {len(trained)} sitting{'s' * (len(trained) > 1)}: {sittings}"
    return text if trained[-1] == r["command"] else f"{text}; evaluated by `{r['command']}`"


def render_model01():
    lines = ["| | test log p(x), nats | ± s.e. | S | test images | epochs | steps | training time | hardware | command |",
             "|---|---|---|---|---|---|---|---|---|---|",
             "| Burda et al. 2015, IWAE k=5, one stochastic layer | -85.54 | | 5000 | 10000 | 3280 | | | | |",
             "| two independent re-implementations with the paper's schedule | -85.18 | | 5000 | 10000 | 3280 | | | | |",
             "| a PyTorch re-implementation, batch 1000, constant lr 1e-3 | -85.46 | | 5000 | 10000 | thousands | | | | |",
             "| original vae-mdl | -85.02 | | 5000 | | | | | | |"]
    r = load("model01")
    if r is None:
        lines.append("| this repository | not run yet | | | | | | | | |")
    else:
        lines.append(f"| this repository | {r['test_llh_nats']:.2f} | {r['test_llh_stderr']:.2f} | {r['eval_samples']} | "
                     f"{r['eval_images']} | {how(r, full_epochs=3280)} |")
    return "\n".join(lines)


def render_colour():
    lines = ["| script | p(x\\|z) | variance | test bits/dim | ± s.e. | S | test images | epochs | steps | "
             "training time | hardware | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, px_z, variance in COLOUR_ROWS:
        r = load(name)
        if r is None:
            lines.append(f"| {name} | {px_z} | {variance} | not run yet | | | | | | | | |")
        else:
            lines.append(f"| {name} | {px_z} | {variance} | {r['test_bpd']:.3f} | {r['test_bpd_stderr']:.3f} | "
                         f"{r['eval_samples']} | {r['eval_images']} | {how(r)} |")
    return "\n".join(lines)


LOG_STD_OF_LOGISTIC = math.log(math.pi / math.sqrt(3))  # a logistic of scale s has std s * pi / sqrt(3)


def render_balance():
    """The story's mechanism in numbers: rate, distortion, the spread of p(x|z), active units (test_balance)."""
    lines = ["| run | epochs | rate KL(q\\|\\|p), nats/image (per layer, bottom first) | distortion, nats/image | "
             "ELBO, bits/dim | mean log-std of p(x\\|z) | active latent units | test images |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ["model01"] + [row[0] for row in COLOUR_ROWS]:
        r = load(name)
        if r is None:
            continue
        b = r.get("test_balance")
        if b is None:
            lines.append(f"| {name} | {how(r).split(' | ')[0]} | not measured (a run from before test_balance) "
                         f"| | | | | |")
            continue
        rate = f"{b['rate_nats']:.1f}"
        if len(b["rate_per_layer_nats"]) > 1:
            rate += " (" + " + ".join(f"{v:.1f}" for v in b["rate_per_layer_nats"]) + ")"
        dims = 784 if name == "model01" else 3072
        elbo = "" if name == "model01" else f"{-b['elbo_nats'] / (dims * math.log(2)):.3f}"
        if b["mean_log_scale"] is None:
            spread = "none (Bernoulli)"
        else:
            logistic = not name.startswith("model02")
            spread = f"{b['mean_log_scale'] + (LOG_STD_OF_LOGISTIC if logistic else 0):.2f}"
        active = " + ".join(str(a) for a in b["active_units"]) + f" of {sum(b['latent_units'])}"
        lines.append(f"| {name} | {how(r).split(' | ')[0]} | {rate} | {b['distortion_nats']:.1f} | {elbo} | "
                     f"{spread} | {active} | {b['images']} |")
    return "\n".join(lines)


def load_bench():
    path = os.path.join(ROOT, "assets", "bench.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def render_speed():
    import bench
    b = load_bench()
    if b is None:
        return "not measured yet: run `python bench.py`"
    peaks = [r[key]["matmul_flops"] for r in b["rows"] for key in ("train", "eval")]
    return (bench.markdown(b["rows"]) + "\n\n"
            f"Measured by `{b['command']}` on {b['hardware']} (torch {b['torch_version']}), {b['finished']}, "
            f"{b['total_seconds']:.0f} s in all; the float32 {b['matmul_n']}x{b['matmul_n']} matmul ran at "
            f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s during the run.")


TRAIN_IMAGES = {"model01": 60000}  # MNIST; the colour chapters train on CIFAR-10's 50000
TEST_IMAGES = 10000


def render_defaults():
    """Each script's default run, its time extrapolated from bench.py's steady-state rates (optimized path)."""
    import importlib
    b = load_bench()
    if b is None:
        return "not measured yet: run `python bench.py`"
    lines = ["| command | epochs | batch | training, at bench.py's rate | S | evaluation of 10,000 test images |",
             "|---|---|---|---|---|---|"]
    for r in b["rows"]:
        if r["path"] != "optimized":
            continue
        args = importlib.import_module(r["chapter"]).parser().parse_args([])
        train_h = args.epochs * TRAIN_IMAGES.get(r["chapter"], 50000) / r["train"]["images_per_s"] / 3600
        eval_min = TEST_IMAGES * args.eval_samples / r["eval"]["pairs_per_s"] / 60
        lines.append(f"| `python {r['chapter']}.py` | {args.epochs} | {args.batch_size} | {train_h:.1f} h | "
                     f"{args.eval_samples} | {eval_min:.0f} min |")
    return "\n".join(lines)


def json_files(folder, suffix):
    """(name without the suffix, parsed JSON) of every file in ROOT/folder whose name ends in suffix, sorted."""
    path = os.path.join(ROOT, folder)
    names = sorted(f for f in os.listdir(path) if f.endswith(suffix)) if os.path.isdir(path) else []
    out = []
    for f in names:
        with open(os.path.join(path, f)) as fh:
            out.append((f[:-len(suffix)], json.load(fh)))
    return out


CHECKS = os.path.join("assets", "checks")  # --eval-only re-evaluations: NAME_eval_only.json for assets/NAME_*


def render_s_sweep():
    """How the estimate moves with S (same images for every S): the sweeps that trained runs made on their own
    checkpoints (assets/*_results.json), then the eval-only sweeps kept in assets/s_sweep/."""
    runs = [r for folder in ["assets", os.path.join("assets", "s_sweep")]
            for _, r in json_files(folder, "_results.json") if r.get("s_sweep")]
    if not runs:
        return "not measured yet"
    lines = ["| checkpoint | test images | S | test bits/dim | ± s.e. | minus the largest S's (same images) | seconds |",
             "|---|---|---|---|---|---|---|"]
    commands = []
    for r in runs:
        last = r["s_sweep"][-1]["bpd"]
        for row in r["s_sweep"]:
            se = row["stderr"] / (3072 * math.log(2))
            lines.append(f"| {r['model']}, {r['epochs_completed']} epochs | {row['images']} | {row['S']} | "
                         f"{row['bpd']:.4f} | {se:.4f} | {row['bpd'] - last:+.4f} | {row['seconds']:.0f} |")
        commands.append(f"`{r['command']}` ({r['eval_hardware']}, {r['finished']})")
    return "\n".join(lines + ["", "Commands: " + "; ".join(commands) + "."])


def render_checks():
    """Each --eval-only re-evaluation of a shipped checkpoint (assets/checks/NAME_eval_only.json) beside the
    number its run wrote: the difference in units of the run's standard error."""
    checks = json_files(CHECKS, "_eval_only.json")
    if not checks:
        return "none yet"
    lines = ["| checkpoint | the run's number | --eval-only | difference / run's s.e. | S | test images | hardware | command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in checks:
        r = load(name)
        bpd = "test_bpd" in r
        key, se_key, fmt = ("test_bpd", "test_bpd_stderr", ".4f") if bpd else ("test_llh_nats", "test_llh_stderr", ".2f")
        unit = "bits/dim" if bpd else "nats"
        lines.append(f"| assets/{r['model']}_checkpoint.pt | {r[key]:{fmt}} ± {r[se_key]:{fmt}} {unit} | "
                     f"{c[key]:{fmt}} ± {c[se_key]:{fmt}} | {round((c[key] - r[key]) / r[se_key], 2) + 0.0:+.2f} | "
                     f"{c['eval_samples']} | {c['eval_images']} | {c['eval_hardware']} | `{c['command']}` |")
    return "\n".join(lines)


IMAGE_STATS = os.path.join("assets", "image_stats")  # --eval-only runs for image_stats: NAME_eval_only.json


def render_roughness():
    """How speckled the data and each model's images are (image_stats of assets/image_stats/NAME_eval_only.json):
    mean absolute step between neighbouring pixels, in 8-bit levels, ± its standard error over images."""
    found = json_files(IMAGE_STATS, "_eval_only.json")
    if not found:
        return "none yet"
    keys = ["data", "reconstruction_means", "sample_means", "draws"]
    lines = ["| run | data (test images) | reconstructions' means | samples' means (z ~ p(z)) | draws from p(x\\|z) | "
             "draws / data | images | command |", "|---|---|---|---|---|---|---|---|"]
    for name, r in found:
        t = r["image_stats"]
        cells = [f"{t['roughness_levels'][k]:.1f} ± {t['roughness_stderr'][k]:.1f}" for k in keys]
        ratio = t["roughness_levels"]["draws"] / t["roughness_levels"]["data"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} | {t['images']} | `{r['command']}` |")
    return "\n".join(lines)


TABLES = {"roughness": render_roughness, "checks": render_checks, "balance": render_balance,
          "s_sweep": render_s_sweep, "model01": render_model01, "colour": render_colour, "speed": render_speed,
          "defaults": render_defaults}


def blocks(text):
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"<!-- results:(\w+) -->\n(.*?)<!-- /results:\1 -->", text, flags=re.S)}


def test_readme_tables_are_the_results_files():
    with open(README) as f:
        found = blocks(f.read())
    assert set(found) == set(TABLES), "README.md must hold every results table, between its markers"
    for name, render in TABLES.items():
        assert found[name] == render(), f"README table '{name}' differs from assets/*_results.json: " \
                                        f"run python tests/test_readme.py"


def test_every_results_file_is_in_the_readme():
    with open(README) as f:
        text = f.read()
    for file in os.listdir(os.path.join(ROOT, "assets")):
        if file.endswith("_results.json"):
            r = load(file[:-len("_results.json")])
            number = f"{r['test_bpd']:.3f}" if "test_bpd" in r else f"{r['test_llh_nats']:.2f}"
            assert number in text, f"{file}: {number} is not in README.md"


def test_every_image_stats_run_is_of_the_shipped_checkpoint():
    for name, r in json_files(IMAGE_STATS, "_eval_only.json"):
        run = load(name)
        assert run is not None, f"{IMAGE_STATS}/{name}_eval_only.json has no assets/{name}_results.json"
        assert r["eval_only"] and r["train_segments"] == run["train_segments"], \
            f"{IMAGE_STATS}/{name}_eval_only.json is of another checkpoint than assets/{name}_*: re-run or delete it"


def test_a_run_of_several_sittings_shows_each_sittings_command():
    one = {"command": "python m.py --epochs 9", "train_segments": [{"command": "python m.py --epochs 9"}]}
    assert commands(one) == "`python m.py --epochs 9`"
    old = {"command": "python m.py --resume", "train_segments": [{}, {}]}  # results from before segments had commands
    assert commands(old) == "`python m.py --resume`"
    run = {"command": "python m.py --resume", "train_segments": [
        {}, {"command": "python m.py --resume --time-limit 9"}, {"command": "python m.py --resume"}]}
    assert commands(run) == ("trained in 3 sittings: (this sitting's command was not recorded); "
                             "`python m.py --resume --time-limit 9`; `python m.py --resume`")
    evaluated_later = {"command": "python m.py --resume", "train_segments": [{"command": "python m.py"}]}
    assert commands(evaluated_later) == "trained in 1 sitting: `python m.py`; evaluated by `python m.py --resume`"


def test_every_check_is_of_the_shipped_checkpoint():
    """A re-evaluation left over from an earlier checkpoint of the same name would compare two different models."""
    for name, c in json_files(CHECKS, "_eval_only.json"):
        r = load(name)
        assert r is not None, f"{CHECKS}/{name}_eval_only.json has no assets/{name}_results.json"
        assert c["eval_only"] and not r["eval_only"], f"{name}: the check must be --eval-only, the run must not"
        assert c["train_segments"] == r["train_segments"], \
            f"{CHECKS}/{name}_eval_only.json is of another checkpoint than assets/{name}_*: re-run the check or delete it"


if __name__ == "__main__":
    with open(README) as f:
        text = f.read()
    for name, render in TABLES.items():
        text = re.sub(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)",
                      lambda m: m.group(1) + render() + "\n" + m.group(2), text, flags=re.S)
    with open(README, "w") as f:
        f.write(text)
    print("README.md tables rewritten from assets/*_results.json")
