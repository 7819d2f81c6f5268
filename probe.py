"""
Evaluate a frozen encoder: a linear probe on every block at once, and k-NN, on cached features.

    python probe.py --init=out/pretrain/ckpt.pt       # a pre-training or fine-tuning checkpoint
    python probe.py                                   # random init: the baseline every result needs
    torchrun --nproc_per_node=8 probe.py --dataset=imagenet --data_root=data/imagenet --init=...  # features on 8 GPUs

One forward pass over the data (no augmentation) collects the mean-pooled tokens of every block in float16,
on the GPU when they fit (ViT-B on ImageNet: 25 GB), else in host memory (--blocks=12 probes one block: 1/12);
they are cached in out_dir, then a BatchNorm (no affine) + linear classifier is trained per block (as in
MAE) and a cosine k-NN (k=20, temperature-weighted votes) is run per block, on the device. The paper's
Figure 5: SplitMask's late blocks stay good for probing where BEiT's drop.
"""
import json
import math
import os
import shlex

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
from features import extract_features, knn_accuracy, my_share
from model import VIT_SIZES, ViT, encoder_weights, load_encoder

# -----------------------------------------------------------------------------
# The default run: the built-in scenes. Every line is a flag (--key=value); --help prints the comments.
config = dict(
    init="",  # checkpoint to evaluate (its model, image and patch size come with it); "": random init
    dataset="synthetic",  # synthetic (built in) | imagefolder (your class folders) | imagenette | ... (README)
    data_root="",  # the dataset's folder; the README's datasets table says where to get each
    recipe="quick",  # real datasets: quick (about 10,000 images) | paper (all of them)
    fraction=1.0,  # class-balanced share of the training and validation images (ImageNet 1%: 0.01), or a number
    num_images=2000,  # built-in scenes to draw
    model="tiny",  # ViT size without --init: tiny | small | base | large
    img_size=32,  # crops, in pixels (with --init: the checkpoint's, unless given)
    patch_size=4,  # patch side, in pixels (with --init: the checkpoint's)
    crop_ratio=0.875,  # resize to img_size / crop_ratio, then take the centre crop
    blocks="all",  # blocks to probe: all, or some such as 6,12 (their features take less memory)
    batch_size=256,  # for feature extraction and probe training
    probe_epochs=100,  # epochs of linear-probe training (on cached features: fast)
    probe_lr=1e-3,  # AdamW learning rate of the probes
    knn_k=20,  # neighbours that vote
    knn_temperature=0.07,  # votes weighted by exp(cosine / t)
    out_dir="",  # results and feature cache; "": <checkpoint>_probe/ beside it, or out/random_init_probe/
    device="auto",  # auto: a CUDA GPU if there is one, else the CPU (Apple's mps is not used) | cpu | cuda
    dtype="auto",  # auto: bfloat16 on GPUs that have it, float16 on older ones, float32 on a CPU; or one of those
    workers=data.cpu_workers(),  # loader processes
    seed=0,  # seeds the subset, random init and probe training
)
# Real datasets: the images and, for random init, the sizes of pretrain.py's recipe (a checkpoint brings its own).
QUICK, PAPER = dict(model="tiny", img_size=112, patch_size=16), dict(model="small", img_size=224, patch_size=16)
CIFAR = dict(img_size=32, patch_size=4)
PRESETS = {**{f"{name}/quick": dict(QUICK, fraction=data.QUICK_FRACTION[name], **(CIFAR if "cifar" in name else {}))
              for name in data.DATASETS[1:]},
           **{f"{name}/paper": dict(PAPER, **(CIFAR if "cifar" in name else {})) for name in data.DATASETS[1:]}}


