"""
The table and per-block plot of probe.py's results: one run's folder, or a folder of runs, one per row (with
pretrain.py's and finetune.py's logs where they exist). `make exp-cifar10` ends with it; probe.py's done line
names it.

    python report.py --folder=out/exp/cifar10     # prints the table; writes report.json and probe_by_block.png
    python report.py --folder=out/pretrain/ckpt_probe    # one probe.py run, as its done line says
"""
import json
import os

from PIL import Image, ImageDraw

import common

config = dict(
    folder="",  # probe.py's output folder, or a folder above several (make exp-*: <row>/{pretrain,probe,finetune}/)
)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path, curves, title):
    """A minimal line plot (accuracy vs layer) drawn with PIL, so no plotting library is needed."""
    W, H, pad, legend = 800, 400, 50, 160  # the legend gets its own column, right of the curves
    right = W - pad - legend
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    L = len(next(iter(curves.values())))
    values = [v for curve in curves.values() for v in curve]
    high = min(100, 10 * int(max(values) // 10) + 10)
    low = min(10 * int(min(values) // 10), high - 10)  # the decades in use, at least one
    def to_xy(i, acc):
        return pad + i * (right - pad) / max(1, L - 1), H - pad - (acc - low) / (high - low) * (H - 2 * pad)

    for acc in range(low, high + 1, 10):
        draw.line([to_xy(0, acc), to_xy(L - 1, acc)], fill=(225, 225, 225))
        draw.text((8, to_xy(0, acc)[1] - 6), f"{acc}%", fill="black")
    for i in range(L):
        draw.text((to_xy(i, low)[0] - 4, H - pad + 8), str(i + 1), fill="black")
    for k, ((name, values), colour) in enumerate(zip(curves.items(), COLOURS)):
        draw.line([to_xy(i, v) for i, v in enumerate(values)], fill=colour, width=3)
        draw.text((right + 20, pad + 16 * k), name, fill=colour)
    draw.text((pad, 15), title + " (x: block, y: top-1)", fill="black")
    image.save(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


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


def report(folder):
    """One table and one per-layer plot of the probe results under folder, with the pre-training and fine-tuning
    logs that go with each (see runs)."""
    table, curves = {}, {}
    for name, results, pretrain_log, finetune_log in runs(folder):
        with open(results) as f:
            probe = json.load(f)
        row = dict(knn=max(probe["knn"]), linear=probe["best_linear"], best_layer=probe["best_layer"], finetune=None,
                   hours=0.0)
        if os.path.exists(finetune_log):
            epochs = [r["top1"] for r in read_jsonl(finetune_log) if "top1" in r]
            row["finetune"] = max(epochs, default=None)  # None: fine-tuning has not finished an epoch yet
        if os.path.exists(pretrain_log):  # training time from the logged img/s
            log = read_jsonl(pretrain_log)
            batch, steps = log[0]["config"]["batch_size"], [r for r in log if "step" in r]
            seconds = sum((r["step"] - p["step"]) * batch / r["img_s"] for p, r in zip([{"step": 0}] + steps, steps))
            row["hours"] = seconds / 3600
        table[name], curves[name] = row, probe["linear"]
    if not table:
        common.fail(f"no probe results (results.json) under {folder}: give a folder probe.py wrote, or one above")
    print("| run | pre-training hours | k-NN (best block) | linear probe (best block) | fine-tune top-1 |")
    print("|---|---|---|---|---|")
    for name, r in table.items():
        finetune = "-" if r["finetune"] is None else f"{r['finetune']:.1f}"
        print(f"| {name} | {r['hours']:.2f} | {r['knn']:.1f} | {r['linear']:.1f} ({r['best_layer']}) | {finetune} |")
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(dict(table=table, linear_by_block=curves), f, indent=1)
    title = f"linear probe by block, {os.path.basename(folder.rstrip('/'))}"
    plot(os.path.join(folder, "probe_by_block.png"), curves, title)


def main():
    cfg, _ = common.configure(config, __doc__, __file__)
    if not os.path.isdir(cfg["folder"]):
        common.fail(f"--folder={cfg['folder']!r} is not a folder of runs")
    report(cfg["folder"])


if __name__ == "__main__":
    main()
