"""
Speed of the real training step, as ratios measured in one run (they hold on noisy shared machines).

    python bench.py                                    # ViT-S/16 at 224 px: float32 on a CPU, bfloat16 on a GPU
    python bench.py --device=cuda --model=base --batch_size=256 --compile=True
    python bench.py --data=data/imagenette2            # the loading rows on a dataset's own files

Rows: the SplitMask step (pretrain.train_step on random batches) in img/s and MFU against a dense
matmul (and pretrain.py's denominator, a spec sheet, on known GPUs), with peak GPU memory; SplitMask vs
BEiT (time ratio next to FLOP ratio); our ViT vs a stack of nn.TransformerEncoderLayer; fused vs naive
InfoNCE (time, peak memory); tokenization's share of the step and the monitor's of an epoch; probe.py's
linear probes and k-NN on synthetic features of ImageNet size; our loader against the plain torchvision
pipeline per worker, and the workers the step needs; the device path (pretrain.py --loader=device): its bytes-only
worker, the device's decode + augment, from the device cache, and against the step on a GPU. The calls a ratio
compares take turns, round after round, and each time is the fastest of its rounds (a busy machine only ever adds
time). Writes out/bench.json too.
"""
import ctypes
import json
import multiprocessing
import os
import platform
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import common
import data
import device_data
import tokenizers
from features import knn_accuracy, monitor_images
from masking import beit_mask, split_patches
from model import BEiT, SplitMask, ViT, info_nce, info_nce_reference, param_groups
from pretrain import train_step

