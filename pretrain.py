"""
Pre-train a ViT with SplitMask (split, inpaint, match) or the BEiT baseline.

    python pretrain.py                                    # built-in data, CPU or one GPU, minutes
    python pretrain.py --dataset=imagenette --data_root=../shared/data/imagenette2
    torchrun --nproc_per_node=8 pretrain.py --dataset=coco --data_root=/data/coco

Every name in `config` below is a flag: --name=value. A relaunch of the same command resumes from
out_dir. Table 8 of the paper: --method=beit | --method=splitmask with --nce_weight=0 (split+inpaint),
--mim_weight=0 (split+match), or both weights 1 (full, the default).
"""
import ctypes
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import tokenizers
from model import VIT_SIZES, BEiT, SplitMask, ViT, param_groups

# -----------------------------------------------------------------------------
# configuration; `None` means "take the dataset preset's value" (see PRESETS)
config = dict(
    out_dir="out/pretrain",
    dataset="synthetic",  # synthetic | imagefolder | folder | imagenette | coco | imagenet | cifar10 | ...
    data_root="",
    fraction=1.0,  # class-balanced subset of a labelled set (ImageNet 1% / 10%)
    num_images=2000,  # synthetic only
    # method (Table 8 rows)
    method="splitmask",  # splitmask | beit
    mim_weight=1.0,
    nce_weight=1.0,
    temperature=0.2,
    mask_ratio=None,  # splitmask: share hidden from each branch (0.5 complements); beit: ~0.4
    mask_kind=None,  # block | random
    min_block=None,  # smallest block, in patches (BEiT: 16 of 196)
    # model
    model=None,  # tiny | small | base | large
    img_size=None,
    patch_size=None,
    drop_path=0.1,
    layer_scale=0.1,
    decoder_depth=2,
    # visual words (training-free tokenizers, paper Sec. 4)
    tokenizer="kmeans",  # kmeans | random_patches | random_projection
    vocab_size=None,
    tokenizer_samples=None,  # patches sampled for k-means / random patches (paper: 3M)
    # optimisation (BEiT recipe)
    epochs=None,
    batch_size=None,  # GLOBAL batch: split over processes and accumulation steps
    accum_steps=1,  # note: each micro-batch has its own InfoNCE negatives
    blr=None,  # learning rate at batch 2048, scaled linearly with the batch (BEiT: 1.5e-3)
    min_lr=1e-5,
    warmup_epochs=None,
    weight_decay=0.05,
    beta2=0.999,
    clip_grad=3.0,
    crop_min_scale=None,
    strong_aug=None,
    # system
    device="auto",  # auto | cpu | cuda
    dtype="auto",  # auto (bfloat16 on GPUs that support it, else float32) | bfloat16 | float16 | float32
    compile=False,
    workers=None,
    seed=0,
    log_every=10,  # steps
    save_every=1,  # epochs
    picture_every=None,  # epochs
    override_config=False,  # resume a run folder even though settings changed
)

# METHOD.md's recipe per dataset: same number of updates as 300 ImageNet epochs, capped at 5000.
REAL = dict(model="small", blr=1.5e-3, img_size=224, patch_size=16, vocab_size=8192, tokenizer_samples=1_000_000,
            batch_size=2048, warmup_epochs=10, mask_kind="block", min_block=16, crop_min_scale=0.08,
            strong_aug=False, workers=8)
SMALL = dict(REAL, mask_kind="random", mask_ratio=0.75, strong_aug=True, epochs=5000)  # against overfitting
PRESETS = {
    "synthetic": dict(model="tiny", img_size=32, patch_size=4, vocab_size=256, tokenizer_samples=50_000,
                      batch_size=64, epochs=5, warmup_epochs=1, blr=1.5e-2, mask_kind="block", min_block=4,
                      crop_min_scale=0.5, strong_aug=False, workers=2, picture_every=2),
    "imagenet": dict(REAL, model="base", epochs=300),
    "coco": dict(REAL, model="base", epochs=3000),
    "ade20k": dict(REAL, model="base", epochs=21000, crop_min_scale=0.25),
    "inat2018": dict(REAL, epochs=800),
    "inat2019": dict(REAL, epochs=1400),
    "food101": dict(REAL, epochs=5000),
    **{name: SMALL for name in ["cars", "clipart", "painting", "sketch", "imagenette", "imagefolder", "folder"]},
    **{name: dict(SMALL, img_size=32, patch_size=4, batch_size=256, min_block=4) for name in ["cifar10", "cifar100"]},
}


