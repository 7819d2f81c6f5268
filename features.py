"""Frozen features and what they tell: the mean-pooled tokens of every block (each process encodes its share, rank 0
gathers them), cosine k-NN accuracy where there are labels, and RankMe anywhere. probe.py evaluates a checkpoint with
them; pretrain.py's Monitor watches its encoder with them at the end of every epoch."""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import data


def to_rank0(batch):
    """[B, ...] on every process -> their [world * B, ...] on rank 0, process after process (None elsewhere)."""
    if common.WORLD == 1:
        return batch
    parts = [torch.empty_like(batch) for _ in range(common.WORLD)] if common.MASTER else None
    dist.gather(batch, parts, dst=0)
    return torch.cat(parts) if common.MASTER else None


def my_share(dataset, batch_size, workers, device):
    """A loader over this process's share: every world-th image from its rank (equal shares: the last wrap around).
    Its own generator: the caller's random stream is left as it was (a monitored run trains as an unmonitored one)."""
    world, rank, num_images = common.WORLD, common.RANK, len(dataset)
    mine = [(rank + world * j) % num_images for j in range(math.ceil(num_images / world))]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size, num_workers=workers,
                                       pin_memory=device.type == "cuda", generator=torch.Generator(),
                                       worker_init_fn=data.leave_stop_signals_to_main)


@torch.no_grad()
def extract_features(encoder, batches, num_images, blocks, device, store, desc="features"):
    """batches: this process's share of (images, labels), from my_share; uint8 images are normalised on the device.
    Returns [num_images, len(blocks), D] float16 mean-pooled tokens of the given blocks (0-based; after the final
    norm) in memory of `store`, and [num_images] labels, on rank 0 (None elsewhere)."""
    world, rank = common.WORLD, common.RANK
    features = labels = None
    if rank == 0:  # every image's features, on rank 0 alone
        features = torch.empty(num_images, len(blocks), encoder.dim, dtype=torch.float16, device=store)
        labels = torch.empty(num_images, dtype=torch.long)
    start = 0
    for images, y in tqdm(batches, desc=desc, leave=False, disable=None if rank == 0 else True):  # None: if a tty
        images = images.to(device, non_blocking=True)
        layers = encoder(data.normalize(images) if images.dtype == torch.uint8 else images, all_layers=True)
        batch = to_rank0(torch.stack([layers[b].float().mean(1) for b in blocks], 1).half())
        y = to_rank0(y.to(device))
        if rank == 0:  # process r encoded images r + world * j, for the j of this batch
            rows = ((torch.arange(start, start + len(images)) * world + torch.arange(world)[:, None]) % num_images)
            features[rows.flatten().to(store)], labels[rows.flatten()] = batch.to(store), y.cpu()
        start += len(images)
    return features, labels


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k=20, temperature=0.07):
    """Cosine k-NN with votes weighted by exp(similarity / t) (Wu et al. 2018, as in DINO), in float32 on
    train_x's device. Returns %."""
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    rows, correct = max(1, 2**28 // len(train_x)), 0  # queries at a time: at most 256M similarities (1 GiB)
    for start in range(0, len(test_x), rows):
        sim, idx = (test_x[start : start + rows] @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start : start + rows]).sum()
    return 100.0 * float(correct) / len(test_x)


def rankme(features, eps=1e-7):
    """RankMe (Garrido et al., ICML 2023): the effective rank of [N, D] features, exp of the entropy of their singular
    values normalised to sum 1. From 1 (every image on one line: collapse) up to min(N, D); no labels needed."""
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


def collapse_warning(history):
    """Whether the last RankMe of history calls for a warning: below half the best before it, where the one before
    was not (a collapse is told once, and again only after RankMe recovered)."""
    def below(i):  # history[i] under half the best before it
        return history[i] < max(history[:i], default=0.0) / 2
    return below(len(history) - 1) and not (len(history) > 1 and below(len(history) - 2))


def monitor_images(num_train):
    """The images of each split the monitor encodes by default: a twentieth of the training set, 200 to 5,000."""
    return min(5000, max(200, num_train // 20))


class Monitor:
    """How good the representation is while it trains, before the first epoch and then every --monitor_every, on a
    fixed seeded subset of each split, without augmentation: the k-NN accuracy of every block (training images as the
    bank, validation images as queries: what `probe.py --fraction=<images>` gives that checkpoint, same seed) where
    there are labels and a validation split, and RankMe of the last block everywhere. The crops are made once and kept
    on the device (uint8, each process its share); a pass draws no random numbers: training is the same without it."""
    def __init__(self, cfg, encoder, num_train, batch_size, device, history):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        self.history = history  # RankMe since training began (the list the checkpoint saves), for the collapse warning
        subset = dict(cfg, fraction=float(cfg["monitor_images"] or monitor_images(num_train)))  # as probe.py picks
        picked = {"train": data.from_flags(subset, "train")}
        self.classes = len(picked["train"].classes)
        if self.classes > 1:  # the k-NN's queries; without labels (or a validation split) RankMe alone
            try:
                picked["val"] = data.build_dataset(cfg["dataset"], cfg["data_root"], "val", cfg["img_size"],
                                                   subset["fraction"], cfg["seed"])
            except FileNotFoundError:
                pass
        transform, self.sets = data.eval_transform(cfg["img_size"], normalized=False), {}
        for split, images in picked.items():  # this process's share of the crops, on the device once and for all
            loader = my_share(data.Augmented(images, transform), batch_size, cfg["workers"], device)
            self.sets[split] = [(x.to(device), y) for x, y in loader], len(images)
        every = "every epoch" if cfg["monitor_every"] == 1 else f"every {cfg['monitor_every']} epochs"
        common.print0(f"monitor: {' and '.join(f'{n} {split}' for split, (_, n) in self.sets.items())} images at "
                      f"{cfg['img_size']} px, {'k-NN and ' if 'val' in picked else ''}RankMe before training and "
                      f"after {every} (--monitor_every=0: off)")

    def __call__(self, epoch, step, autocast):
        """The row to log on rank 0 (None elsewhere), printed; a warning when RankMe collapses."""
        self.encoder.eval()
        blocks, feats = range(self.encoder.depth), {}
        with autocast:
            for split, (batches, n) in self.sets.items():
                feats[split] = extract_features(self.encoder, batches, n, blocks, self.device, store=self.device,
                                                desc="monitor")
        if not common.MASTER:
            return None
        (train_x, train_y), row = feats["train"], dict(step=step, epoch=epoch)
        if "val" in feats:
            (val_x, val_y), train_y = feats["val"], train_y.to(self.device)
            row["knn_by_block"] = [knn_accuracy(train_x[:, b], train_y, val_x[:, b], val_y.to(self.device),
                                                self.classes) for b in blocks]
            row["knn"] = row["knn_by_block"][-1]
        row["rankme"] = rankme(train_x[:, -1])
        knn = f"k-NN {row['knn']:.1f}% (best block: {max(row['knn_by_block']):.1f}%) | " if "knn" in row else ""
        tqdm.write(f"epoch {epoch}/{self.cfg['epochs']} | {knn}RankMe {row['rankme']:.1f}")  # not across a bar
        if step > 0:  # random features spread over every direction: trained ones are compared with trained ones
            self.history.append(row["rankme"])
        if step > 0 and collapse_warning(self.history):
            tqdm.write(f"warning: RankMe fell to {row['rankme']:.1f}, below half its best, {max(self.history):.1f}: "
                       "the features are collapsing onto fewer directions")
        return row
