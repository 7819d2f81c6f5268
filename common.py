"""Plumbing shared by the stage scripts, none of it SplitMask, importing no project module: flags (--key=value,
--help, presets), processes (device, torchrun, autocast, rank 0 prints, errors), checkpoints (atomic, weights_only,
resume with every RNG stream), stopping (signals, health checks)."""
import atexit
import ctypes
import difflib
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
MASTER = RANK == 0
CHOICES = dict(recipe=("quick", "paper"), device=("auto", "cpu", "cuda"),
               dtype=("auto", "bfloat16", "float16", "float32"))
# Settings a run may change when it resumes; any other change needs --override_config=True.
FREE_TO_CHANGE = ("out_dir", "workers", "log_every", "save_every", "pictures", "compile", "device", "dtype",
                  "max_unreadable", "override_config", "monitor_every", "loader", "cache")


def print0(*args, **kwargs):
    if MASTER:
        print(*args, **kwargs, flush=True)


def fail(message):
    """Stop on bad input: the message once (not once per process), no traceback, exit code 1."""
    print0(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def check(cfg, rules=()):
    """Validate settings at the command line: the first broken (ok, message) rule, shared ones first, stops the run."""
    for key in ("img_size", "patch_size", "batch_size", "epochs", "log_every", "save_every", "probe_epochs", "knn_k"):
        if key in cfg and cfg[key] <= 0:
            fail(f"--{key}={cfg[key]} must be positive")
    shared = [(cfg["img_size"] % cfg["patch_size"] == 0,
               f"--img_size={cfg['img_size']} is not divisible by --patch_size={cfg['patch_size']}"),
              (cfg["fraction"] > 0 and (cfg["fraction"] <= 1 or cfg["fraction"] % 1 == 0),
               f"--fraction={cfg['fraction']} must be in (0, 1] (a share), or a whole number of images"),
              (0 < cfg.get("crop_ratio", 1) <= 1, f"--crop_ratio={cfg.get('crop_ratio')} must be in (0, 1]"),
              (cfg["workers"] >= 0, f"--workers={cfg['workers']} must be 0 or more")]
    if "epochs" in cfg:  # a training run
        shared += [(0 <= cfg["warmup_epochs"] <= cfg["epochs"], f"--warmup_epochs={cfg['warmup_epochs']} is more than "
                    f"--epochs={cfg['epochs']}: the learning rate would never reach its peak; pass a smaller one")]
    for ok, message in [*shared, *rules]:
        if not ok:
            fail(message)
    if "epochs" in cfg and cfg["warmup_epochs"] == cfg["epochs"]:
        print0(f"warning: --warmup_epochs={cfg['warmup_epochs']} of --epochs={cfg['epochs']}: the learning rate only "
               "rises, it never decays")


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def make_out_dir(cfg, suffix=""):
    """Create --out_dir and return it; "" is <the --init checkpoint><suffix>, beside it: runs of two never mix."""
    path = cfg["out_dir"] or (os.path.splitext(cfg["init"])[0] if cfg["init"] else "out/random_init") + suffix
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {path} ({e.strerror}); pass --out_dir=<a folder you can write to>")
    return path


# ----------------------------------------------------------------------------- flags

def configure(config, doc, script, presets={}, chosen=lambda cfg: [], choices={}):
    """cfg = config, then the presets that chosen(cfg) names (plain overrides, printed), then the flags; returns (cfg,
    the keys given as flags). A flag takes its default's type; `choices` limit values. --help: doc and comments."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print_help(config, doc, script, presets)
        sys.exit(0)
    given = {}
    for arg in sys.argv[1:]:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in config:
            close = dict.fromkeys(difflib.get_close_matches(key, config, 3, 0.6) + [k for k in config if key in k])
            hint = f"; did you mean {', '.join('--' + k for k in close)}?" if close and key and eq else ""
            fail(f"unknown or malformed flag {arg!r} (expected --key=value; see --help){hint}")
        kind, truth = type(config[key]), {"true": True, "1": True, "false": False, "0": False}
        try:
            given[key] = truth[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            fail(f"--{key}={text!r} is not a valid {kind.__name__}")
    cfg = dict(config)
    for name in [name for name in chosen({**config, **given}) if name in presets]:
        cfg.update(presets[name])
        print0(f"preset {name}: " + " ".join(f"--{k}={v}" for k, v in presets[name].items() if k not in given))
    cfg.update(given)
    for key, allowed in {**CHOICES, **choices}.items():
        if key in cfg and cfg[key] not in allowed:
            fail(f"unknown --{key}={cfg[key]!r}; choose one of {', '.join(allowed)}")
    return cfg, set(given)


def print_help(config, doc, script, presets):
    """The docstring, then each flag with its default, its comment and the values presets give it (one that
    lacks the flag gives the default): for a recipe, its usual value, then the datasets that differ."""
    with open(script) as f:
        block = f.read().split("config = dict(", 1)[1].split("\n)", 1)[0]
    comments = dict(re.findall(r"^    (\w+)=.*?#\s*(.*)$", block, re.M))
    print(doc.strip() + "\n\nflags (--key=value), each with its default:")
    for key, value in config.items():
        print(f"  --{key}={value}".ljust(35), comments.get(key, ""))
        parts = []
        for recipe in dict.fromkeys(name.split("/")[-1] for name, overrides in presets.items() if key in overrides):
            values = {name.split("/")[0]: overrides.get(key, value) for name, overrides in presets.items()
                      if name.split("/")[-1] == recipe}
            usual = max(values.values(), key=list(values.values()).count)
            others = [f"{dataset} {v}" for dataset, v in values.items() if v != usual]
            parts.append(f"{recipe} {usual}" + (f" ({', '.join(others)})" if others else ""))
        if parts:
            print(" " * 36 + "presets: " + "; ".join(parts))


# ----------------------------------------------------------------------------- processes

def setup(cfg):
    """Device, process group (under torchrun) and mixed precision. Returns (device, autocast, scaler)."""
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        fail("--device=cuda but PyTorch sees no CUDA GPU here: use --device=cpu, or a CUDA build of PyTorch")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # hide the GPUs: torch.optim asks the GPU about graph capture at every step, starting CUDA on GPU 0
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        keep_freed_memory()
    # No TF32: --dtype=float32 is float32, and bf16 runs keep InfoNCE, k-means and the words in full float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if WORLD > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(leave_process_group)
    if cfg["dtype"] == "auto":  # bfloat16 on GPUs that have it natively (A100 and later), else float16 (V100, T4)
        native = cuda and torch.cuda.get_device_capability(device) >= (8, 0)
        cfg["dtype"] = "bfloat16" if native else "float16" if cuda else "float32"
        print0(f"--dtype=auto: {cfg['dtype']} on {torch.cuda.get_device_name(device) if cuda else 'the CPU'}")
    autocast = torch.autocast(device.type, getattr(torch, cfg["dtype"]), enabled=cfg["dtype"] != "float32")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["dtype"] == "float16")  # a no-op unless float16
    return device, autocast, scaler


def leave_process_group():
    """At exit: destroy the process group; after an uncaught error abort it instead, since a destroy first waits for
    the collectives in flight (NCCL flushes them), which the other processes, stopped by torchrun, never finish."""
    if dist.is_initialized() and hasattr(sys, "last_value"):  # set by Python for an uncaught exception
        dist.distributed_c10d._abort_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, cfg, device, **ddp_options):
    """The model as the training loop calls it: compiled if asked, in DistributedDataParallel under torchrun."""
    if cfg["compile"]:
        model = torch.compile(model)
    if WORLD > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None,
                                                          **ddp_options)
    return model


def log(cfg, row):
    """Append one JSON line to out_dir/log.jsonl (rank 0 only)."""
    if MASTER:
        with open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def keep_freed_memory():
    """CPU training: keep freed blocks in the heap, as PyTorch's GPU allocator does (glibc gives those over 32 MiB
    back to the kernel, and each step's activations would come back as fresh pages, one fault at a time)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets a mapping of its own
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at the top of the heap


# Spec-sheet dense peak FLOP/s (16-bit, float32 without TF32), MFU's denominator; the first name found wins.
PEAK_FLOPS = {"H100 NVL": (835e12, 60e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
              "H800": (989e12, 67e12), "H200": (989e12, 67e12), "GH200": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "4090": (165e12, 82.6e12)}


def peak_flops(device, dtype):
    """The MFU's denominator and what it is: a known GPU's spec sheet, else a dense matmul timed now."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for gpu, (half, single) in PEAK_FLOPS.items():
        if re.search(rf"\b{gpu}\b", name):  # a whole word: "A100" is not "RTX A1000"
            return (single if dtype == "float32" else half), f"{gpu} spec sheet, {dtype}"
    size = 8192 if device.type == "cuda" else 512 if dtype == "float32" else 256  # CPUs may emulate 16 bits
    a = torch.randn(size, size, device=device, generator=torch.Generator(device)).to(getattr(torch, dtype))
    sync, seconds = torch.cuda.synchronize if device.type == "cuda" else lambda: None, []
    for _ in range(4):  # the fastest of 4 rounds of 10 back to back: a GPU's launches then cost nothing
        sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        sync()
        seconds.append((time.perf_counter() - start) / 10)
    where = f"this GPU ({name}: no spec sheet here)" if device.type == "cuda" else "this CPU"
    return 2 * size**3 / min(seconds), f"a {dtype} matmul measured on {where}"


def set_lr(optimizer, step, total_steps, warmup_steps, peak, floor):
    """Linear warm-up, then cosine decay to floor, times each param group's lr_scale (layer decay). Returns it."""
    if step < warmup_steps:
        lr = peak * (step + 1) / warmup_steps
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        lr = floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


# ----------------------------------------------------------------------------- checkpoints

def save(path, state):
    """Atomic: a temporary file, flushed to disk, renamed over the old one: a kill at any moment leaves a whole one."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load(path):
    """torch.load(weights_only=True): tensors and plain values only, so a file cannot run code."""
    if not os.path.isfile(path):
        fail(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path}: " + ("it holds Python objects, which could run code when loaded; "
             "refused" if "GLOBAL" in str(e) else f"not a PyTorch file ({type(e).__name__})"))
    if isinstance(state, dict) and any(key.startswith(("patch_embed.", "blocks.")) for key in state):
        fail(f"{path} is not a splitmask checkpoint but a timm-layout state dict; convert it first: "
             f"python export.py --ckpt={path} --out=converted.pt --to=ours")
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        fail(f"{path} is not a splitmask checkpoint (it has no model and config entries)")
    return state


def resume(path, cfg, model, optimizer, scaler):
    """Continue the run in cfg["out_dir"] if it has a checkpoint: model, optimizer, scaler and this
    process's RNG streams. Refuses other settings, naming them. Returns the checkpoint, or None."""
    state = load(path) if os.path.exists(path) else None
    last_step = state["step"] if state else -1  # no checkpoint: a new run, whose log keeps no step (0 included)
    changed = {k: (state["config"].get(k), v) for k, v in cfg.items()
               if k not in FREE_TO_CHANGE and state["config"].get(k) != v} if state else {}
    if state:  # weights of another shape (--model, --patch_size, --img_size, --vocab_size...) cannot resume at all
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:
            fail(f"{path} holds a network of another shape than these settings make ({changed}): it cannot resume. Use "
                 "a new --out_dir" + (f", or --init={path} to start anew from its weights" if "init" in cfg else ""))
    if changed and not cfg["override_config"]:
        fail(f"{path} was made with other settings (saved, now): {changed}. Use another --out_dir, or "
             "--override_config=True to resume with the new ones.")
    if changed:
        jumps = ", ".join(f"--{k}" for k in ("epochs", "warmup_epochs", "batch_size", "blr", "min_lr") if k in changed)
        print0("resuming with other settings: " + ", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items())
               + (f" ({jumps}: the learning-rate schedule is recomputed, so the rate jumps here)" if jumps else ""))
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if MASTER and os.path.exists(log_path):  # rows logged after the checkpoint come again (and a half-written one)
        with open(log_path) as f:
            rows = [row for row in f if row.endswith("\n") and json.loads(row).get("step", -1) <= last_step]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(log_path + ".tmp", log_path)  # atomic, as checkpoints
    if state is None:
        return None
    for saved, group in zip(state["optimizer"]["param_groups"], optimizer.param_groups):
        saved.update(fused=group["fused"], foreach=group["foreach"])  # this device's kernels, not the saver's
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():  # empty unless the run trained in float16 (--dtype may change)
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"][RANK % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_initialized():  # a run on the CPU never starts CUDA
        torch.cuda.set_rng_state(rng["cuda"])
    print0(f"resuming from {path} at step {state['step']}")
    return state


def save_run(path, cfg, model, optimizer, scaler, step, **extra):
    """A collective (every process's RNG state goes in); rank 0 writes the file."""
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized() else {}  # a CPU run never starts CUDA
    rngs = [{"cpu": torch.get_rng_state(), **cuda}]
    if WORLD > 1:
        rngs, rng = [None] * WORLD, rngs[0]
        dist.all_gather_object(rngs, rng)
    if MASTER:
        save(path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        step=step, config=cfg, rng=rngs, **extra))


# ----------------------------------------------------------------------------- stopping

class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (what SLURM sends before a kill): the training loop asks after every step,
    saves and exits 0, and the same command resumes. Before the loop (the vocabulary pass) the run stops at once."""

    def __init__(self):
        self.received, self.training = False, False
        # every process is asked over gloo, on the CPU: asking does not wait for the GPU
        self.group = dist.new_group(backend="gloo") if WORLD > 1 and dist.get_backend() != "gloo" else None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if not self.training:  # the folder holds nothing yet: the same command starts again
            print0(f"{signal.Signals(signum).name} before training started: nothing saved yet", file=sys.stderr)
            sys.exit(128 + signum)  # the shell's code for a process a signal stopped
        self.received = True

    def __call__(self):
        """True on every process once any process got a signal (a collective: all stop after the same step)."""
        if WORLD == 1:
            return self.received
        flag = torch.tensor([float(self.received)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0

    def exit(self, path, step):
        print0(f"\nstop signal: saved {path} at step {step}; the same command resumes from there")
        sys.exit(0)


def check_health(cfg, step, losses, scaler, unreadable, num_images, epoch):
    """Stop a run that went wrong; the last checkpoint, written before it did, is kept."""
    if not scaler.is_enabled() and not all(map(math.isfinite, losses)):
        fail(f"non-finite {'loss' if not math.isfinite(losses[0]) else 'gradient'} at step {step} (epoch {epoch}); "
             f"the last good checkpoint in {cfg['out_dir']} is kept. Try a lower --blr, or --dtype=float32.")
    if scaler.get_scale() < 1:  # halved at every overflow: from 65536, 17 in a row
        fail(f"float16 gradients kept overflowing up to step {step}; try --dtype=bfloat16 or float32")
    if unreadable > cfg["max_unreadable"] * num_images:
        fail(f"{unreadable} unreadable images in epoch {epoch} (over {cfg['max_unreadable']:.0%} of {num_images}); "
             "fix the dataset, or allow more with --max_unreadable")