def parse_config(config, presets, argv):
    """--key=value overrides with the type of the default; --help lists every key; unknown keys fail."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nflags (default):")
        for key, value in config.items():
            print(f"  --{key}={value}")
        sys.exit(0)
    overrides = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in config:
            close = [k for k in config if k.split("_")[0] in key] if eq else []
            sys.exit(f"error: unknown or malformed flag {arg!r} (expected --key=value; see --help){f'; did you mean {close}?' if close else ''}")
        overrides[key] = value
    dataset = overrides.get("dataset", config.get("dataset"))
    if presets is not None and dataset not in presets:
        sys.exit(f"error: unknown --dataset={dataset!r}; choose one of {sorted(presets)}")
    cfg = dict(config)
    for key, value in (presets or {}).get(dataset, {}).items():
        if cfg[key] is None:
            cfg[key] = value
    for key, text in overrides.items():
        default = config[key] if config[key] is not None else cfg[key]
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = text.lower() in ("true", "1")
            elif isinstance(default, str):
                cfg[key] = text
            elif default is None:  # no type to follow: a number if it reads as one
                cfg[key] = next((t(text) for t in (int, float) if _parses(t, text)), text)
            else:
                cfg[key] = type(default)(text)
        except ValueError:
            sys.exit(f"error: --{key}={text!r} is not a valid {type(default).__name__}")
    return cfg


def _parses(kind, text):
    try:
        kind(text)
        return True
    except ValueError:
        return False


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` gives one process. Returns (rank, world, device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device, local_rank) if device == "cuda" else torch.device(device)


def autocast_setup(dtype, device):
    """Returns (resolved dtype name, autocast context, GradScaler or None)."""
    if dtype == "auto":  # bf16 where the hardware has it (CPUs: AVX512-BF16 or AMX), else fp32
        cpu_bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        dtype = "bfloat16" if cpu_bf16 or (device.type == "cuda" and torch.cuda.is_bf16_supported()) else "float32"
    if dtype not in ("bfloat16", "float16", "float32"):
        sys.exit(f"error: --dtype={dtype!r}: choose auto, bfloat16, float16 or float32")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler(device.type) if dtype == "float16" else None
    return dtype, ctx, scaler


def keep_freed_memory():
    """CPU training: let glibc keep freed memory for the next step instead of returning it.

    By default every freed block over 32 MiB goes back to the kernel and comes back as fresh zeroed
    pages: a ViT-S/16 SplitMask step (vocabulary logits over 2B x n/2 patches, 103 MB at batch 16)
    takes about 250k page faults and 0.4-2 s of kernel time per 5 s step (bench.py), BEiT's 100k.
    Kept in the heap, they cost nothing after the first step, as GPU memory does in PyTorch's caching
    allocator. The resident size stays at the peak. Not glibc (macOS, musl): nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets a mapping of its own (those are unmapped when freed)
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GiB free at the top of the heap


def lr_at(step, total_steps, warmup_steps, peak, floor):
    """Linear warm-up, then cosine decay to floor."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename over the old one, so a kill never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so even a power cut leaves one whole file
    os.replace(tmp, path)


def load_checkpoint(path, device, keys=("model",)):
    """torch.load with weights_only=True: a pickle that tries to run code is refused, not run."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot read checkpoint {path}: {str(e).splitlines()[0]}")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        sys.exit(f"error: {path} is not a splitmask checkpoint (it has no {' / '.join(keys)} entry)")
    return state