def train_linear_probes(train_x, train_y, num_classes, epochs, lr, batch_size, seed):
    """One BatchNorm (no affine) + linear classifier per layer, trained together on train_x's device. Returns
    the function that predicts the class at every layer: [N, L, D] features -> [N, L] classes."""
    N, L, D = train_x.shape
    g, device = torch.Generator().manual_seed(seed), train_x.device
    norm = torch.nn.BatchNorm1d(L * D, affine=False, device=device)  # per layer and channel, like MAE's probe
    weight = torch.nn.Parameter(torch.zeros(L, D, num_classes, device=device))
    bias = torch.nn.Parameter(torch.zeros(L, num_classes, device=device))
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * ((N + batch_size - 1) // batch_size))

    def logits(x):  # [B, L, D] features (float16 or 32) -> [B, L, C], in float32
        return torch.einsum("bld,ldc->blc", norm(x.float().flatten(1)).view(-1, L, D), weight) + bias

    for _ in tqdm(range(epochs), desc="linear probes", leave=False, disable=None):
        norm.train()
        for idx in torch.randperm(N, generator=g).to(device).split(batch_size):
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(logits(train_x[idx]).flatten(0, 1), train_y[idx].repeat_interleave(L))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    norm.eval()
    return torch.no_grad()(lambda x: torch.cat([logits(chunk).argmax(-1) for chunk in x.split(4096)]))


def probe_blocks(train, val, num_classes, cfg, device, at_once):
    """Linear-probe and k-NN accuracy (%) of every block: at_once blocks' features on the device at a time."""
    (train_x, train_y), (val_x, val_y) = train, val
    train_y, val_y, linear, knn = train_y.to(device), val_y.to(device), [], []
    for first in range(0, train_x.shape[1], at_once):  # slices: no copy where the features already are
        train_group, val_group = (x[:, first : first + at_once].to(device) for x in (train_x, val_x))
        probe = train_linear_probes(train_group, train_y, num_classes, cfg["probe_epochs"], cfg["probe_lr"],
                                    cfg["batch_size"], cfg["seed"])
        linear += ((probe(val_group) == val_y[:, None]).float().mean(0) * 100).tolist()
        knn += [knn_accuracy(train_group[:, i], train_y, val_group[:, i], val_y, num_classes, cfg["knn_k"],
                             cfg["knn_temperature"]) for i in range(train_group.shape[1])]
    return linear, knn


def host_memory():
    """Bytes the host can still give: Linux's MemAvailable, less in a container with a memory limit (cgroup v2);
    unknown elsewhere (no limit)."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return math.inf
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            return min(available, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):  # no limit ("max"), or no cgroup v2
        return available


def main():
    cfg, given = common.configure(config, __doc__, __file__, PRESETS, lambda c: [f"{c['dataset']}/{c['recipe']}"],
                                  dict(dataset=data.DATASETS, model=VIT_SIZES))
    pretrained = encoder_weights(cfg, given, cfg["init"]) if cfg["init"] else None
    depth = VIT_SIZES[cfg["model"]][1]
    numbers = cfg["blocks"].split(",")
    common.check(cfg, [(cfg["blocks"] == "all" or all(b.isdigit() and 1 <= int(b) <= depth for b in numbers),
                        f"--blocks={cfg['blocks']}: all, or numbers from 1 to {depth} such as {depth // 2},{depth}")])
    blocks = list(range(depth)) if cfg["blocks"] == "all" else [int(b) - 1 for b in numbers]
    device, autocast, _ = common.setup(cfg)
    out_dir = common.make_out_dir(cfg, "_probe")
    torch.manual_seed(cfg["seed"])
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"])  # random init unless --init
    if pretrained is not None:
        load_encoder(encoder, pretrained)
    encoder.to(device).eval()
    images = {split: data.from_flags(cfg, split) for split in ("train", "val")}
    if len(images["train"].classes) < 2:
        common.fail(f"--dataset={cfg['dataset']} has no class labels; probing needs a labelled dataset")

    # where the features go, said before the pass that makes them: float16 on the GPU if they fit in half its free
    # memory (the probes then train there), else in host memory, whence the probes take a few blocks at a time
    num_images = sum(map(len, images.values()))
    need = num_images * len(blocks) * encoder.dim * 2  # bytes; the cache is a copy in host memory
    free = torch.cuda.mem_get_info(device)[0] / 2 if device.type == "cuda" else math.inf
    store = device if need <= free else torch.device("cpu")
    at_once = len(blocks) if store == device else int(free // (need / len(blocks)))  # on the device at a time
    common.print0(f"features: {num_images:,} images x {common.plural(len(blocks), 'block')} x {encoder.dim} in float16 "
                  f"= {need / 1e9:.3g} GB, in {'GPU' if store.type == 'cuda' else 'host'} memory; the probes train "
                  f"{common.plural(at_once, 'block')} at a time on the {device.type.upper()}")
    fewer = f"probe fewer blocks, e.g. --blocks={depth} (the last) or --blocks={depth // 2},{depth}"
    if common.MASTER and need > host_memory():  # rank 0 holds them all; the others only send theirs
        common.fail(f"the features do not fit in the {host_memory() / 1e9:.3g} GB the host has free: {fewer}")
    if common.MASTER and at_once == 0:
        common.fail(f"one block's features are more than half the GPU's free memory ({free * 2 / 1e9:.3g} GB): {fewer}"
                    ", fewer images (--fraction), or --device=cpu")

    # features, cached: the probes below cost little more than this one pass
    cache = os.path.join(out_dir, "features.pt")
    key = {k: cfg.get(k) for k in ("init", "init_modified", "dataset", "data_root", "fraction", "num_images", "model",
                                   "img_size", "patch_size", "crop_ratio", "blocks", "seed", "dtype")}
    key["pixels"] = "uint8, normalised on the device"  # as the monitor's (caches made before are made anew)
    feats = torch.load(cache, weights_only=True, mmap=True) if common.MASTER and os.path.exists(cache) else {}
    cached = [feats.get("key") == key]
    if common.WORLD > 1:
        dist.broadcast_object_list(cached, src=0)  # rank 0's cache decides for all (an out_dir may not be shared)
    if not cached[0]:
        feats, transform = {"key": key}, data.eval_transform(cfg["img_size"], cfg["crop_ratio"], normalized=False)
        for split, dataset in images.items():  # uint8 crops, normalised on the device (a quarter of the traffic)
            batches = my_share(data.Augmented(dataset, transform), cfg["batch_size"], cfg["workers"], device)
            with autocast:
                feats[split], feats[f"{split}_labels"] = extract_features(encoder, batches, len(dataset), blocks,
                                                                          device, store)
        if common.MASTER:
            common.save(cache, {k: v.cpu() if torch.is_tensor(v) else v for k, v in feats.items()})  # atomic
    if not common.MASTER:
        return  # the probes run on rank 0 alone: no process waits on them
    train, val = [(feats[split].to(store), feats[f"{split}_labels"]) for split in ("train", "val")]

    # probes per block
    linear, knn = probe_blocks(train, val, len(images["train"].classes), cfg, device, at_once)
    print(f"{cfg['init'] or 'random init'} on {cfg['dataset']} ({len(train[1])} train / {len(val[1])} val images)")
    print("block  linear   k-NN")
    for block, lin, nn_ in zip(blocks, linear, knn):
        print(f"{block + 1:5d}  {lin:6.2f}  {nn_:6.2f}")
    best = max(range(len(linear)), key=linear.__getitem__)
    print(f"best linear probe: block {blocks[best] + 1}, {linear[best]:.2f}%; k-NN at block {blocks[-1] + 1}: "
          f"{knn[-1]:.2f}%")
    results = dict(config=cfg, blocks=[b + 1 for b in blocks], linear=linear, knn=knn, best_linear=linear[best],
                   best_layer=blocks[best] + 1, knn_last=knn[-1])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"done: {out_dir}/results.json (accuracy by block); as a table and a plot: python report.py "
          f"--folder={shlex.quote(out_dir)}")
    if cfg["init"]:  # the next step on the same data
        print(f"next: python finetune.py --init={shlex.quote(cfg['init'])}{data.same_data(cfg, given)}")


if __name__ == "__main__":
    main()
