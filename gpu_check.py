"""
What the first minutes on a GPU machine should check, as one table (also saved as JSON):

    make gpu-check                                  # = python gpu_check.py; at most 5 minutes on one GPU
    python gpu_check.py --device=cpu --tiny=True    # the same steps at toy sizes on a CPU (the tests run this)

1. in this process, what only the device shows: the dtype --dtype=auto picks; no host sync in three training
   steps (torch.cuda.set_sync_debug_mode) and none per batch in evaluation; k-means fitted twice, the same
   bits; InfoNCE and the words at full float32 under bf16 autocast (no TF32);
2. bench.py's step rows for ViT-B/16 at 224 px in bf16, eager and with --compile=True: img/s, MFU of
   the measured matmul and of the spec sheet, peak memory, hours for 300 ImageNet epochs;
3. torchrun pretrain.py on every GPU on the built-in scenes (NCCL, the InfoNCE gather across GPUs,
   checkpoints), killed after its first checkpoint and resumed from it; then probe.py and finetune.py
   for a few steps on its checkpoint;
4. bench.py's loader rows on 640x480 JPEGs: one worker against plain torchvision; the device path (--loader=device,
   the default on a GPU: nvjpeg and the augmentation on the GPU) against the ViT-B/16 and ViT-S/16 steps, its workers
   (bytes and draws only) and from the device cache; how many workers the step needs, against this machine's cores;
   the device path's batches made on its own stream one ahead against the same made in turn, and against the CPU's.
Every row is checked whatever the others do: the whole table always prints, a failed row carries the end of
its run's own error output, and the exit code is 1 when any row failed. Without CUDA it says so and exits 0.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

import common
import data
import device_data
import finetune
import pretrain
import tokenizers
from bench import random_masks, write_jpegs
from model import Classifier, SplitMask, ViT, info_nce, param_groups

config = dict(
    device="auto",  # auto (cuda if there is one; without, say so and exit) | cpu | cuda
    tiny=False,  # toy sizes: ViT-Tiny at 32 px, a few steps (the test suite's CPU run)
    out_dir="out/gpu_check",  # the runs, bench JSON and gpu_check.json
    timeout=600,  # seconds any one step may take before it counts as failed
    pretrain_flags="",  # more flags for the torchrun pre-training, space-separated (e.g. --dtype=float16)
)


def tail(output, lines=3):
    """What a failed row shows: the last error lines of a run's own output (torchrun adds a report of its own
    after them), else its last lines; progress bars left out."""
    kept = [line.strip() for line in output.splitlines() if line.strip() and "%|" not in line]
    errors = [line for line in kept if re.match(r"error:|[\w.]*(Error|Exception)\b", line)
              and "ChildFailed" not in line]
    return " / ".join((errors or kept)[-lines:])[-600:]


def run(command, timeout):
    """A command's (exit code, seconds, stdout, stderr), never raising."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        return done.returncode, time.perf_counter() - start, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        return "timeout", time.perf_counter() - start, e.stdout or "", e.stderr or ""


