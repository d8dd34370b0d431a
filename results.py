"""The shipped runs and what their results files say: where they lie, their readable labels in the story's order, the
numbers derived from them (log-std of p(x|z), ELBO in bits/dim, weights), and a chapter's model rebuilt from a
checkpoint. rendering.py renders the README from these; reproduce.py and the tests read them too."""
import functools
import json
import math
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(ROOT, "assets")
CHECKS = os.path.join("assets", "checks")  # --eval-only re-evaluations: NAME_eval_only.json for assets/NAME_*
IMAGE_STATS = os.path.join("assets", "image_stats")  # --eval-only runs for image_stats of runs that predate it
QUICK_LOOK = os.path.join("assets", "quick_look")  # the README's two-minute look, as a user runs it
COLOUR_DIMS = 3 * 32 * 32
LOG_STD_OF_LOGISTIC = math.log(math.pi / math.sqrt(3))  # a logistic of scale s has std s * pi / sqrt(3)

# Every run the README reads, in the order of the story: results name -> (readable label, p(x|z), its variance).
RUNS = {
    "model01": ("Bernoulli (binarized MNIST)", "Bernoulli", "none"),
    "model02": ("Gaussian, bounded", "Gaussian (trained as a density)", "bounded: log-variance = tanh"),
    "model02_unbounded": ("Gaussian, free", "Gaussian (trained as a density)", "free"),
    "model02_unbounded_dequantized": ("Gaussian, free, dequantized", "Gaussian (trained on dequantized data)", "free"),
    "model02_beta0.3679": ("beta-VAE, beta = e^-1", "Gaussian, trained as a beta-VAE", "fixed at beta"),
    "model03": ("logistic, bounded", "discretized logistic", "bounded: log-variance = tanh"),
    "model03_unbounded": ("logistic, free", "discretized logistic", "free"),
    "model04": ("mixture of 10 + RGB autoregression", "10 discretized logistics, RGB autoregression", "log-scale >= -7"),
    "model04_1component": ("1 logistic + RGB autoregression", "1 discretized logistic, RGB autoregression",
                           "log-scale >= -7"),
    "model04_no_autoregression": ("mixture of 10, channels independent", "10 discretized logistics", "log-scale >= -7"),
    "model05_logistic_unbounded": ("logistic, free, 3 latent layers", "discretized logistic", "free"),
    "model05_mixture": ("mixture + autoregression, 3 latent layers", "10 discretized logistics, RGB autoregression",
                        "log-scale >= -7"),
    "model06_logistic_unbounded": ("logistic, free, spatial latent hierarchy", "discretized logistic", "free"),
    "model06_mixture": ("mixture + autoregression, spatial latent hierarchy", "10 discretized logistics, RGB autoregression",
                        "log-scale >= -7"),
}


def load(name, folder="assets", suffix="_results.json"):
    path = os.path.join(ROOT, folder, f"{name}{suffix}")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def json_files(folder, suffix):
    """(name without the suffix, parsed JSON) of every file in ROOT/folder whose name ends in suffix, sorted."""
    path = os.path.join(ROOT, folder)
    names = sorted(f for f in os.listdir(path) if f.endswith(suffix)) if os.path.isdir(path) else []
    out = []
    for f in names:
        with open(os.path.join(path, f)) as fh:
            out.append((f[:-len(suffix)], json.load(fh)))
    return out


def shipped():
    """(name, results) of every run in assets/, in the story's order (RUNS), then any other."""
    found = dict(json_files("assets", "_results.json"))
    order = [n for n in RUNS if n in found] + sorted(n for n in found if n not in RUNS)
    return [(n, found[n]) for n in order]


def label(name):
    return RUNS[name][0] if name in RUNS else name


def image_stats_of(name, r):
    """The run's own image_stats, or those of the --eval-only run made for a run that predates them."""
    if r.get("image_stats"):
        return r["image_stats"]
    extra = load(name, IMAGE_STATS, "_eval_only.json")
    return extra["image_stats"] if extra else None


def log_std(name, b):
    """The mean log-std of p(x|z): the Gaussian's as it is, a logistic's log-scale + log(pi / sqrt 3)."""
    if b["mean_log_scale"] is None:
        return None
    return b["mean_log_scale"] + (0 if name.startswith("model02") else LOG_STD_OF_LOGISTIC)


def elbo_bpd(b):
    return -b["elbo_nats"] / (COLOUR_DIMS * math.log(2))


RARE_DRAW_NATS = 1e5  # a mean rate above this is ruled by a rare draw of z (model05's first mixture: 12.9 million)


def rare_draw(b):
    """A mean one-sample rate ruled by a rare draw of z: far above any plausible rate (RARE_DRAW_NATS)."""
    return b["rate_nats"] > RARE_DRAW_NATS


def weights(name, r):
    """The run's number of weights: its results' count, else (runs older than that field) its shipped checkpoint's."""
    if "parameters" in r:
        return r["parameters"]
    return checkpoint_weights(os.path.join(ROOT, "assets", f"{name}_checkpoint.pt"))


@functools.lru_cache(maxsize=None)
def checkpoint_weights(path):
    """The weights in a checkpoint (read once per process: the README is rendered whole, often, by the tests)."""
    import torch
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return sum(t.numel() for t in blob["model"].values())


def load_bench():
    return load("bench", "assets", ".json")


def model_from_checkpoint(name, path):
    """The chapter's model with the weights of a checkpoint, built with the flags that trained it."""
    import importlib
    import torch
    from training import load_checkpoint, restore
    blob = load_checkpoint(path, torch.device("cpu"))
    module = importlib.import_module(name.split("_")[0])
    args = module.parser().parse_args([])
    config = {**getattr(module, "OLDER_CHECKPOINTS", {}), **blob["config"]}  # flags the checkpoint may predate
    vars(args).update({k: v for k, v in config.items() if hasattr(args, k)})
    model = module.build_model(args) if name != "model01" else module.build_model(args, None)
    restore(blob, model, rng=False)
    return model.eval()
