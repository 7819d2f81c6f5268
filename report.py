"""
The table and per-block plot of probe.py's results: one run's folder, or a folder of runs, one per row (with
pretrain.py's and finetune.py's logs where they exist); and the pre-training monitor's k-NN and RankMe by update.
`make exp-cifar10` ends with it; probe.py's and pretrain.py's done lines name it.

    python report.py --folder=out/exp/cifar10    # the tables; report.json, probe_by_block.png, monitor.png
    python report.py --folder=out/pretrain/ckpt_probe    # one probe.py run, as its done line says
    python report.py --folder=out/pretrain        # one pre-training run: the monitor's table and monitor.png
"""
import json
import math
import os

from PIL import Image, ImageDraw

import common

config = dict(
    folder="",  # probe.py's or pretrain.py's output folder, or one above several (make exp-*: <row>/{pretrain,probe}/)
)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(curves, title, x_name="block", unit="%"):
    """A minimal line plot drawn with PIL, so no plotting library is needed: curves {name: [(x, y), ...]}."""
    W, H, pad, legend = 800, 400, 50, 160  # the legend gets its own column, right of the curves
    right = W - pad - legend
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = zip(*[point for curve in curves.values() for point in curve])
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    span = max(max(ys) - min(ys), 1.0)
    step = 10 ** math.floor(math.log10(span))
    step = step / 5 if span / step < 3 else step  # at least three lines of the grid
    low = step * math.floor(min(ys) / step)
    high = max(step * math.ceil(max(ys) / step), low + step)

    def to_xy(x, y):
        return pad + (x - x_low) / (x_high - x_low) * (right - pad), H - pad - (y - low) / (high - low) * (H - 2 * pad)

    for k in range(round((high - low) / step) + 1):
        y = low + k * step
        draw.line([to_xy(x_low, y), to_xy(x_high, y)], fill=(225, 225, 225))
        draw.text((8, to_xy(x_low, y)[1] - 6), f"{y:g}{unit}", fill="black")
    ticks = sorted(set(xs)) if len(set(xs)) <= 24 else [round(x_low + k * (x_high - x_low) / 5) for k in range(6)]
    for x in ticks:
        draw.text((to_xy(x, low)[0] - 4, H - pad + 8), str(x), fill="black")
    for k, ((name, points), colour) in enumerate(zip(curves.items(), COLOURS * 9)):
        draw.line([to_xy(x, y) for x, y in points], fill=colour, width=3)
        draw.text((right + 20, pad + 16 * k), name, fill=colour)
    draw.text((pad, 15), title + f" (x: {x_name})", fill="black")
    return image


def read_jsonl(path):  # a half-written last line (a run killed while logging) is left out
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def runs(folder):
    """(name, probe results, pre-training log, fine-tuning log) of every probe result under folder: either
    <row>/probe/results.json beside <row>/pretrain/ and <row>/finetune/ (make exp-*), or probe.py's default,
    <ckpt>_probe/results.json beside <ckpt>.pt, the run's log.jsonl and <ckpt>_finetune/ (probe.py's done line)."""
    for parent, _, files in sorted(os.walk(folder)):
        if "results.json" not in files:
            continue
        if os.path.basename(parent) == "probe":
            row = os.path.dirname(parent)
            logs = os.path.join(row, "pretrain", "log.jsonl"), os.path.join(row, "finetune", "log.jsonl")
        else:
            row = parent.removesuffix("_probe")
            logs = os.path.join(os.path.dirname(row), "log.jsonl"), row + "_finetune/log.jsonl"
        name = os.path.relpath(row, folder)
        yield (os.path.basename(row) if name.startswith(".") else name), os.path.join(parent, "results.json"), *logs


def monitored_runs(folder):
    """(name, log path, monitor rows) of each pre-training log.jsonl under folder with them (<row>/pretrain: <row>)."""
    for parent, _, files in sorted(os.walk(folder)):
        log = read_jsonl(os.path.join(parent, "log.jsonl")) if "log.jsonl" in files else []
        if rows := [r for r in log if "rankme" in r]:
            exp_layout = os.path.basename(parent) == "pretrain" and not os.path.samefile(parent, folder)
            run = os.path.dirname(parent) if exp_layout else parent
            name = os.path.relpath(run, folder)
            yield os.path.basename(os.path.abspath(run)) if name.startswith(".") else name, parent + "/log.jsonl", rows