def measure_peak_flops(device, dtype, repeats=5):
    """Dense matmul FLOP/s of this device and dtype, measured now: the MFU denominator. The fastest of a
    few calls counts (pretraining re-times it each minute and keeps the best): on a shared machine,
    other work only ever adds time."""
    # CPUs emulate fp16, and bf16 without AVX512-BF16/AMX, at about 1 GFLOP/s: keep those calls short
    emulated = dtype == "float16" or (dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    size = 8192 if device.type == "cuda" else 512 if emulated else 2048
    gen = torch.Generator(device).manual_seed(0)  # its own generator: the training RNG stream stays as it is
    a = torch.randn(size, size, device=device, generator=gen).to(getattr(torch, dtype))
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / min(seconds[1:])  # the first call warms up


def save_picture(path, model, images, masks, vocab, patch_size):
    """Rows: original, subset A, subset B, A's inpainting, B's inpainting (words rendered as patches).
    BEiT: original, visible patches, inpainting."""
    from torchvision.utils import save_image

    enc = model.encoder
    grid = enc.grid
    with torch.no_grad():
        tokens = tokenizers.tokenize(images, vocab, patch_size)
        out = model(images, tokens, masks)
        # unit-norm words get the average patch norm so they show at a natural contrast
        scale = tokenizers.tokenizer_patches(images, patch_size).norm(dim=-1).mean()
    if path is None:
        return
    B, n = images.shape[0], enc.num_patches

    def patches_only(keep):  # grey everywhere but the given patch indices [B, k]
        m = torch.zeros(B, n, device=images.device).scatter_(1, keep, 1.0).view(B, 1, *grid)
        m = m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        return images * m, m

    rows = [images]
    if masks.dim() == 3:  # splitmask: visible [B, 2, k]
        a, b = masks[:, 0], masks[:, 1]
        rows += [patches_only(a)[0], patches_only(b)[0]]
        predictions = ((a, b, out["pred_ids"][:B]), (b, a, out["pred_ids"][B:])) if "pred_ids" in out else ()
        for seen, other, pred in predictions:  # none when the MIM head is off (split + match)
            words = tokens.clone().scatter_(1, other, pred)
            painted = tokenizers.render(words, vocab, grid, patch_size) * scale
            # its own pixels where it looked, its predicted words where the other branch looked;
            # patches neither branch saw (75% masking, odd n) are not predicted and stay grey
            rows.append(patches_only(seen)[0] + painted * patches_only(other)[1])
    else:  # beit: masked [B, m]
        words = tokens.clone().scatter_(1, masks, out["pred_ids"])
        painted = tokenizers.render(words, vocab, grid, patch_size) * scale
        all_idx = torch.arange(n, device=images.device).expand(B, n)
        visible = all_idx[~torch.zeros(B, n, dtype=torch.bool, device=images.device).scatter_(1, masks, True)].view(B, -1)
        kept, m = patches_only(visible)
        rows += [kept, kept + painted * (1 - m)]
    picture = torch.cat([data.denormalize(r.float().cpu()) for r in rows])
    zoom = max(1, 128 // images.shape[-1])  # small images are enlarged so the patches can be seen
    save_image(picture.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3), path, nrow=B, padding=2)


# -----------------------------------------------------------------------------

# Settings that may change when a run resumes; any other change needs --override_config=True.
FREE_TO_CHANGE = ("out_dir", "workers", "log_every", "save_every", "picture_every", "compile", "device", "override_config")


def refuse_changed_config(saved, cfg, path):
    """A run folder resumes only with the settings it was made with (unless --override_config=True)."""
    changed = {k: (saved.get(k), v) for k, v in cfg.items() if k not in FREE_TO_CHANGE and saved.get(k) != v}
    if changed and not cfg["override_config"]:
        sys.exit(f"error: {path} was made with other settings (saved, now): {changed}. Use another "
                 "--out_dir, or --override_config=True to resume with the new ones.")


def train_step(model, optimizer, scaler, autocast, micro_batches, vocab, patch_size, clip_grad, token_dtype=torch.float32):
    """One optimizer step over the micro-batches (gradient accumulation). Returns a tensor of
    [loss, mim_loss, nce_loss, mim_acc, grad_norm] summed over micro-batches, left on the device:
    reading it is a host sync, which the loop does only when it logs."""
    stats = 0
    for i, (imgs, masks) in enumerate(micro_batches):
        with torch.no_grad():
            tokens = tokenizers.tokenize(imgs, vocab, patch_size, token_dtype)  # on the device, inside the step
        sync = i == len(micro_batches) - 1 or not isinstance(model, DDP)
        with autocast, (nullcontext() if sync else model.no_sync()):
            out = model(imgs, tokens, masks)
        loss = out["loss"] / len(micro_batches)
        (scaler.scale(loss) if scaler else loss).backward()
        stats = stats + torch.stack([out["loss"], out["mim_loss"], out["nce_loss"], out["mim_acc"]]).detach().float()
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)  # inf/nan when a gradient is
    if scaler:
        scaler.step(optimizer)  # skipped on every process at once when a gradient overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # x micro-batches: the caller divides every entry by the micro-batches it summed, the norm included
    return torch.cat([stats, grad_norm.detach().float().view(1) * len(micro_batches)])