config = dict(
    device="auto",  # auto: a CUDA GPU if there is one, else the CPU (Apple's mps is not used) | cpu | cuda
    dtype="auto",  # auto: bfloat16 on GPUs that have it, float16 on older ones, float32 on a CPU; or one of those
    model="small",  # ViT size: tiny | small | base | large
    img_size=224,  # image size, in pixels
    patch_size=16,  # patch side, in pixels
    batch_size=0,  # images per step; 0: 16 on a CPU, 256 on a GPU
    vocab_size=8192,  # visual words
    warmup=2,  # untimed calls of each function first
    steps=5,  # timed rounds; each function reports its fastest
    compile=False,  # torch.compile the models
    nce_sizes="256,1024,4096,8192,16384",  # global batch sizes for the InfoNCE rows ("" skips them)
    loader=True,  # the loading rows: our loaders (workers, device) against plain torchvision; the workers a step needs
    probe_features="100000,12,768",  # images,blocks,width of synthetic features for probe.py's rows ("" skips them)
    data="",  # a folder of images for the loading rows; "": 64 JPEGs at 640x480 written to out/bench_jpegs
    gpu_img_s=3000.0,  # the step rate the loader must feed without a GPU (ViT-B SplitMask, one H200, 45% MFU)
    out="out/bench.json",  # the rows as JSON
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fns, device, warmup, rounds):
    """{name: fn} -> {name: seconds of its fastest call}. The calls take turns, round after round, so a
    slow moment of a shared machine hits every side of a ratio alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def random_masks(method, grid, batch, seed=0):
    """A batch of the masks the loader would draw: SplitMask [B, 2, n/2] or BEiT [B, 0.4n]."""
    rng = np.random.default_rng(seed)
    if method == "splitmask":
        return torch.from_numpy(np.stack([split_patches(grid, 0.5, rng, "block", 16) for _ in range(batch)]))
    return torch.from_numpy(np.stack([np.flatnonzero(beit_mask(grid, 0.4, rng, "block", 16)) for _ in range(batch)]))


def training_step(cfg, device, autocast, method, images, vocab):
    """pretrain.train_step of one method on a fixed batch, as a function; and its FLOPs per image."""
    torch.manual_seed(0)
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], drop_path=0.1)
    model = SplitMask(encoder, cfg["vocab_size"]) if method == "splitmask" else BEiT(encoder, cfg["vocab_size"])
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    masks = random_masks(method, encoder.grid, cfg["batch_size"]).to(device)
    net = torch.compile(model) if cfg["compile"] else model
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    step = lambda: train_step(net, optimizer, scaler, autocast, [(images, masks)], vocab, cfg["patch_size"], 3.0)
    return step, model.flops_per_image(0.5 if method == "splitmask" else 0.4)


def vit_fwd_bwd(cfg, device, autocast):
    """Forward + backward of our ViT and of nn.TransformerEncoderLayer blocks with the same shapes."""
    ours = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"], drop_path=0.0, layer_scale=0.0).to(device)
    layer = nn.TransformerEncoderLayer(ours.dim, ours.heads, 4 * ours.dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True, layer_norm_eps=1e-6)
    blocks = nn.TransformerEncoder(layer, ours.depth, norm=nn.LayerNorm(ours.dim, eps=1e-6), enable_nested_tensor=False)
    embed = nn.Conv2d(3, ours.dim, ours.patch_size, ours.patch_size)
    theirs = nn.ModuleDict(dict(embed=embed, blocks=blocks)).to(device)
    pos = nn.Parameter(torch.zeros(1, ours.num_patches, ours.dim, device=device))
    images = torch.randn(cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"], device=device)

    def run(forward):
        def fwd_bwd():
            with autocast:
                out = forward(images)
            out.float().mean().backward()
        return fwd_bwd

    return run(ours), run(lambda x: theirs["blocks"](theirs["embed"](x).flatten(2).transpose(1, 2) + pos))


def nce_call(n, dim, device, fused):
    """One forward + backward of the fused or the naive InfoNCE on random [n, dim] descriptors."""
    torch.manual_seed(0)
    xa = torch.randn(n, dim, device=device, requires_grad=True)
    xb = torch.randn(n, dim, device=device, requires_grad=True)
    loss = info_nce if fused else info_nce_reference
    return lambda: loss(xa, xb, 0.2).backward()


def _cpu_peak(n, dim, fused, answer):
    """In a fresh process: how far one call raises the peak resident set (/proc's VmHWM)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # blocks of 64 KiB and up: fresh pages, given back when freed
    fn = nce_call(n, dim, torch.device("cpu"), fused)
    fn()  # a first call sets up what stays (thread pools, caches): that is not the peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    status = lambda key: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    before = status("VmRSS:")
    fn()
    answer.put(status("VmHWM:") - before)


def peak_memory(n, dim, device, fused):
    """Peak bytes one InfoNCE forward + backward adds. CUDA: the allocator's counter. CPU: measured in
    a fresh process, where no memory freed earlier (resident, so uncounted) can be reused."""
    if device.type == "cuda":
        fn = nce_call(n, dim, device, fused)
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    child = context.Process(target=_cpu_peak, args=(n, dim, fused, answer))
    child.start()
    child.join()
    return answer.get() if child.exitcode == 0 else -1  # -1: no /proc (not Linux)


def nce_rows(sizes, dim, device):
    """(N, fused seconds, naive seconds, fused bytes, naive bytes) for symmetric InfoNCE fwd + bwd."""
    rows = []
    for n in sizes:
        fused, naive = nce_call(n, dim, device, True), nce_call(n, dim, device, False)
        t = seconds_per_call(dict(fused=fused, naive=naive), device, 1, max(3, min(9, 4096 // n)))
        rows.append((n, t["fused"], t["naive"], peak_memory(n, dim, device, True), peak_memory(n, dim, device, False)))
    return rows


def probe_rows(spec, device, classes=100):
    """probe.py's stage on synthetic float16 features (class centres plus noise): memory, one epoch of the linear
    probes on every block, k-NN of 1,000 queries on one block. Returns (bytes, seconds, seconds)."""
    from probe import train_linear_probes
    N, L, D = map(int, spec.split(","))
    g, labels = torch.Generator().manual_seed(0), torch.arange(N) % classes
    centres, features = torch.randn(classes, L, D, generator=g), torch.empty(N, L, D, dtype=torch.float16)
    for rows in torch.arange(N).split(10_000):  # made in pieces: float32 noise for all of it would double the peak
        features[rows] = (centres[labels[rows]] + 4 * torch.randn(len(rows), L, D, generator=g)).half()
    features, labels = features.to(device), labels.to(device)
    sync(device)
    start = time.perf_counter()
    train_linear_probes(features, labels, classes, epochs=1, lr=1e-3, batch_size=256, seed=0)
    sync(device)
    middle = time.perf_counter()
    knn_accuracy(features[:, -1], labels, features[:1000, -1], labels[:1000], classes)
    sync(device)
    return features.numel() * 2, middle - start, time.perf_counter() - middle


def write_jpegs(folder, count=64):
    """Without a dataset: count 640x480 JPEGs (COCO's size) of the built-in scenes, drawn at 480 px."""
    os.makedirs(folder, exist_ok=True)
    scenes = data.SyntheticShapes(count, 480, seed=1)
    for i in range(count):
        Image.fromarray(scenes[i][0].permute(1, 2, 0).numpy()).resize((640, 480)).save(f"{folder}/{i}.jpg", quality=90)
    return folder


def loading_rows(cfg, folder, device, rounds=3):
    """Images/s on the same files, taking turns round by round. Of one loader worker (one thread): our pipeline
    (torchvision decode, uint8 crop and flip, masks; normalised later on the device), the plain torchvision one (PIL
    decode, RandomResizedCrop, flip, ToTensor, Normalize) and the device path's (bytes, draws, masks). Then of the
    device path's decode + augment on the device (a CPU: its threads): crop and flip, strong, from the device cache."""
    from torchvision import transforms as T
    files = data.build_dataset("folder", folder, "train").samples[:64]
    size, threads, grid = cfg["img_size"], torch.get_num_threads(), cfg["img_size"] // cfg["patch_size"]
    ours = data.MaskedImages(data.ImageFiles(files, []), data.pretrain_transform(size), grid, "splitmask", 0.5,
                             "block", 16)
    plain = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize(data.MEAN, data.STD)])
    encoded = {name: device_data.EncodedImages(data.ImageFiles(files, []), data.pretrain_transform(
        size, strong=name == "strong"), grid, "splitmask", 0.5, "block", 16) for name in ("plain", "strong", "cached")}
    calls = dict(ours=lambda: [ours.transform(data.read_image(path)) for path, _ in files],
                 ours_with_masks=lambda: [ours[i] for i in range(len(files))],
                 torchvision=lambda: [plain(Image.open(path).convert("RGB")) for path, _ in files],
                 device_worker=lambda: [encoded["plain"][i] for i in range(len(files))])
    torch.set_num_threads(1)  # as in a loader worker
    t = seconds_per_call(calls, torch.device("cpu"), 1, rounds)
    torch.set_num_threads(threads)
    cache = device_data.fill_cache(encoded["cached"], "all", device, device_data.cache_side(size, 0.08), workers=0)
    batches = {name: device_data.collate([dataset[i] for i in range(len(files))]) for name, dataset in encoded.items()}
    makers = {name: device_data.DeviceBatches(dataset, device, cache if name == "cached" else None)
              for name, dataset in encoded.items()}  # made once: a GPU stream each, not inside the timed calls
    t |= seconds_per_call({name: lambda name=name: makers[name].make(batches[name]) for name in encoded}, device, 1,
                          rounds)
    return {name: len(files) / seconds for name, seconds in t.items()}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def main():
    cfg, _ = common.configure(config, __doc__, __file__)
    device, autocast, _ = common.setup(cfg)  # as pretrain.py
    cfg["batch_size"] = cfg["batch_size"] or (256 if device.type == "cuda" else 16)
    dtype = cfg["dtype"]
    rows = []

    def row(name, value, note=""):
        rows.append((name, value, note))
        print(f"{name:<44} {value:>14}  {note}", flush=True)

    B = cfg["batch_size"]
    print(f"splitmask bench on {machine(device)}; torch {torch.__version__}; ViT-{cfg['model']}/{cfg['patch_size']} "
          f"at {cfg['img_size']}px, batch {B}, {dtype}{', compiled' if cfg['compile'] else ''}\n")
    # The matmul (MFU denominator), the two training steps and tokenization take turns, round by round.
    size = 4096 if device.type == "cuda" else 512 if dtype == "float16" else 2048  # CPUs emulate fp16 slowly
    a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    images = torch.randn(B, 3, cfg["img_size"], cfg["img_size"], device=device)
    vocab = tokenizers.random_projection_vocab(cfg["vocab_size"], 3 * (cfg["patch_size"] // 2) ** 2, seed=0).to(device)
    (splitmask, f_split), (beit, f_beit) = (training_step(cfg, device, autocast, method, images, vocab)
                                            for method in ("splitmask", "beit"))
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"]).to(device).eval()

    @torch.no_grad()
    def monitor_batch():  # features.Monitor's pass on a batch: every block's mean-pooled tokens
        with autocast:
            return torch.stack([h.mean(1) for h in encoder(images, all_layers=True)], 1)

    t = seconds_per_call(dict(matmul=lambda: a @ a, splitmask=splitmask, beit=beit, monitor=monitor_batch,
                              tokenize=lambda: tokenizers.tokenize(images, vocab, cfg["patch_size"])),
                         device, cfg["warmup"], cfg["steps"])
    matmul, t_split, t_beit = 2 * size**3 / t["matmul"], t["splitmask"], t["beit"]
    row(f"dense matmul ({dtype})", f"{matmul / 1e12:.2f} TFLOP/s", "the MFU denominator, measured in the same rounds")
    row("SplitMask step", f"{B / t_split:.1f} img/s",
        f"{t_split * 1e3:.0f} ms/step; MFU {B * f_split / t_split / matmul:.1%} of the matmul")
    if device.type == "cuda":
        peak, source = common.peak_flops(device, dtype)  # pretrain.py's MFU: a spec sheet where the GPU is known
        row("SplitMask MFU as pretrain.py reports it", f"{B * f_split / t_split / peak:.1%}",
            f"of {peak / 1e12:.0f} TFLOP/s: {source}")
        row("300 ImageNet epochs (1.28M img)", f"{300 * 1.281e6 / (B / t_split) / 3600:.1f} h", "on this one device")
    if device.type == "cuda":
        row("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", "the largest step above")
    row("BEiT step", f"{B / t_beit:.1f} img/s", f"MFU {B * f_beit / t_beit / matmul:.1%}")
    row("SplitMask / BEiT step time", f"{t_split / t_beit:.2f}x",
        f"FLOP ratio {f_split / f_beit:.2f}x (at most: MFU no lower)")
    row("tokenization share of the step", f"{t['tokenize'] / t_split:.2%}",
        f"{t['tokenize'] * 1e3:.1f} ms, {cfg['vocab_size']} words (below 2%)")
    # the monitor's share of an epoch, at its default size (features.monitor_images of each split; labelled sets encode
    # both splits); an epoch trains on its full batches (small sets at batch 2048 drop one)
    for name, images, batch, splits in [("quick (10,000 images)", 10_000, 128, 2),
                                        ("paper ImageNet (1.28M)", 1_281_167, 2048, 2),
                                        ("paper Cars (8,144)", 8144, 2048, 2),
                                        ("paper ADE20k (no labels)", 20_210, 2048, 1)]:
        epoch_images, monitored = images // batch * batch, splits * monitor_images(images)
        share = monitored * t["monitor"] / (epoch_images * t_split)
        row(f"monitor / epoch, {name}", f"{share:.1%}", f"{monitored} images encoded each epoch (at most 5%)")
    ours, reference = vit_fwd_bwd(cfg, device, autocast)
    t = seconds_per_call(dict(ours=ours, reference=reference), device, cfg["warmup"], cfg["steps"])
    row("our ViT / nn.TransformerEncoderLayer", f"{t['ours'] / t['reference']:.2f}x",
        f"fwd+bwd {t['ours'] * 1e3:.0f} vs {t['reference'] * 1e3:.0f} ms (at most 1)")
    nce = nce_rows([int(n) for n in cfg["nce_sizes"].split(",") if n], ViT(cfg["model"]).dim, device)
    for n, t_fused, t_naive, m_fused, m_naive in nce:
        memory = f"{m_fused / 2**20:.0f} vs {m_naive / 2**20:.0f} MiB" if min(m_fused, m_naive) >= 0 else "memory n/a"
        row(f"InfoNCE N={n}: fused / naive", f"{t_fused / t_naive:.2f}x time",
            f"{m_fused / max(1, m_naive):.3f}x memory ({memory})")
    if cfg["probe_features"]:
        N, L, D = map(int, cfg["probe_features"].split(","))
        memory, epoch, knn = probe_rows(cfg["probe_features"], device)
        row(f"probe: {N:,} x {L} x {D} features", f"{memory / 1e9:.2f} GB", f"float16 on the {device.type} (the old "
            f"probe: float32 on the host, {2 * memory / 1e9:.2f} GB)")
        row("probe: linear probes, one epoch", f"{epoch:.1f} s", f"all {L} blocks, 100 classes; 100 epochs (the "
            f"default): {100 * epoch / 60:.1f} min")
        row("probe: k-NN of 1,000 queries, one block", f"{knn:.2f} s", f"{N // 10:,} queries on {L} blocks (a val set "
            f"a tenth of the training set): {knn * N / 1000 * L / 10 / 60:.1f} min")
    if cfg["loader"]:
        folder = cfg["data"] or write_jpegs(os.path.join(os.path.dirname(cfg["out"]) or ".", "bench_jpegs"))
        rate = loading_rows(cfg, folder, device)
        files = f"{'' if cfg['data'] else '640x480 '}JPEGs of {folder}"
        row("loading: plain torchvision, one worker", f"{rate['torchvision']:.0f} img/s",
            f"{files} -> {cfg['img_size']} px")
        row("loading: ours, one worker", f"{rate['ours']:.0f} img/s",
            f"{rate['ours'] / rate['torchvision']:.2f}x torchvision's; {rate['ours_with_masks']:.0f} img/s with masks")
        step_rate = B / t_split if device.type == "cuda" else cfg["gpu_img_s"]
        row("loader workers to feed the step", f"{step_rate / rate['ours_with_masks']:.1f}",
            f"at {step_rate:.0f} img/s ({'this step' if device.type == 'cuda' else 'a stated GPU rate: --gpu_img_s'})")
        row("device path: one worker (bytes, draws, masks)", f"{rate['device_worker']:.0f} img/s",
            f"{rate['device_worker'] / rate['ours_with_masks']:.1f}x a decoding worker's (with masks)")
        row("device path: workers to feed the step", f"{step_rate / rate['device_worker']:.1f}",
            f"at {step_rate:.0f} img/s")
        row(f"device path: decode + augment on the {device.type}", f"{rate['plain']:.0f} img/s",
            f"strong augmentation {rate['strong']:.0f} img/s; from the device cache {rate['cached']:.0f} img/s"
            + ("" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"))
        if device.type == "cuda":  # the GPU decodes and trains: its share of the step's time
            row("device path / the step", f"{rate['plain'] / step_rate:.2f}x", f"{rate['cached'] / step_rate:.1f}x "
                f"from the cache; {rate['strong'] / step_rate:.2f}x with strong augmentation (target: 1.5x for ViT-S)")
    os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
    with open(cfg["out"], "w") as f:
        json.dump(dict(config=cfg, machine=machine(device), torch=torch.__version__, rows=rows,
                       nce=[dict(zip(("n", "fused_s", "naive_s", "fused_bytes", "naive_bytes"), r)) for r in nce]),
                  f, indent=1)


if __name__ == "__main__":
    main()