def report(folder):
    """The probe results under folder (see runs) in one table and one per-block plot, with the pre-training and
    fine-tuning logs that go with each; and the monitor's k-NN and RankMe of every pre-training run, by update."""
    table, curves, monitors = {}, {}, {}  # monitors: {pre-training log: (run, rows)}
    for name, results, pretrain_log, finetune_log in runs(folder):
        with open(results) as f:
            probe = json.load(f)
        row = dict(knn=max(probe["knn"]), linear=probe["best_linear"], best_layer=probe["best_layer"], finetune=None,
                   hours=0.0)
        if os.path.exists(finetune_log):
            epochs = [r["top1"] for r in read_jsonl(finetune_log) if "top1" in r]
            row["finetune"] = max(epochs, default=None)  # None: fine-tuning has not finished an epoch yet
        log = read_jsonl(pretrain_log) if os.path.exists(pretrain_log) else []
        if log:  # training time from the logged img/s
            batch, steps = log[0]["config"]["batch_size"], [r for r in log if "img_s" in r]
            seconds = sum((r["step"] - p["step"]) * batch / r["img_s"] for p, r in zip([{"step": 0}] + steps, steps))
            row["hours"] = seconds / 3600
            monitors[os.path.abspath(pretrain_log)] = name, [r for r in log if "rankme" in r]
        table[name], curves[name] = row, probe["linear"]
    for name, path, rows in monitored_runs(folder):  # pre-training runs without probe results (yet) too
        monitors.setdefault(os.path.abspath(path), (name, rows))
    monitors = dict(run for run in monitors.values() if run[1])  # {run: rows}
    if not table and not monitors:
        common.fail(f"no probe results (results.json) or pre-training logs under {folder}: give a folder probe.py or "
                    "pretrain.py wrote, or one above")
    last = {name: rows[-1] for name, rows in monitors.items()}
    if table:
        print("| run | pre-training hours | k-NN (best block) | linear probe (best block) | fine-tune top-1 | "
              "monitor k-NN, RankMe (last) |\n|---|---|---|---|---|---|")
    for name, r in table.items():
        finetune = "-" if r["finetune"] is None else f"{r['finetune']:.1f}"
        knn = f"{last[name]['knn']:.1f}, " if "knn" in last.get(name, {}) else ""
        seen = f"{knn}{last[name]['rankme']:.1f}" if name in last else "-"
        print(f"| {name} | {r['hours']:.2f} | {r['knn']:.1f} | {r['linear']:.1f} ({r['best_layer']}) | {finetune} | "
              f"{seen} |")
    if monitors:
        print("\nthe monitor, before training -> its last row (k-NN: last block, %)\n| run | epochs | k-NN | RankMe |"
              "\n|---|---|---|---|")
    for name, rows in monitors.items():
        knn = f"{rows[0]['knn']:.1f} -> {rows[-1]['knn']:.1f}" if "knn" in rows[0] else "-"
        print(f"| {name} | {rows[-1]['epoch']} | {knn} | {rows[0]['rankme']:.1f} -> {rows[-1]['rankme']:.1f} |")
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(dict(table=table, linear_by_block=curves, monitor=monitors), f, indent=1)
    title = os.path.basename(os.path.abspath(folder))
    if curves:
        by_block = {name: list(enumerate(linear, 1)) for name, linear in curves.items()}
        plot(by_block, f"linear probe by block, {title}").save(os.path.join(folder, "probe_by_block.png"))
    if monitors:  # one picture: k-NN above (labelled sets), RankMe below, by update (runs of other sizes compare)
        knn = {run: [(r["step"], r["knn"]) for r in rows] for run, rows in monitors.items() if "knn" in rows[0]}
        rank = plot({run: [(r["step"], r["rankme"]) for r in rows] for run, rows in monitors.items()},
                    f"RankMe of the last block, {title}", "updates", unit="")
        picture = Image.new("RGB", (rank.width, rank.height * (2 if knn else 1)), "white")
        picture.paste(rank, (0, picture.height - rank.height))
        if knn:
            picture.paste(plot(knn, f"monitor k-NN of the last block, {title}", "updates"), (0, 0))
        picture.save(os.path.join(folder, "monitor.png"))


def main():
    cfg, _ = common.configure(config, __doc__, __file__)
    if not os.path.isdir(cfg["folder"]):
        common.fail(f"--folder={cfg['folder']!r} is not a folder of runs")
    report(cfg["folder"])


if __name__ == "__main__":
    main()
