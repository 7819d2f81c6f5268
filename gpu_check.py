"""
What the first minutes on a GPU machine should check, as one table (also saved as JSON):

    make gpu-check                                  # = python gpu_check.py; at most 5 minutes on one GPU
    python gpu_check.py --device=cpu --tiny=True    # the same steps at toy sizes on a CPU (the tests run this)

1. bench.py's step rows for ViT-B/16 at 224 px in bf16, eager and with --compile=True: img/s, MFU of
   the measured matmul and of the datasheet, peak memory, hours for 300 ImageNet epochs;
2. torchrun pretrain.py on every GPU on the built-in scenes (NCCL, the InfoNCE gather across GPUs,
   checkpoints), killed after its first checkpoint and resumed; then probe.py and finetune.py for a
   few steps on its checkpoint;
3. bench.py's loader rows on 640x480 JPEGs: one worker against plain torchvision, and how many
   workers the step needs, against the cores this machine has.
Without CUDA it says so and exits 0.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

import common

config = dict(
    device="auto",  # auto (cuda if there is one; without, say so and exit) | cpu | cuda
    tiny=False,  # toy sizes: ViT-Tiny at 32 px, a few steps (the test suite's CPU run)
    out_dir="out/gpu_check",  # the runs, bench JSON and gpu_check.json
    timeout=600,  # seconds any one step may take before it counts as failed
)


def run(command, timeout):
    """A command's (exit code, seconds, last lines of its output), never raising."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout if done.returncode == 0 else done.stderr
    except subprocess.TimeoutExpired:
        code, output = "timeout", ""
    return code, time.perf_counter() - start, " ".join(output.strip().splitlines()[-2:])[-300:]


def bench(cfg, compiled, sizes):
    out = os.path.join(cfg["out_dir"], f"bench_{'compiled' if compiled else 'eager'}.json")
    command = [sys.executable, "bench.py", f"--device={cfg['device']}", f"--compile={compiled}", "--nce_sizes=",
               f"--loader={not compiled}", f"--out={out}", *sizes]
    code, seconds, tail = run(command, cfg["timeout"])
    rows = json.load(open(out))["rows"] if code == 0 else [("bench.py failed", str(code), tail)]
    return [(f"{name}{' (compiled)' if compiled else ''}", value, note) for name, value, note in rows
            if compiled is False or "step" in name or "MFU" in name or "epochs" in name or "memory" in name]


def pretrain_kill_resume(cfg, gpus, sizes):
    """torchrun pretrain.py, a SIGKILL to the whole job after its first checkpoint, the same command again."""
    out = os.path.join(cfg["out_dir"], "pretrain")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "pretrain.py",
               f"--device={cfg['device']}", f"--out_dir={out}", "--pictures=1", *sizes]
    job, start = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True), time.perf_counter()
    ckpt = os.path.join(out, "ckpt.pt")
    while not os.path.exists(ckpt) and job.poll() is None and time.perf_counter() - start < cfg["timeout"]:
        time.sleep(0.5)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"] if os.path.exists(ckpt) else None
    code, seconds, tail = run(command, cfg["timeout"])
    state = torch.load(ckpt, weights_only=True) if os.path.exists(ckpt) else {"step": None}
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))] if os.path.exists(ckpt) else []
    steps = [r for r in log if "step" in r]
    ok = code == 0 and killed_at is not None and state["step"] > killed_at
    return ok, (f"{gpus} processes, killed after step {killed_at}, resumed to step {state['step']}; last loss "
                f"{steps[-1]['loss']:.3f}, {steps[-1]['img_s']:.0f} img/s, MFU {steps[-1]['mfu']:.1%}"
                if ok else f"exit {code}: {tail}"), time.perf_counter() - start, ckpt


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
        run_sizes = ["--num_images=64", "--batch_size=16", "--epochs=2", "--vocab_size=16", "--tokenizer_samples=512",
                     "--img_size=16", "--min_block=2", "--workers=0", "--log_every=2"]
        downstream = ["--num_images=64", "--batch_size=16", "--workers=0"]
    else:  # a few hundred steps of ViT-S at 64 px on the built-in scenes
        model_sizes = ["--model=base", "--batch_size=128"]
        run_sizes = ["--num_images=8192", f"--batch_size={64 * gpus}", "--epochs=3", "--model=small", "--img_size=64",
                     "--patch_size=8", "--vocab_size=1024", "--tokenizer_samples=200000", "--log_every=20"]
        downstream = ["--num_images=4096", "--batch_size=256"]
    rows, started = [], time.perf_counter()
    for compiled in (False, True) if cfg["device"] != "cpu" else (False,):  # compiling on a CPU: minutes
        rows += bench(cfg, compiled, model_sizes)
    ok, note, seconds, ckpt = pretrain_kill_resume(cfg, gpus, run_sizes)
    rows.append(("torchrun pretrain.py: kill and resume", "ok" if ok else "FAILED", note))
    for script, flags in (("probe.py", ["--probe_epochs=5"]), ("finetune.py", ["--epochs=1", "--warmup_epochs=0"])):
        out = os.path.join(cfg["out_dir"], script[:-3])
        code, seconds, tail = run([sys.executable, script, f"--init={ckpt}", f"--device={cfg['device']}",
                                   f"--out_dir={out}", *downstream, *flags], cfg["timeout"])
        rows.append((f"{script} on its checkpoint", "ok" if code == 0 else "FAILED", f"{seconds:.0f} s: {tail}"))
    workers = next((float(value) for name, value, _ in rows if name == "loader workers to feed the step"), None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers is not None:
        limit = "the loader" if workers * gpus > cores - gpus else "the GPU"
        rows.append(("what limits the step", limit, f"{workers:.1f} workers per GPU x {gpus} GPUs, {cores} cores"))
    name = torch.cuda.get_device_name() if cfg["device"] != "cpu" else "CPU"
    print(f"\ngpu_check on {name}, torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s\n")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")
    with open(os.path.join(cfg["out_dir"], "gpu_check.json"), "w") as f:
        json.dump(dict(config=cfg, rows=rows), f, indent=1)
    print(f"\nsaved {cfg['out_dir']}/gpu_check.json")
    if not all(value != "FAILED" for _, value, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