def counted_syncs(fn):
    """How many times fn() made the host wait for the GPU (torch.cuda.set_sync_debug_mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def precision_rows(cfg, device, dtype):
    """What --dtype=auto picks here; k-means fitted twice; InfoNCE and the words at full precision under autocast."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    capability = f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}" \
        if device.type == "cuda" else "no GPU"
    rows = [("--dtype=auto", dtype, f"{name}, {capability}")]
    bf16 = torch.autocast(device.type, torch.bfloat16)  # the precision rows: what a bf16 run computes under
    g = torch.Generator(device).manual_seed(0)

    # k-means twice: the vocabulary of every process and every run is the same, bit for bit
    patches = torch.randn(2_000 if cfg["tiny"] else 200_000, 12 if cfg["tiny"] else 192, device=device, generator=g)
    fits = [tokenizers.kmeans_vocab(patches, 16 if cfg["tiny"] else 8192, seed=0, iters=3) for _ in range(2)]
    difference = (fits[0] - fits[1]).abs().max().item()
    rows.append(("k-means fitted twice", "ok" if torch.equal(*fits) else "FAILED", f"{len(patches):,} patches, "
                 f"{len(fits[0])} words: " + (f"differ by up to {difference:.2e}" if difference else "the same bits")))

    # InfoNCE under bf16 autocast against a float64 reference: float32 gives ~1e-7, TF32 ~1e-4
    xa, xb = (torch.randn(1024, 384, device=device, generator=g) for _ in range(2))
    with bf16:
        loss = info_nce(xa, xb).item()
    a, b = F.normalize(xa.double(), dim=-1), F.normalize(xb.double(), dim=-1)
    logits, labels = a @ b.T / 0.2, torch.arange(len(a), device=device)
    reference = (0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))).item()
    error = abs(loss - reference) / reference
    rows.append(("InfoNCE under bf16 autocast", "ok" if error < 1e-5 else "FAILED",
                 f"relative error {error:.1e} against float64 (TF32 would be ~1e-4)"))

    # the words: the same under bf16 autocast as in float32
    images = torch.randn(64, 3, 64, 64, device=device, generator=g)
    vocab = tokenizers.random_projection_vocab(1024, 192, seed=0).to(device)
    plain = tokenizers.tokenize(images, vocab, 16)
    with bf16:
        same = torch.equal(tokenizers.tokenize(images, vocab, 16), plain)
    rows.append(("words under bf16 autocast", "ok" if same else "FAILED", "the same ids as in float32"
                 if same else f"{(tokenizers.tokenize(images, vocab, 16) != plain).float().mean():.1%} differ"))
    return rows


