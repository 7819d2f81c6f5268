"""
Evaluate a frozen encoder: a linear probe on every block at once, and k-NN, on cached features.

    python probe.py --init=out/pretrain/ckpt.pt       # a pre-training or fine-tuning checkpoint
    python probe.py                                   # random init: the baseline every result needs

One forward pass over the data (no augmentation) collects the mean-pooled tokens of every block;
they are cached in out_dir, then a BatchNorm (no affine) + linear classifier is trained per block
(as in MAE) and a cosine k-NN (k=20, temperature-weighted votes) is run per block. The paper's
Figure 5: SplitMask's late blocks stay good for probing where BEiT's drop.
"""
import json
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
from model import VIT_SIZES, ViT, load_encoder

# -----------------------------------------------------------------------------
# The default run: the built-in scenes. Every line is a flag (--key=value); --help prints the comments.
config = dict(
    init="",  # checkpoint to evaluate (its model, image and patch size come with it); "": random init
    dataset="synthetic",  # synthetic (built in) | imagenette | cifar10 | imagenet | ... (README); needs labels
    data_root="",  # the dataset's folder; the README's datasets table says where to get each
    recipe="quick",  # real datasets: quick (about 10,000 images) | paper (all of them)
    fraction=1.0,  # class-balanced share of the images to use (ImageNet 1%: 0.01)
    num_images=2000,  # built-in scenes to draw
    model="tiny",  # ViT size without --init: tiny | small | base | large
    img_size=32,  # crops, in pixels (with --init: the checkpoint's, unless given)
    patch_size=4,  # patch side, in pixels (with --init: the checkpoint's)
    crop_ratio=0.875,  # resize to img_size / crop_ratio, then take the centre crop
    batch_size=256,  # for feature extraction and probe training
    probe_epochs=100,  # epochs of linear-probe training (on cached features: fast)
    probe_lr=1e-3,  # AdamW learning rate of the probes
    knn_k=20,  # neighbours that vote
    knn_temperature=0.07,  # votes weighted by exp(cosine / t)
    out_dir="",  # results and feature cache; "": <checkpoint>_probe/ beside it, or out/random_init_probe/
    device="auto",  # auto (a GPU if there is one) | cpu | cuda
    dtype="auto",  # auto (bfloat16 on GPUs that support it, float32 elsewhere) | bfloat16 | float16 | float32
    workers=common.cpu_workers(),  # loader processes
    seed=0,  # seeds the subset, random init and probe training
)
# Real datasets: the images and, for random init, the sizes of pretrain.py's recipe (a checkpoint brings its own).
QUICK, PAPER = dict(model="tiny", img_size=112, patch_size=16), dict(model="small", img_size=224, patch_size=16)
CIFAR = dict(img_size=32, patch_size=4)
PRESETS = {**{f"{name}/quick": dict(QUICK, fraction=data.QUICK_FRACTION[name], **(CIFAR if "cifar" in name else {}))
              for name in data.DATASETS[1:]},
           **{f"{name}/paper": dict(PAPER, **(CIFAR if "cifar" in name else {})) for name in data.DATASETS[1:]}}