def main():
    cfg = parse_config(config, PRESETS, sys.argv[1:])
    rank, world, device = setup_distributed(cfg["device"])
    master = rank == 0
    dtype, autocast, scaler = autocast_setup(cfg["dtype"], device)
    cfg["dtype"] = dtype
    if device.type == "cpu":
        keep_freed_memory()
    if cfg["mask_ratio"] is None:
        cfg["mask_ratio"] = 0.5 if cfg["method"] == "splitmask" else 0.4
    for ok, message in [  # the first broken rule stops the run with its message
        (cfg["method"] in ("splitmask", "beit"), f"--method={cfg['method']!r}: choose splitmask or beit"),
        (cfg["model"] in VIT_SIZES, f"--model={cfg['model']!r}: choose one of {list(VIT_SIZES)}"),
        (cfg["tokenizer"] in tokenizers.VOCAB_KINDS, f"--tokenizer={cfg['tokenizer']!r}: choose one of {tokenizers.VOCAB_KINDS}"),
        (cfg["patch_size"] > 0 and cfg["patch_size"] % 2 == 0, f"--patch_size={cfg['patch_size']} must be even (words are patches of the half-size image)"),
        (cfg["img_size"] > 0 and cfg["img_size"] % cfg["patch_size"] == 0, f"--img_size={cfg['img_size']} is not divisible by --patch_size={cfg['patch_size']}"),
        (cfg["batch_size"] > 0 and cfg["epochs"] > 0 and cfg["accum_steps"] > 0, "--batch_size, --epochs and --accum_steps must be positive"),
        (cfg["batch_size"] % (world * cfg["accum_steps"]) == 0, f"--batch_size={cfg['batch_size']} must be divisible by processes x accum_steps = {world * cfg['accum_steps']}"),
        (0 < cfg["mask_ratio"] < 1, f"--mask_ratio={cfg['mask_ratio']} must be in (0, 1)"),
        (cfg["method"] == "beit" or cfg["mask_ratio"] >= 0.5, f"--mask_ratio={cfg['mask_ratio']}: SplitMask's two disjoint subsets need at least 0.5"),
        (cfg["vocab_size"] >= 2, f"--vocab_size={cfg['vocab_size']} must be at least 2"),
        (cfg["tokenizer"] == "random_projection" or cfg["tokenizer_samples"] >= cfg["vocab_size"],
         f"--tokenizer_samples={cfg['tokenizer_samples']} must be at least --vocab_size={cfg['vocab_size']}"),
    ]:
        if not ok:
            sys.exit(f"error: {message}")
    # Preemption (SLURM and most schedulers send SIGTERM or SIGUSR1 first): finish the step, save, exit.
    # Installed before any work: a signal during the vocabulary pass is kept, not fatal.
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    micro_batch = cfg["batch_size"] // (world * cfg["accum_steps"])
    if master and cfg["accum_steps"] > 1 and cfg["method"] == "splitmask" and cfg["nce_weight"] > 0:
        print(f"warning: accum_steps={cfg['accum_steps']}: InfoNCE negatives come from each micro-batch "
              f"of {micro_batch * world} images, not from the global batch of {cfg['batch_size']}")
    torch.manual_seed(cfg["seed"] + rank)  # drop path differs per process; data order comes from the sampler
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")

    # data: masks are drawn per sample in the loader workers
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], cfg["drop_path"], cfg["layer_scale"])
    try:
        images = data.build_dataset(cfg["dataset"], cfg["data_root"], "train", cfg["img_size"], cfg["fraction"],
                                    cfg["seed"], cfg["num_images"])
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    transform = data.pretrain_transform(cfg["img_size"], cfg["crop_min_scale"], cfg["strong_aug"])
    train_set = data.MaskedImages(images, transform, encoder.grid, cfg["method"], cfg["mask_ratio"],
                                  cfg["mask_kind"], cfg["min_block"], seed=cfg["seed"])
    loader = data.make_loader(train_set, micro_batch, train=True, workers=cfg["workers"], seed=cfg["seed"])
    steps_per_epoch = len(loader) // cfg["accum_steps"]
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(images)} images give no full batch of {cfg['batch_size']}: lower --batch_size")
    total_steps = cfg["epochs"] * steps_per_epoch

    # model, optimizer, and the run folder's checkpoint if there is one
    resume = load_checkpoint(ckpt_path, device, ("model", "optimizer", "config", "vocab", "step")) if os.path.exists(ckpt_path) else None
    if resume is not None:
        refuse_changed_config(resume["config"], cfg, ckpt_path)
        vocab = resume["vocab"].to(device)
    elif cfg["tokenizer"] == "random_projection" or master:
        vocab = tokenizers.build_vocab(cfg["tokenizer"], cfg["vocab_size"], cfg["patch_size"], cfg["seed"], loader,
                                       cfg["tokenizer_samples"], device=device).to(device)
    if resume is None and world > 1:  # every process uses rank 0's vocabulary
        if not master and cfg["tokenizer"] != "random_projection":
            vocab = torch.empty(cfg["vocab_size"], 3 * (cfg["patch_size"] // 2) ** 2, device=device)
        dist.broadcast(vocab, 0)
    if cfg["method"] == "splitmask":
        model = SplitMask(encoder, cfg["vocab_size"], cfg["decoder_depth"], cfg["mim_weight"], cfg["nce_weight"], cfg["temperature"])
    else:
        model = BEiT(encoder, cfg["vocab_size"])
    flops_per_image = model.flops_per_image(cfg["mask_ratio"])
    model.to(device)
    peak_lr = cfg["blr"] * cfg["batch_size"] / 2048
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=peak_lr, betas=(0.9, cfg["beta2"]),
                                  fused=device.type == "cuda")
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = resume["step"]
        restore_rng(resume["rng"], rank, device)
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {step / steps_per_epoch:.2f})")
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg["method"] == "splitmask" and cfg["mim_weight"] == 0)
    peak_flops, peak_timed = (measure_peak_flops(device, dtype) if master else 1.0), time.perf_counter()
    log = open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") if master else None
    if master:
        log.write(json.dumps({"config": cfg, "world": world, "params": sum(p.numel() for p in raw_model.parameters())}) + "\n")
        print(f"{cfg['method']} ViT-{cfg['model']}/{cfg['patch_size']} at {cfg['img_size']}px on {world} x {device.type} ({dtype}); "
              f"{len(images)} images, {cfg['epochs']} epochs of {steps_per_epoch} steps, global batch {cfg['batch_size']}")

    def checkpoint():  # a collective (every process's RNG state), written by rank 0 only
        rng = gather_rng(world)
        if master:
            save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                            config=cfg, vocab=vocab.cpu(), scaler=scaler.state_dict() if scaler else {}, rng=rng))

    # the loop: an epoch that was cut short resumes at its next batch (same order, masks, augmentation)
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    picture_batch = None
    while step < total_steps:
        epoch = step // steps_per_epoch
        data.set_epoch(loader, epoch, skip_batches=(step % steps_per_epoch) * cfg["accum_steps"])
        model.train()
        sums, count, tick = 0, 0, time.perf_counter()
        batches = iter(loader)
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            lr = lr_at(step, total_steps, cfg["warmup_epochs"] * steps_per_epoch, peak_lr, cfg["min_lr"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            micro_batches = [[t.to(device, non_blocking=True) for t in next(batches)[:2]] for _ in range(cfg["accum_steps"])]
            if picture_batch is None:
                picture_batch = [t[:8].clone() for t in micro_batches[0]]  # a copy: a view would keep the batch
            sums = sums + train_step(model, optimizer, scaler, autocast, micro_batches, vocab, cfg["patch_size"],
                                     cfg["clip_grad"], torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            count += cfg["accum_steps"]
            step += 1
            bar.update(1)
            end_of_epoch = step % steps_per_epoch == 0
            if step % cfg["log_every"] and not end_of_epoch:
                continue
            # log step: the one host sync; every process learns of bad images and stop signals here
            totals = torch.cat([sums, torch.tensor([float(train_set.unreadable), float(bool(stop_signal))], device=device)])
            if world > 1:
                dist.all_reduce(totals)
            avg = (totals[:5] / (count * world)).tolist()
            unreadable, stop = int(totals[5]), bool(totals[6])
            if not all(map(math.isfinite, avg)) and scaler is None:
                sys.exit(f"error: non-finite {'loss' if not math.isfinite(avg[0]) else 'gradient'} at step {step} "
                         f"(epoch {epoch}); the last good checkpoint in {cfg['out_dir']} is kept. Try a lower --blr or --dtype=float32.")
            if scaler is not None and scaler.get_scale() < 1:  # halved at every overflow: from 65536, 17 in a row
                sys.exit(f"error: float16 gradients kept overflowing up to step {step}; try --dtype=bfloat16 or float32")
            if unreadable > 0.01 * len(images):
                sys.exit(f"error: {unreadable} unreadable images in epoch {epoch} (over 1% of {len(images)}); fix the dataset")
            img_s = count * micro_batch * world / (time.perf_counter() - tick)
            # MFU's denominator: the best matmul rate seen, re-timed each minute (one reading under load reads slow)
            if master and time.perf_counter() - peak_timed > 60:
                peak_flops, peak_timed = max(peak_flops, measure_peak_flops(device, dtype, 1)), time.perf_counter()
            row = dict(step=step, epoch=epoch, lr=lr, loss=avg[0], mim_loss=avg[1], nce_loss=avg[2], mim_acc=avg[3],
                       grad_norm=avg[4], img_s=img_s, mfu=img_s * flops_per_image / world / peak_flops, unreadable=unreadable)
            if master:
                bar.set_postfix(loss=f"{avg[0]:.3f}", mim=f"{avg[1]:.3f}", nce=f"{avg[2]:.3f}", acc=f"{avg[3]:.3f}",
                                img_s=f"{img_s:.0f}", mfu=f"{row['mfu']:.1%}")
                log.write(json.dumps(row) + "\n")
                log.flush()
            sums, count, tick = 0, 0, time.perf_counter()
            if stop:
                checkpoint()
                if master:
                    print(f"stop signal: saved {ckpt_path} at step {step}; the same command resumes from there")
                sys.exit(0)
        epoch += 1
        if unreadable and master:
            print(f"warning: {unreadable} unreadable images were skipped in epoch {epoch - 1}")
        if epoch % cfg["save_every"] == 0 or step == total_steps:
            checkpoint()
        if cfg["picture_every"] and (epoch % cfg["picture_every"] == 0 or step == total_steps):
            raw_model.eval()  # every process runs the forward (its InfoNCE gathers); rank 0 draws
            with autocast:
                save_picture(os.path.join(cfg["out_dir"], f"inpaint_{epoch:05d}.png") if master else None,
                             raw_model, *picture_batch, vocab, cfg["patch_size"])
    bar.close()
    if master:
        print(f"done: {cfg['out_dir']}/ckpt.pt, log.jsonl and pictures")
    if world > 1:
        dist.destroy_process_group()


def gather_rng(world):
    """Every process's RNG states (drop path), so that a resumed run continues each stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, device):
    """Continue this process's RNG streams from a checkpoint's gather_rng() list."""
    state = states[rank % len(states)]
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu())


if __name__ == "__main__":
    main()
