"""Renders what README.md shows from the results files that the runs wrote: every table and rendered sentence
(between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers), the colour runs' test curves, and the
summary figure (every shipped model on the same test images).

    python rendering.py                                  # rewrite README.md's tables and assets/colour_curves.png
    python rendering.py --summary --data-dir DIR         # also redraw assets/summary.png (needs CIFAR-10's test set)
    python rendering.py --summary --data-dir DIR --runs runs --out runs/summary.png   # your own runs, same layout

tests/test_readme.py renders the tables and fails where README.md differs. Nothing here trains or scores a model;
the summary figure loads the shipped checkpoints and draws from them with fixed seeds.
"""
import argparse
import math
import os
import re
import sys

from results import (ASSETS, CHECKS, COLOUR_DIMS, IMAGE_STATS, QUICK_LOOK, RARE_DRAW_NATS, ROOT, RUNS, elbo_bpd,
                     image_stats_of, json_files, label, load, load_bench, log_std, model_from_checkpoint, rare_draw,
                     shipped, weights)

README = os.path.join(ROOT, "README.md")


# ---------------------------------------------------------------------------------------------------
# Tables and sentences
# ---------------------------------------------------------------------------------------------------
def render_glance():
    """Results at a glance: one row per colour run, readable labels, no commands (those are in the appendix)."""
    lines = ["| model | script | p(x\\|z) | variance | weights | test bits/dim | rate, nats | log-std of p(x\\|z) | "
             "roughness of draws / data |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in shipped():
        if "test_bpd" not in r:
            continue
        b, t = r["test_balance"], image_stats_of(name, r)
        rate = f"{b['rate_nats']:.0f}"
        if rare_draw(b):
            rate = "†"
            check = load(name, CHECKS, "_eval_only.json")
            notes.append(f"† {label(name)}: the run's mean rate is ruled by one rare draw of z"
                         + (f"; its --eval-only re-evaluation ({CHECKS}/{name}_eval_only.json) gives a mean rate of "
                            f"{check['test_balance']['rate_nats']:.0f} nats." if check else "."))
        rough = f"{t['roughness_levels']['draws'] / t['roughness_levels']['data']:.2f}" if t else ""
        px_z, variance = RUNS.get(name, ("", "", ""))[1:]
        script = name.split("_")[0] + ".py"
        lines.append(f"| {label(name)} | {script} | {px_z} | {variance} | {weights(name, r) / 1e6:.2f}M | "
                     f"{r['test_bpd']:.3f} ± {r['test_bpd_stderr']:.3f} | {rate} | {log_std(name, b):.2f} | {rough} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def same_or_against(value, bounded, fmt):
    """The beta-VAE's number beside the bounded run's: 'the bounded run's X' where they print alike."""
    a, b = format(value, fmt), format(bounded, fmt)
    return f"the bounded run's {b}" if a == b else f"{a} against the bounded run's {b}"


def render_findings():
    """The headline numbers, as sentences, from the results files."""
    r = {name: res for name, res in shipped()}
    rough = {name: image_stats_of(name, res)["roughness_levels"] for name, res in r.items() if image_stats_of(name, res)}
    bpd = {name: res["test_bpd"] for name, res in r.items() if "test_bpd" in res}
    b = {name: res["test_balance"] for name, res in r.items()}
    best = min(bpd, key=bpd.get)
    closest = hierarchies_closest({name: t["draws"] / t["data"] for name, t in rough.items()})
    lines = [
        f"- **A bounded variance makes the draws noise.** With the original's tanh bound (standard deviation >= 0.61 "
        f"on [0, 1] pixels) the Gaussian and the logistic sit at the bound and score {bpd['model02']:.3f} and "
        f"{bpd['model03']:.3f} bits/dim, worse than a uniform distribution over 256 values (8). The logistic's means "
        f"are smooth and its draws noise: roughness {rough['model03']['sample_means']:.1f} and "
        f"{rough['model03']['draws']:.1f} levels, the data's {rough['model03']['data']:.1f}.",
        f"- **Freeing it lowers the bits/dim far below the uniform's and keeps a picture in the draws.** Unbounded, "
        f"the same networks score {bpd['model02_unbounded']:.3f} (Gaussian) and {bpd['model03_unbounded']:.3f} "
        f"(logistic) bits/dim. The logistic's rate grows from {b['model03']['rate_nats']:.0f} to "
        f"{b['model03_unbounded']['rate_nats']:.0f} nats, as the original's explanation says, but its means from the "
        f"prior stay pictures, near the data's roughness ({rough['model03_unbounded']['sample_means']:.1f} levels), "
        f"and its draws show the picture under speckle ({rough['model03_unbounded']['draws']:.1f}).",
        f"- **The original showed means only; the draws are where the bound does its damage.** Its claim that "
        "without the bound the mean-function samples \"become terrible\" does not hold here; its remark that with a "
        "large variance \"samples just look like noise\" does, for the bounded draws.",
    ]  # then each chapter's in the story's order
    beta = "model02_beta0.3679"
    if beta in bpd:
        lines.append(f"- **The beta-VAE is the bound in another form.** With beta = e^-1, the variance the "
                     f"bounded Gaussian sits at, it scores {same_or_against(bpd[beta], bpd['model02'], '.3f')} "
                     f"bits/dim, with a rate of {b[beta]['rate_nats']:.0f} nats against "
                     f"{b['model02']['rate_nats']:.0f}.")
    lines.append(f"- **A mixture with RGB autoregression, then a hierarchy, lower the bits/dim further**: "
                 f"{bpd['model04']:.3f} (chapter 4), {bpd['model05_mixture']:.3f} with three latent layers (chapter 5)"
                 f"{' (the lowest here)' if best == 'model05_mixture' else ''}."
                 + ("" if "model06_mixture" in bpd else f" The hierarchy's draws are {closest} of any colour run to "
                                                        f"the data's roughness, but no sample from the prior shows "
                                                        f"an object."))
    if "model04_1component" in bpd and "model04_no_autoregression" in bpd:
        lines.append(f"- **Chapter 4's two changes overlap.** Either alone buys most of its gain over the free "
                     f"logistic: one logistic with RGB autoregression scores {bpd['model04_1component']:.3f} bits/dim, "
                     f"ten components with independent channels {bpd['model04_no_autoregression']:.3f}, the two "
                     f"together {bpd['model04']:.3f}.")
    if "model06_mixture" in bpd:
        import evaluation
        pairs = [(new, old) for new, old in (("model06_mixture", "model05_mixture"),
                                             ("model06_logistic_unbounded", "model05_logistic_unbounded"))
                 if new in bpd and old in bpd]
        lower = all(bpd[new] < bpd[old] for new, old in pairs)
        against = "; ".join(f"{'the mixture' if 'mixture' in new else 'the free logistic'} from {bpd[old]:.3f} "
                            f"(chapter 5) to {bpd[new]:.3f}{' (the lowest here)' if best == new else ''}"
                            for new, old in pairs)
        lines.append(f"- **A deeper hierarchy of spatial latents (chapter 6) "
                     f"{'lowers' if lower else 'does not always lower'} the bits/dim again, but its samples from the "
                     f"prior show no objects.** Bits/dim: {against}. The hierarchies' draws are {closest} of any "
                     f"colour run to the data's roughness, yet their samples from the prior are textures, at "
                     f"temperatures {max(evaluation.TEMPERATURES):g} down to {min(evaluation.TEMPERATURES):g}.")
    return "\n".join(lines)


def is_hierarchy(name):
    return name.startswith(("model05", "model06"))


def hierarchies_closest(ratio):
    """'the closest' if every hierarchy's (model05, model06) roughness of draws / data is nearer 1 than every other
    colour run's (MNIST's model01 is not compared), else 'among the closest'."""
    colour = {name: v for name, v in ratio.items() if not name.startswith("model01")}
    hierarchies = [v for name, v in colour.items() if is_hierarchy(name)]
    others = [v for name, v in colour.items() if not is_hierarchy(name)]
    return "the closest" if max(hierarchies, default=math.inf) < min(others, default=math.inf) else "among the closest"


def how(r):
    epochs = f"{r['epochs_completed']} of {r['epochs']}" if r["shortened"] else f"{r['epochs']}"
    if r.get("stopped_by_guard"):
        epochs += ", stopped by the divergence guard"
    return epochs


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
    lines = ["| | test log p(x), nats | ± s.e. | epochs |", "|---|---|---|---|",
             "| Burda et al. 2015, IWAE k=5, one stochastic layer | -85.54 | | 3280 |",
             "| original vae-mdl | -85.02 | | |"]
    r = load("model01")
    if r is not None:
        lines.append(f"| this repository (batch {r['batch_size']}, {r['schedule']} schedule) | {r['test_llh_nats']:.2f} | "
                     f"{r['test_llh_stderr']:.2f} | {how(r)} |")
    return "\n".join(lines)


def render_provenance():
    """Every shipped run: how it was trained and scored, on what, in how long, by which commands."""
    lines = ["| run | test number | S | test images | epochs | steps | skipped | training | evaluation | "
             "hardware | command |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in shipped():
        number = (f"{r['test_bpd']:.3f} ± {r['test_bpd_stderr']:.3f} bits/dim" if "test_bpd" in r
                  else f"{r['test_llh_nats']:.2f} ± {r['test_llh_stderr']:.2f} nats")
        lines.append(f"| {name} | {number} | {r['eval_samples']} | {r['eval_images']} | {how(r)} | {r['steps']} | "
                     f"{r['skipped_steps']} | {r['train_seconds'] / 60:.0f} min | {r['eval_seconds'] / 60:.0f} min | "
                     f"{r['hardware']} | {commands(r)} |")
    return "\n".join(lines)


def latent_maps(b):
    """A model06 run's stochastic layers grouped by the size of their latent maps, bottom first: (the size as
    "16x16", the layers' indices in b's per-layer lists), from the units per layer (model06.LATENT_CHANNELS maps)."""
    import model06
    groups = []
    for i, units in enumerate(b["latent_units"]):
        side = math.isqrt(units // model06.LATENT_CHANNELS)
        size = f"{side}x{side}"
        if groups and groups[-1][0] == size:
            groups[-1][1].append(i)
        else:
            groups.append((size, [i]))
    return groups


def per_layer(name, b, key, fmt):
    """b[key] per layer, bottom first, joined with +; a model06 run's summed per latent map size and labelled."""
    values = b[key]
    if not name.startswith("model06"):
        return " + ".join(f"{v:{fmt}}" for v in values)
    return " + ".join(f"{size}: {sum(values[i] for i in layers):{fmt}}" for size, layers in latent_maps(b))


def render_balance():
    """The story's mechanism in numbers: rate, distortion, the spread of p(x|z), active units (test_balance)."""
    lines = ["| run | rate KL(q\\|\\|p), nats/image (per layer or latent map size, bottom first) | distortion, "
             "nats/image | ELBO, bits/dim | mean log-std of p(x\\|z) | active latent units |",
             "|---|---|---|---|---|---|"]
    notes = []
    for name, r in shipped():
        b = r["test_balance"]
        rate = f"{b['rate_nats']:.1f}"
        if len(b["rate_per_layer_nats"]) > 1:
            rate += f" ({per_layer(name, b, 'rate_per_layer_nats', '.1f')})"
        elbo = f"{elbo_bpd(b):.3f}" if "test_bpd" in r else ""
        spread = "none (Bernoulli)" if log_std(name, b) is None else f"{log_std(name, b):.2f}"
        active = per_layer(name, b, "active_units", "d") + f" of {sum(b['latent_units'])}"
        mark, check = ("", None) if not rare_draw(b) else (" †", load(name, CHECKS, "_eval_only.json"))
        if mark:
            notes.append(f"† {label(name)}: one rare draw of z rules the run's rate, distortion and ELBO"
                         + (f"; its --eval-only re-evaluation gives a rate of {check['test_balance']['rate_nats']:.0f} "
                            f"and a distortion of {check['test_balance']['distortion_nats']:.0f} nats/image." if check
                            else "."))
        lines.append(f"| {label(name)}{mark} | {rate} | {b['distortion_nats']:.1f} | {elbo} | {spread} | {active} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def render_numbers(names):
    """One line per run of a chapter: its bits/dim, rate, log-std and roughness of means and draws."""
    out = []
    for name in names:
        r = load(name)
        if r is None:
            continue
        b, t = r["test_balance"], image_stats_of(name, r)
        rate = "ruled by a rare draw (appendix)" if rare_draw(b) else f"{b['rate_nats']:.0f} nats"
        rough = (f"; roughness of prior means {t['roughness_levels']['sample_means']:.1f}, of draws "
                 f"{t['roughness_levels']['draws']:.1f} levels" if t else "")
        out.append(f"- {label(name)}: **{r['test_bpd']:.3f} ± {r['test_bpd_stderr']:.3f} bits/dim**, rate {rate}, "
                   f"log-std of p(x|z) {log_std(name, b):.2f}{rough}.")
    return "\n".join(out) or "not run yet"


CH6_RUNS = ("model06_logistic_unbounded", "model06_mixture")
LATENT_SCALE_RATIO = 10  # sane latent scales: in every layer, the largest one-sample rate within 10x the median
UNUSED_LAYER_NATS = 1.0  # ... or within 10x this, for a layer whose median is below it (one that carries ~nothing)


def worst_rate_ratio(b, layers=None):
    """The largest of the layers' largest one-sample rate / median rate (the median at least UNUSED_LAYER_NATS)."""
    median, largest = b["rate_per_layer_median_nats"], b["rate_per_layer_max_nats"]
    return max(largest[i] / max(median[i], UNUSED_LAYER_NATS) for i in layers or range(len(median)))


def render_latents_ch6():
    """Chapter 6: where the bits go (the rate per latent map size, its share, active units) and whether the latent
    scales stayed sane: each layer's largest one-sample rate over the test images against its median (at least
    UNUSED_LAYER_NATS, so that a layer that carries almost nothing is not judged on noise)."""
    runs = [(name, r) for name, r in ((name, load(name)) for name in CH6_RUNS) if r is not None]
    if not runs:
        return "not run yet"
    rows, images = [["run", "latent maps", "layers", "units per layer", "rate, nats/image", "share of the rate",
                     "active units", "largest one-sample rate of one layer, nats", "largest / median, worst layer",
                     "within 10x"]], set()
    for name, r in runs:
        b = r["test_balance"]
        images.add(b["images"])
        median, largest = b["rate_per_layer_median_nats"], b["rate_per_layer_max_nats"]
        for size, layers in latent_maps(b):  # bottom first, as the mechanism table
            rate = sum(b["rate_per_layer_nats"][i] for i in layers)
            unused = sum(median[i] < UNUSED_LAYER_NATS for i in layers)
            ratio = worst_rate_ratio(b, layers)
            rows.append([label(name), size, f"{len(layers)}{f' ({unused} unused)' if unused else ''}",
                         f"{b['latent_units'][layers[0]]}", f"{rate:.1f}", f"{100 * rate / b['rate_nats']:.0f}%",
                         f"{sum(b['active_units'][i] for i in layers)} of {sum(b['latent_units'][i] for i in layers)}",
                         f"{max(largest[i] for i in layers):.1f}", f"{ratio:.1f}",
                         "yes" if ratio <= LATENT_SCALE_RATIO else "no"])
    if len(runs) == 1:  # one run: its name goes in the sentence below, not on every row
        rows = [row[1:] for row in rows]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    counts = " and ".join(f"{n:,}" for n in sorted(images))
    which = f"`{runs[0][0]}`" if len(runs) == 1 else "each run"
    return "\n".join(lines + [
        "", f"Rates of {which} over the {counts} test images, one draw of z each, bottom map first. Latent scales "
            f"count as sane when in every layer the largest one-sample rate is within {LATENT_SCALE_RATIO} times the "
            f"median, or within {LATENT_SCALE_RATIO} nats where the median is below {UNUSED_LAYER_NATS:g} nat (an "
            f"unused layer, which carries almost nothing)."])


def render_ablations():
    """Chapter 4's two ablations: their lines, and the share of chapter 4's drop from the free logistic that each buys."""
    lines = render_numbers(["model04_1component", "model04_no_autoregression"])
    bpd = {n: load(n)["test_bpd"] for n in ("model03_unbounded", "model04", "model04_1component",
                                            "model04_no_autoregression") if load(n) is not None}
    if len(bpd) < 4:
        return lines
    drop = bpd["model03_unbounded"] - bpd["model04"]
    share = {n: 100 * (bpd["model03_unbounded"] - bpd[n]) / drop for n in ("model04_1component", "model04_no_autoregression")}
    return (f"{lines}\n\nOf chapter 4's drop from the free logistic ({bpd['model03_unbounded']:.3f} to "
            f"{bpd['model04']:.3f} bits/dim), RGB autoregression with one logistic buys "
            f"{share['model04_1component']:.0f}%, ten components with independent channels "
            f"{share['model04_no_autoregression']:.0f}%.")


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


def render_cost_ch6():
    """What chapter 6's hierarchy costs against chapter 5's, per training image and per evaluation pair, and how
    well each trains on the cores (bench.py's optimized path, one process)."""
    import bench
    b = load_bench()
    rows = {r["chapter"]: r for r in (b or {}).get("rows", []) if r["path"] == "optimized"}
    if "model06" not in rows or "model05" not in rows:
        return ("What model06 costs against model05 is not measured yet: `python bench.py`, then copy "
                "`runs/bench.json` to `assets/` and run `python rendering.py`.")
    new, old = rows["model06"], rows["model05"]
    use = {name: bench.utilization(r["train"]["images_per_s"], r["train"]["flops_per_image"], r["train"]["matmul_flops"])
           for name, r in (("model05", old), ("model06", new))}  # of training
    flops = new["train"]["flops_per_image"] / old["train"]["flops_per_image"]
    time = old["train"]["images_per_s"] / new["train"]["images_per_s"]
    return (f"What the larger hierarchy costs: {flops:.1f} times model05's FLOPs per training image "
            f"{'but' if round(time, 1) > round(flops, 1) else 'and'} {time:.1f} times its time; per evaluation pair, "
            f"{old['eval']['pairs_per_s'] / new['eval']['pairs_per_s']:.1f} times its time (`bench.py`, both in one "
            f"process). Training runs at {use['model06']:.0%} of the FLOP rate of a matmul on the same cores, "
            f"model05's at {use['model05']:.0%}.")


TRAIN_IMAGES = {"model01": 60000}  # MNIST; the colour chapters train on CIFAR-10's 50000
TEST_IMAGES = 10000


def default_hours(chapter, row, flags=()):
    """(the parsed flags, training hours, evaluation minutes) of a chapter's run at bench.py's steady-state rates for
    its default model: the default run's, or with flags (a variant's) its epochs and samples."""
    import importlib
    args = importlib.import_module(chapter).parser().parse_args(list(flags))
    train_h = args.epochs * TRAIN_IMAGES.get(chapter, 50000) / row["train"]["images_per_s"] / 3600
    return args, train_h, TEST_IMAGES * args.eval_samples / row["eval"]["pairs_per_s"] / 60


def render_defaults():
    """Each script's default run, its time extrapolated from bench.py's steady-state rates (optimized path)."""
    b = load_bench()
    if b is None:
        return "not measured yet: run `python bench.py`"
    lines = ["| command | epochs | batch | training, at bench.py's rate | S | evaluation of 10,000 test images |",
             "|---|---|---|---|---|---|"]
    for r in b["rows"]:
        if r["path"] == "optimized":
            args, train_h, eval_min = default_hours(r["chapter"], r)
            lines.append(f"| `python {r['chapter']}.py` | {args.epochs} | {args.batch_size} | {train_h:.1f} h | "
                         f"{args.eval_samples} | {eval_min:.0f} min |")
    import reproduce
    hours = {name: reproduce.hours(script, flags) for name, script, flags in reproduce.RUNS}
    total = sum(sum(h) for h in hours.values() if h)
    missing = [name for name, h in hours.items() if h is None]
    unmeasured = f" for the {len(hours) - len(missing)} whose script bench.py has measured" if missing else ""
    return "\n".join(lines + ["", f"`python reproduce.py` runs {len(hours)} such runs (variants at their script's "
                                   f"default rate): about {total:.0f} h of training and evaluation on these "
                                   f"cores{unmeasured}, and as much evaluation again for the checks."
                                   + (f" Not measured yet: {', '.join(missing)}." if missing else "")])


def render_s_sweep():
    """How the estimate moves with S (same images for every S): the sweeps that trained runs made on their own
    checkpoints (assets/*_results.json), then the eval-only sweeps kept in assets/s_sweep/."""
    runs = [r for folder in ["assets", os.path.join("assets", "s_sweep")]
            for _, r in json_files(folder, "_results.json") if r.get("s_sweep")]
    if not runs:
        return "not measured yet"
    lines = ["| checkpoint | test images | S | test bits/dim | ± s.e. | minus the largest S's (same images) | seconds |",
             "|---|---|---|---|---|---|---|"]
    cmds = []
    for r in runs:
        last = r["s_sweep"][-1]["bpd"]
        for row in r["s_sweep"]:
            se = row["stderr"] / (COLOUR_DIMS * math.log(2))
            lines.append(f"| {r['model']}, {r['epochs_completed']} epochs | {row['images']} | {row['S']} | "
                         f"{row['bpd']:.4f} | {se:.4f} | {row['bpd'] - last:+.4f} | {row['seconds']:.0f} |")
        cmds.append(f"`{r['command']}` ({r['eval_hardware']}, {r['finished']})")
    return "\n".join(lines + ["", "Commands: " + "; ".join(cmds) + "."])


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


def render_rare_draws():
    """Each shipped run whose mean one-sample rate a rare draw of z rules, beside its --eval-only re-evaluation."""
    lines = []
    for name, r in shipped():
        if "test_balance" not in r or not rare_draw(r["test_balance"]):
            continue
        rate = r["test_balance"]["rate_per_layer_nats"]
        layer = max(range(len(rate)), key=rate.__getitem__)
        where = "the bottom layer" if layer == 0 else f"layer {layer + 1} (from the bottom)"
        line = (f"The shipped `{name}` draws, now and then, a z from q(z|x) where the prior of {where} is far off: its "
                f"results file's mean rate of that layer is {rate[layer] / 1e6:.1f} million nats, ruled by one draw")
        c = load(name, CHECKS, "_eval_only.json")
        if c is None:
            lines.append(line + "; its re-evaluation is not in assets/checks yet.")
            continue
        same = abs(c["test_bpd"] - r["test_bpd"]) < r["test_bpd_stderr"]
        lines.append(line + f", while its re-evaluation's is {c['test_balance']['rate_per_layer_nats'][layer]:.0f}; "
                     f"the S = {c['eval_samples']} estimate "
                     + (f"is unmoved (re-evaluations table): such a draw carries no weight among {c['eval_samples']} "
                        f"samples." if same else "moves (re-evaluations table)."))
    if lines:
        return "\n\n".join(lines)
    worst = {name: worst_rate_ratio(r["test_balance"]) for name, r in shipped()
             if name not in CH6_RUNS and "rate_per_layer_max_nats" in r.get("test_balance", {})}  # ch6: its table
    no_rare = f"No shipped run's mean rate is ruled by a rare draw (none is above {RARE_DRAW_NATS:,.0f} nats)."
    if not worst:
        return no_rare
    listed = ", ".join(f"`{name}` {ratio:.1f}" for name, ratio in worst.items())
    return (no_rare + f" In each run before chapter 6 whose results record it, every layer's largest one-sample rate "
            f"over the test images is within {max(worst.values()):.1f} times its median ({listed}; chapter 6's runs: "
            "its latents table).")


GUARD_LOG = os.path.join("assets", "model04_no_ratio_guard_log.txt")  # model04's first run, before the ratio guard


def render_guard_history():
    """What model04's first run did without the ratio guard, read from the per-step log of its rerun: its first step
    past the ratio that model04's guard now skips at."""
    import model04
    text = open(os.path.join(ROOT, GUARD_LOG)).read()
    before = float(re.search(r"over steps \d+ to \d+: at most (\d+\.\d+)", text).group(1))
    rows = [(int(step), float(loss), float(ratio), status) for step, loss, _, ratio, status in
            re.findall(r"^ *(\d+) +(\S+) +(\S+) +(\S+) +(taken|skipped)$", text, re.M)]
    spike = next(row for row in rows if row[2] > model04.SKIP_GRAD_RATIO)
    skip = next(row for row in rows if row[3] == "skipped")
    typical = sorted(loss for step, loss, _, _ in rows if step < spike[0])
    typical = typical[len(typical) // 2]
    mantissa, exponent = f"{skip[1]:.1e}".split("e")
    later = skip[0] - spike[0]
    return (f"The first 50-epoch run of model04, before that guard existed, took one step at {spike[2]:.0f} times "
            f"that median (step {spike[0]}; the largest ratio before it was {before}), and {later} "
            f"step{'s' * (later > 1)} later a batch's loss was {mantissa}e{int(exponent)} nats per image instead of "
            f"about {round(typical, -2):,.0f} (`{GUARD_LOG}`).")


def render_roughness():
    """How speckled the data and each model's images are: mean absolute step between neighbouring pixels, in 8-bit
    levels, ± its standard error over images (each run's image_stats, or its assets/image_stats/ file)."""
    keys, ratios = ["data", "reconstruction_means", "sample_means", "draws"], {}
    lines = ["| run | data (test images) | reconstructions' means | samples' means (z ~ p(z)) | draws from p(x\\|z) | "
             "draws / data | images |", "|---|---|---|---|---|---|---|"]
    for name, r in shipped():
        t = image_stats_of(name, r)
        if t is None:
            continue
        cells = [f"{t['roughness_levels'][k]:.1f} ± {t['roughness_stderr'][k]:.1f}" for k in keys]
        ratio = t["roughness_levels"]["draws"] / t["roughness_levels"]["data"]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + f" | {ratio:.2f} | {t['images']} |")
        ratios[name] = ratio
    return "\n".join(lines) + "\n\n" + roughness_groups(ratios)


def roughness_groups(ratio):
    """One sentence: the range of draws / data over the bounded runs (the beta-VAE with them), the free one-layer
    colour runs and the hierarchies (model05, model06), and whether the hierarchies' draws are the closest."""
    groups = {"bounded variance or the beta-VAE": [], "free, one latent layer": [], "the hierarchies": []}
    for name, v in ratio.items():
        if name.startswith("model01"):
            continue
        bounded = RUNS[name][2].startswith(("bounded", "fixed"))
        group = ("bounded variance or the beta-VAE" if bounded else
                 "the hierarchies" if is_hierarchy(name) else "free, one latent layer")
        groups[group].append(v)
    parts = [f"{group}, {min(v):.2f} to {max(v):.2f}" if len(v) > 1 else f"{group}, {v[0]:.2f}"
             for group, v in groups.items() if v]
    closest = (f"; the hierarchies' draws are {hierarchies_closest(ratio)} to the data"
               if groups["the hierarchies"] else "")
    return "Draws / data: " + "; ".join(parts) + closest + "."


def render_image_stats_runs():
    """The --eval-only runs that measured image_stats for runs that predate them."""
    extra = [f"`{r['command']}`" for _, r in json_files(IMAGE_STATS, "_eval_only.json")]
    return "; ".join(extra) + "." if extra else "none"


def render_quick_look():
    found = json_files(QUICK_LOOK, "_results.json")
    if not found:
        return "not run yet"
    _, r = found[0]
    command = re.sub(r" --data-dir \S+", "", r["command"])  # the user's data folder is theirs
    return (f"```bash\n{command} --data-dir DIR\n```\n\nshould print `{r['model']}: test log p(x) = "
            f"{r['test_llh_nats']:.2f} +- {r['test_llh_stderr']:.2f} nats = {r['test_bpd']:.3f} bits/dim "
            f"(S={r['eval_samples']}, {r['eval_images']} test images); wrote runs/{r['model']}_results.json` (the "
            f"importance samples are new each time, so "
            f"expect agreement within the standard error, not to the digit), and write its four grids into `runs/`, "
            f"beside the shipped ones in `assets/`. It took {r['wall_seconds']:.0f} s on {r['hardware']}.")


TABLES = {
    "findings": render_findings, "glance": render_glance, "quick_look": render_quick_look,
    "model01": render_model01,
    "numbers_ch2": lambda: render_numbers(["model02", "model02_unbounded", "model02_unbounded_dequantized"]),
    "numbers_ch3": lambda: render_numbers(["model03", "model03_unbounded"]),
    "numbers_ch4": lambda: render_numbers(["model04"]),
    "numbers_ab": render_ablations,
    "numbers_ch5": lambda: render_numbers(["model05_logistic_unbounded", "model05_mixture"]),
    "numbers_ch6": lambda: render_numbers(CH6_RUNS),
    "latents_ch6": render_latents_ch6, "cost_ch6": render_cost_ch6,
    "numbers_beta": lambda: render_numbers(["model02_beta0.3679"]),
    "balance": render_balance, "roughness": render_roughness, "provenance": render_provenance,
    "image_stats_runs": render_image_stats_runs,
    "s_sweep": render_s_sweep, "checks": render_checks, "rare_draws": render_rare_draws, "speed": render_speed,
    "guard_history": render_guard_history,
    "defaults": render_defaults,
}


def blocks(text):
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"<!-- results:(\w+) -->\n(.*?)<!-- /results:\1 -->", text, flags=re.S)}


def render_readme(text):
    """text with every results block rendered afresh."""
    for name, render in TABLES.items():
        text = re.sub(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)",
                      lambda m: m.group(1) + render() + "\n" + m.group(2), text, flags=re.S)
    return text


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------
def draw_colour_curves(path=os.path.join(ASSETS, "colour_curves.png")):
    """The per-epoch test ELBO of every shipped colour run, with readable labels."""
    from evaluation import plot_colour_curves
    paths = [os.path.join(ASSETS, f"{name}_results.json") for name, r in shipped() if "test_bpd" in r]
    return plot_colour_curves(paths, path, labels={name: label(name) for name in RUNS})


SUMMARY_IMAGES = 4  # test images and prior draws per model in the summary figure


def draw_summary(data_dir, runs_dir=ASSETS, out=os.path.join(ASSETS, "summary.png")):
    """One row per colour model: the same test images, their reconstructions (means of p(x|z), z ~ q(z|x)), then
    the means of p(x|z) and draws from it for z ~ p(z) drawn with the same seed for every model."""
    import torch
    import data
    from common import UserError
    from evaluation import observation_mean, save_labelled_grid
    runs_dir = os.path.abspath(runs_dir)
    found = [(name, load(name, runs_dir)) for name, _ in shipped() if "beta" not in name]  # your runs: your numbers
    found = [(name, r) for name, r in found if r is not None and "test_bpd" in r
             and os.path.exists(os.path.join(runs_dir, f"{name}_checkpoint.pt"))]
    if not found:
        raise UserError(f"{runs_dir} holds no finished colour run (NAME_checkpoint.pt beside NAME_results.json, as "
                        "python model03.py writes them into runs/ when it finishes): train a chapter first")
    images = data.load_colour("cifar10", data_dir, download=False)
    x = images.test_batch(images.test[:SUMMARY_IMAGES])
    rows, names = [], []
    for name, r in found:
        ckpt = os.path.join(runs_dir, f"{name}_checkpoint.pt")
        model = model_from_checkpoint(name, ckpt)
        with torch.no_grad():
            torch.manual_seed(0)
            recs, _ = observation_mean(model.reconstruct(x, True))
            torch.manual_seed(1)
            px_z = model.generate(SUMMARY_IMAGES, True)
            means, _ = observation_mean(px_z)
            draws = px_z.sample()
        rows.append(torch.cat([x, recs, means, draws]).clamp(0, 1))
        names.append(f"{label(name)}: {r['test_bpd']:.2f} bits/dim")
    save_labelled_grid(rows, names, ["test images", "reconstructions (means)", "prior samples: means",
                                     "prior samples: draws"], out)
    return len(rows)


def main(argv=None):
    from experiment import HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--summary", action="store_true", help="also draw the summary figure (needs --data-dir)")
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 is (for --summary)")
    p.add_argument("--runs", default=ASSETS, help="the folder of checkpoints the summary figure draws from (another "
                   "than assets/: the figure only, README.md and colour_curves.png untouched)")
    p.add_argument("--out", default=os.path.join(ASSETS, "summary.png"), help="where the summary figure goes")
    args = p.parse_args(argv)
    if os.path.abspath(args.runs) == ASSETS:  # the README reads the shipped runs; your own runs get the figure only
        with open(README) as f:
            text = render_readme(f.read())  # rendered before the file is opened for writing: a failure leaves it whole
        with open(README, "w") as f:
            f.write(text)
        print(f"README.md: {len(TABLES)} results blocks rendered; colour_curves.png: {draw_colour_curves()} curves")
    if args.summary:
        from common import UserError
        try:
            print(f"{args.out}: {draw_summary(args.data_dir, args.runs, args.out)} models")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