def sync_rows(cfg, device, autocast, scaler):
    """Host syncs (the GPU made to wait for the host) in pretrain.py's and finetune.py's steps, fed as their loops
    feed them (pinned batches, copied without waiting, normalised on the GPU), and in evaluation."""
    rows, (size, patch) = [], (32, 4) if cfg["tiny"] else (224, 16)
    model = SplitMask(ViT("tiny" if cfg["tiny"] else "small", size, patch, drop_path=0.1), 1024).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=True)
    vocab = tokenizers.random_projection_vocab(1024, 3 * (patch // 2) ** 2, seed=0).to(device)
    batch = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8).pin_memory()
    masks = random_masks("splitmask", model.encoder.grid, 64).pin_memory()

    def steps(count=3):
        for step in range(count):
            common.set_lr(optimizer, step, 100, 10, 1e-4, 1e-6)
            micro_batch = data.normalize(batch.to(device, non_blocking=True)), masks.to(device, non_blocking=True)
            pretrain.train_step(model, optimizer, scaler, autocast, [micro_batch], vocab, patch, 3.0)

    steps(1)  # the first step allocates: not counted
    syncs = counted_syncs(steps)
    rows.append(("host syncs in 3 training steps", "ok" if syncs == 0 else "FAILED",
                 f"{syncs} (pretrain.py reads the GPU only at its log steps)"))

    # finetune.py's step (MixUp or CutMix, smoothed targets) and its evaluation
    classifier = Classifier(model.encoder, 10).to(device)
    optimizer = torch.optim.AdamW(param_groups(classifier, 0.05, 0.65), lr=1e-4, fused=True)
    images, labels, mix = data.normalize(batch.to(device)), torch.randint(0, 10, (64,), device=device), \
        finetune.mixing(0.8, 1.0, 10)

    def finetune_steps(count=3):
        for step in range(count):
            common.set_lr(optimizer, step, 100, 10, 1e-4, 1e-6)
            finetune.train_step(classifier, optimizer, scaler, autocast, images, labels, mix, 10, 0.1)

    finetune_steps(1)
    syncs = counted_syncs(finetune_steps)
    rows.append(("host syncs in 3 fine-tuning steps", "ok" if syncs == 0 else "FAILED", f"{syncs} (MixUp, CutMix, "
                 "smoothed targets on the GPU; finetune.py reads it at its log steps)"))
    batches = [(data.normalize(batch).pin_memory(), torch.randint(0, 10, (64,)).pin_memory()) for _ in range(4)]
    syncs = counted_syncs(lambda: finetune.evaluate(classifier, batches, device, autocast))
    rows.append(("host syncs evaluating 4 batches", "ok" if syncs <= 2 else "FAILED",
                 f"{syncs}: top-1 and top-5 read once, at the end"))
    return rows


def device_path_rows(cfg, device):
    """pretrain.py's device data path on 64 JPEGs (640x480) with the strong augmentation: batches made on its own
    stream one ahead (what training reads) against the same batches made in turn, and against the CPU's pixels."""
    size = 32 if cfg["tiny"] else 224
    files = data.build_dataset("folder", write_jpegs(os.path.join(cfg["out_dir"], "jpegs"), count=64), "train")
    dataset = device_data.EncodedImages(files, data.pretrain_transform(size, 0.08, strong=True), size // 16, seed=0)
    batches = [device_data.collate([dataset[i] for i in range(k, k + 16)]) for k in range(0, 64, 16)]
    on_gpu = device_data.DeviceBatches(dataset, device)
    on_host = device_data.DeviceBatches(dataset, torch.device("cpu"))
    ahead = [images.clone() for images, _ in on_gpu(batches)]
    in_turn = [on_gpu.make(batch)[0] for batch in batches]
    on_cpu = torch.cat([on_host.make(batch)[0] for batch in batches])
    same = all(torch.equal(a, b) for a, b in zip(ahead, in_turn))
    gap = (torch.cat(in_turn).float().cpu().mean((0, 2, 3)) - on_cpu.float().mean((0, 2, 3))).abs().max().item()
    return [("device path: batches made one ahead", "ok" if same else "FAILED",
             "equal to the same batches made in turn" if same else "they differ: the stream hand-over races"),
            ("device path: pixels against the CPU's", "ok" if gap < 1 else "FAILED",
             f"channel means within {gap:.2f} grey levels (nvJPEG against libjpeg; 1 allowed)")]


def guarded(rows, name, check, *args):
    """rows += check(*args); an exception becomes a failed row, so that the table still prints."""
    try:
        rows += check(*args)
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]  # where it happened: a sync names its line, say
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        rows.append((name, "FAILED", f"{type(e).__name__} at {where}: {e}"[:600]))


def bench(cfg, compiled, sizes, label=""):
    """bench.py's rows (compiled: the step's only); label: a second model's run, its step and device-path rows."""
    out = os.path.join(cfg["out_dir"], f"bench_{'compiled' if compiled else 'eager'}{label.strip(' ()')}.json")
    features = "" if compiled or label else "2000,2,16" if cfg["tiny"] else "100000,12,768"  # probe.py's: eager only
    command = [sys.executable, "bench.py", f"--device={cfg['device']}", f"--compile={compiled}", "--nce_sizes=",
               f"--loader={not compiled}", f"--probe_features={features}", f"--out={out}", *sizes]
    code, seconds, stdout, stderr = run(command, cfg["timeout"])
    rows = json.load(open(out))["rows"] if code == 0 else [("bench.py", "FAILED", f"exit {code}: {tail(stderr)}")]

    def wanted(name):  # eager: every row; compiled: the step's; a second model: its step's and the device path's
        if name == "bench.py" or not compiled and not label:
            return True
        return name.startswith(("SplitMask step", "device path")) if label else any(
            word in name for word in ("step", "MFU", "epochs", "memory"))
    return [(f"{name}{' (compiled)' if compiled else label}", value, note) for name, value, note in rows
            if wanted(name)]


def kill_job(pid, timeout):
    """SIGKILL torchrun and its workers (each in a session of its own: killpg would miss them), then wait until none
    is left running: a SIGKILL lands when it lands, and a worker may be saving. Linux's /proc, no other tool."""
    job, parents = [pid], processes()
    for process in job:  # the list grows as the loop goes: children, then theirs
        job += [child for child, parent in parents.items() if parent == process]
    for process in job:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
    deadline = time.perf_counter() + timeout
    while any(process in processes() for process in job[1:]) and time.perf_counter() < deadline:
        time.sleep(0.05)


def processes():
    """{pid: parent pid} of every running process (zombies, dead and waiting to be reaped, left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]  # after "pid (name)"
            if state != "Z":
                found[int(entry)] = int(parent)
        except (OSError, ValueError):  # not a process, or gone meanwhile
            pass
    return found


def pretrain_kill_resume(cfg, gpus, sizes):
    """torchrun pretrain.py, a SIGKILL to the whole job after its first checkpoint, the same command again: it must
    say it resumes from that checkpoint's step and finish."""
    out = os.path.join(cfg["out_dir"], "pretrain")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "pretrain.py",
               f"--device={cfg['device']}", f"--out_dir={out}", "--pictures=1", *sizes, *cfg["pretrain_flags"].split()]
    os.makedirs(out, exist_ok=True)
    ckpt, start = os.path.join(out, "ckpt.pt"), time.perf_counter()
    with open(os.path.join(out, "first_attempt.txt"), "w+") as output:  # the run's own words, should it fail
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        while not os.path.exists(ckpt) and job.poll() is None and time.perf_counter() - start < cfg["timeout"]:
            time.sleep(0.1)
        timed_out = job.poll() is None and not os.path.exists(ckpt)
        kill_job(job.pid, cfg["timeout"])
        job.wait()
        output.seek(0)
        first = output.read()
    if not os.path.exists(ckpt):
        ended = f"no checkpoint in {cfg['timeout']} s" if timed_out else f"exit {job.returncode} before a checkpoint"
        return [("torchrun pretrain.py: kill and resume", "FAILED", f"{ended}: {tail(first)}")]
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    code, seconds, stdout, stderr = run(command, cfg["timeout"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps, peak = [row for row in log if "loss" in row], log[0].get("peak_source", "")  # not the monitor's rows
    ok = code == 0 and f"resuming from {ckpt} at step {killed_at}" in stdout and "done:" in stdout
    note = (f"{gpus} processes, killed after step {killed_at}, resumed from it to step {steps[-1]['step']}; last loss "
            f"{steps[-1]['loss']:.3f}, {steps[-1]['img_s']:.0f} img/s, MFU {steps[-1]['mfu']:.1%} of {peak}" if ok
            else f"exit {code} after resuming from step {killed_at}: {tail(stderr or stdout)}")
    return [("torchrun pretrain.py: kill and resume", "ok" if ok else "FAILED", note)]


def main():
    cfg, _ = common.configure(config, __doc__, __file__)
    if cfg["device"] != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, so nothing to check (python gpu_check.py --device=cpu --tiny=True "
              "runs the same steps on this CPU)")
        return
    out, marker = cfg["out_dir"], os.path.join(cfg["out_dir"], "gpu_check.started")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(marker):  # never wipe a folder not ours
        common.fail(f"--out_dir={out} holds files gpu_check.py did not write, and every check starts from an empty "
                    "folder: give it a new one")
    shutil.rmtree(out, ignore_errors=True)  # every check from scratch
    os.makedirs(out)
    open(marker, "w").close()
    gpus = torch.cuda.device_count() if cfg["device"] != "cpu" else 2  # 2 CPU processes: gloo instead of NCCL
    if cfg["tiny"]:
        model_sizes = ["--model=tiny", "--img_size=32", "--patch_size=4", "--batch_size=4", "--vocab_size=64",
                       "--warmup=1", "--steps=2"]
        run_sizes = ["--num_images=64", "--batch_size=16", "--epochs=4", "--vocab_size=16", "--tokenizer_samples=512",
                     "--img_size=16", "--min_block=2", "--workers=0", "--log_every=2"]
        downstream = ["--num_images=64", "--batch_size=16", "--workers=0"]
    else:  # a few hundred steps of ViT-S at 64 px on the built-in scenes
        model_sizes = ["--model=base", "--batch_size=128"]
        run_sizes = ["--num_images=8192", f"--batch_size={64 * gpus}", "--epochs=3", "--model=small", "--img_size=64",
                     "--patch_size=8", "--vocab_size=1024", "--tokenizer_samples=200000", "--log_every=20"]
        downstream = ["--num_images=4096", "--batch_size=256"]
    rows, started = [], time.perf_counter()
    settings = dict(device=cfg["device"], dtype="auto")
    device, autocast, scaler = common.setup(settings)  # as every script: TF32 off, the dtype --dtype=auto picks
    guarded(rows, "precision on the device", precision_rows, cfg, device, settings["dtype"])
    if device.type == "cuda":
        guarded(rows, "host syncs", sync_rows, cfg, device, autocast, scaler)
        torch.cuda.empty_cache()  # the runs below have the GPU to themselves (but for this process's context)
    for compiled in (False, True) if cfg["device"] != "cpu" else (False,):  # compiling on a CPU: minutes
        guarded(rows, f"bench.py{' (compiled)' if compiled else ''}", bench, cfg, compiled, model_sizes)
    small = model_sizes if cfg["tiny"] else ["--model=small", "--batch_size=256"]
    guarded(rows, "bench.py (ViT-S)", bench, cfg, False, small, " (ViT-S)")
    guarded(rows, "device path", device_path_rows, cfg, device)
    guarded(rows, "torchrun pretrain.py: kill and resume", pretrain_kill_resume, cfg, gpus, run_sizes)
    ckpt = os.path.join(cfg["out_dir"], "pretrain", "ckpt.pt")
    for script, flags in (("probe.py", ["--probe_epochs=5"]), ("finetune.py", ["--epochs=1", "--warmup_epochs=0"])):
        if not os.path.exists(ckpt):
            rows.append((f"{script} on its checkpoint", "FAILED", "no checkpoint: the pre-training failed"))
            continue
        code, seconds, stdout, stderr = run([sys.executable, script, f"--init={ckpt}", f"--device={cfg['device']}",
                                             f"--out_dir={os.path.join(cfg['out_dir'], script[:-3])}", *downstream,
                                             *flags], cfg["timeout"])
        rows.append((f"{script} on its checkpoint", "ok" if code == 0 else "FAILED",
                     f"{seconds:.0f} s: {tail(stdout, 1) if code == 0 else f'exit {code}: ' + tail(stderr)}"))
    path = "device path: workers to feed the step" if cfg["device"] != "cpu" else "loader workers to feed the step"
    workers = next((float(value) for name, value, _ in rows if name == path), None)  # pretrain.py's loader there
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers is not None and math.isfinite(workers):
        limit = "the loader" if workers * gpus > cores - gpus else "the GPU"
        rows.append(("what limits the step", limit, f"{workers:.1f} workers per GPU x {gpus} GPUs, {cores} cores"))
    name = torch.cuda.get_device_name() if cfg["device"] != "cpu" else "CPU"
    print(f"\ngpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| check | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    with open(os.path.join(cfg["out_dir"], "gpu_check.json"), "w") as f:
        json.dump(dict(config=cfg, device=name, torch=torch.__version__, rows=rows), f, indent=1)
    failed = [name for name, value, _ in rows if value == "FAILED"]
    summary = f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""
    print(f"\nsaved {cfg['out_dir']}/gpu_check.json{summary}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