@torch.no_grad()
def extract_features(encoder, dataset, batch_size, workers, device):
    """[N, L, D] mean-pooled tokens of every block (after the final norm) and [N] labels."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
    features, labels = [], []
    for images, y in tqdm(loader, desc="features", leave=False):
        layers = encoder(images.to(device), all_layers=True)
        features.append(torch.stack([h.mean(1) for h in layers], 1).float().cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def train_linear_probes(train_x, train_y, num_classes, epochs, lr, batch_size, seed):
    """One BatchNorm (no affine) + linear classifier per layer, trained together: [L, D, C] weights."""
    N, L, D = train_x.shape
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.BatchNorm1d(L * D, affine=False)  # per layer and channel, like MAE's probe
    weight = torch.nn.Parameter(torch.zeros(L, D, num_classes))
    bias = torch.nn.Parameter(torch.zeros(L, num_classes))
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * ((N + batch_size - 1) // batch_size))

    def logits(x):  # [B, L, D] -> [B, L, C]
        return torch.einsum("bld,ldc->blc", norm(x.flatten(1)).view(-1, L, D), weight) + bias

    for _ in tqdm(range(epochs), desc="linear probes", leave=False):
        norm.train()
        for idx in torch.randperm(N, generator=g).split(batch_size):
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(logits(train_x[idx]).flatten(0, 1), train_y[idx].repeat_interleave(L))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    norm.eval()
    return lambda x: logits(x).detach()


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07):
    """Cosine k-NN with votes weighted by exp(similarity / t) (Wu et al. 2018, as in DINO). Returns %."""
    train_x, test_x = F.normalize(train_x, dim=-1), F.normalize(test_x, dim=-1)
    correct = 0
    for start in range(0, len(test_x), 1024):
        sim, idx = (test_x[start : start + 1024] @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start : start + 1024]).sum().item()
    return 100.0 * correct / len(test_x)


def main():
    cfg, given = common.configure(config, __doc__, __file__, PRESETS, lambda c: [f"{c['dataset']}/{c['recipe']}"],
                                  dict(dataset=data.DATASETS, model=VIT_SIZES))
    pretrained = common.encoder_weights(cfg, given, cfg["init"]) if cfg["init"] else None
    common.check(cfg)
    device, autocast, _ = common.setup(cfg)
    out_dir = common.make_out_dir(cfg, "_probe")
    torch.manual_seed(cfg["seed"])
    encoder = ViT(cfg["model"], cfg["img_size"], cfg["patch_size"])  # random init unless --init
    if pretrained is not None:
        load_encoder(encoder, pretrained)
    encoder.to(device).eval()

    # features, cached: the probes below cost little more than this one pass
    cache = os.path.join(out_dir, "features.pt")
    key = {k: cfg.get(k) for k in ("init", "init_modified", "dataset", "data_root", "fraction", "num_images", "model",
                                   "img_size", "patch_size", "crop_ratio", "seed", "dtype")}
    feats = torch.load(cache, weights_only=True) if os.path.exists(cache) else {}
    if feats.get("key") != key:
        feats = {"key": key}
        transform = data.eval_transform(cfg["img_size"], cfg["crop_ratio"])
        for split in ("train", "val"):
            images = common.dataset(cfg, split)
            with autocast:
                feats[split] = extract_features(encoder, data.Augmented(images, transform), cfg["batch_size"],
                                                cfg["workers"], device)
            feats["classes"] = len(images.classes)
        common.save(cache, feats)  # atomic: a probe killed while saving recomputes rather than crashes
    (train_x, train_y), (val_x, val_y), C = feats["train"], feats["val"], feats["classes"]
    if C < 2:
        common.fail(f"--dataset={cfg['dataset']} has no class labels; probing needs a labelled dataset")

    # probes per block
    probe = train_linear_probes(train_x, train_y, C, cfg["probe_epochs"], cfg["probe_lr"], cfg["batch_size"],
                                cfg["seed"])
    linear = ((probe(val_x).argmax(-1) == val_y[:, None]).float().mean(0) * 100).tolist()
    knn = [knn_accuracy(train_x[:, i], train_y, val_x[:, i], val_y, C, cfg["knn_k"], cfg["knn_temperature"])
           for i in range(train_x.shape[1])]
    print(f"{cfg['init'] or 'random init'} on {cfg['dataset']} ({len(train_y)} train / {len(val_y)} val images)")
    print("block  linear   k-NN")
    for i, (lin, nn_) in enumerate(zip(linear, knn)):
        print(f"{i + 1:5d}  {lin:6.2f}  {nn_:6.2f}")
    best = max(range(len(linear)), key=linear.__getitem__)
    print(f"best linear probe: block {best + 1}, {linear[best]:.2f}%; k-NN at the last block: {knn[-1]:.2f}%")
    results = dict(config=cfg, linear=linear, knn=knn, best_linear=linear[best], best_layer=best + 1, knn_last=knn[-1])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"done: {out_dir}/results.json (accuracy by block; report.py tables and plots experiments)")


if __name__ == "__main__":
    main()
