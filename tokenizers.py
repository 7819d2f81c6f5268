"""Visual-word tokenizers: the targets of masked image modeling, with no training on external data.

BEiT predicts the ids of DALL-E's tokenizer, trained on a large outside dataset; the paper (Table 2) finds
vocabularies needing no such training as good on iNat-19 (DALL-E 75.2; random projection 75.2, random patches
75.3, k-means 75.0) and 26% faster. A vocabulary is V unit vectors e_i; the token of a patch x is argmax_i <x, e_i>
(Eq. 1), x being 8x8x3 normalised pixels at half resolution (per 16x16 encoder patch): a token names a direction.
"""
import math

import numpy as np
import torch
from PIL import Image
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import data

VOCAB_KINDS = ("random_projection", "random_patches", "kmeans")
EPS = 1e-8  # a patch with a smaller norm is flat: it has no direction, so it never joins a vocab


def _nonzero_unit_rows(patches):
    patches = patches.float()
    return F.normalize(patches[patches.norm(dim=1) > EPS], dim=-1, eps=EPS)


def tokenizer_patches(images, patch_size):
    """Images [B, C, H, W] -> tokenizer patches [B, n, C*p*p] in float32, p = patch_size // 2: 2x2 average
    pooling, then p x p patches in the encoder's row-major grid order, flattened in (channel, row, col) order."""
    B, C, H, W = images.shape
    assert patch_size % 2 == 0, f"patch_size {patch_size} must be even: words are patches of the half-size image"
    assert H % patch_size == 0 and W % patch_size == 0, f"{H}x{W} images are not divisible by patch_size {patch_size}"
    half = F.avg_pool2d(images.float(), kernel_size=2)  # [B, C, H/2, W/2]
    p, h, w = patch_size // 2, H // patch_size, W // patch_size
    patches = half.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return patches.reshape(B, h * w, C * p * p)


def random_projection_vocab(vocab_size, dim, seed):
    """V random directions, components uniform in [-1, 1]: zero-centred like normalised pixels."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.rand(vocab_size, dim, generator=g) * 2 - 1, dim=-1, eps=EPS)


def random_patches_vocab(patches, vocab_size, seed):
    """V of the training patches [N, dim], drawn uniformly without replacement, as unit rows."""
    units = _nonzero_unit_rows(patches)
    assert len(units) >= vocab_size, f"{vocab_size} words need at least {vocab_size} non-flat patches"
    g = torch.Generator().manual_seed(seed)
    return units[torch.randperm(len(units), generator=g)[:vocab_size].to(units.device)]


def kmeans_vocab(patches, vocab_size, seed, iters=20, batch_size=16384):
    """Spherical k-means on patches [N, dim] -> V unit centroids, on the patches' device. Eq. 1 compares by cosine,
    so each centroid moves to the normalised sum of its patches (that maximises their summed cosine). batch_size
    patches at a time: memory is batch_size x V, not N x V (32 GB for 1M x 8192). The same bits on every run and
    every process: sums are matmuls, which add in a fixed order (index_add_ on a GPU adds with atomics, in any)."""
    units = _nonzero_unit_rows(patches)
    centroids = random_patches_vocab(patches, vocab_size, seed)  # init: the random-patches vocab
    g = torch.Generator().manual_seed(seed)
    quiet = None if not dist.is_initialized() or dist.get_rank() == 0 else True  # tqdm's None: bars on a terminal only
    bar = tqdm(range(iters), desc="k-means", leave=False, disable=quiet)
    for _ in bar:
        sums, total_cos = torch.zeros_like(centroids), 0.0
        for chunk in units.split(batch_size):
            cosines = chunk @ centroids.T  # [batch_size, V]
            best, nearest = cosines.max(dim=1)
            total_cos = total_cos + best.sum()
            sums += cosines.zero_().scatter_(1, nearest[:, None], 1.0).T @ chunk  # one-hot assignments^T @ patches
        bar.set_postfix(mean_cos=f"{total_cos.item() / len(units):.4f}")  # before this update
        empty = sums.norm(dim=1) < EPS  # a centroid no patch chose: re-seed it with a random patch
        sums[empty] = units[torch.randint(len(units), (int(empty.sum()),), generator=g).to(units.device)]
        centroids = F.normalize(sums, dim=-1, eps=EPS)
    return centroids


def tokenize(images, vocab, patch_size):
    """Eq. 1: token ids [B, n]. Dividing by |x| cannot move the argmax, so a batch is one matmul and an argmax on the
    vocabulary's device, in float32 whatever the autocast around it: the targets do not depend on --dtype."""
    vocab = F.normalize(vocab.float(), dim=-1, eps=EPS)
    patches = tokenizer_patches(images.to(vocab.device), patch_size)
    B, n, dim = patches.shape
    assert dim == vocab.shape[1], f"patches have {dim} dims, the vocabulary {vocab.shape[1]}"
    rows = max(1, 2**24 // len(vocab))  # patches per matmul: at most 16M similarities alive at a time
    with torch.autocast(vocab.device.type, enabled=False):
        ids = [(chunk @ vocab.T).argmax(dim=1) for chunk in patches.reshape(B * n, dim).split(rows)]
    return torch.cat(ids).reshape(B, n)


def render(token_ids, vocab, grid, patch_size):
    """Token ids [B, n] -> picture [B, C, H, W], each token's vocabulary row drawn as its patch (the inverse
    of tokenizer_patches). Rows are unit vectors: this shows patterns, rescaling for display is the caller's job."""
    (h, w), p = grid, patch_size // 2
    B, n = token_ids.shape
    C = vocab.shape[1] // (p * p)
    assert n == h * w and vocab.shape[1] == C * p * p, f"{n} tokens do not fill a {h}x{w} grid"
    patches = vocab.float()[token_ids.to(vocab.device)].reshape(B, h, w, C, p, p)
    half = patches.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)
    return half.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class PatchSample(data.Augmented):
    """What the vocabulary is fitted on: item i is (k tokenizer patches [k, dim], i) of the i-th of num_images images
    drawn at random from dataset, augmented as in the first epoch. Images and patches follow from the seed alone,
    so any number of processes draws the same sample."""
    def __init__(self, dataset, transform, patch_size, per_image, num_images, seed=0):
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
        super().__init__(torch.utils.data.Subset(dataset, chosen.tolist()), transform, seed)
        self.patch_size, self.per_image = patch_size, per_image

    def __getitem__(self, i):
        image, _ = super().__getitem__(i)
        patches = tokenizer_patches(data.normalize(image[None]), self.patch_size)[0]  # [n, dim], n grid cells
        pick = np.random.default_rng(self.sample_seed(i)).permutation(len(patches))[:self.per_image]
        return patches[torch.from_numpy(pick)], i

    def unreadable_files(self, few=3):
        """The names of a few of its unreadable images, read again: for the message that stops a run."""
        names = []
        for i in range(len(self.dataset)):
            try:
                self.dataset[i]
            except (OSError, Image.DecompressionBombError) as e:  # data.read_image's message starts with the file
                names.append(str(e).split(": ")[0])
                if len(names) == few:
                    break
        return names


def sample_patches(sample, num_patches, workers=0, device="cpu"):
    """The first num_patches of the k patches of each image of sample (a PatchSample): [num_patches, dim]. Under
    torchrun each process reads every world-th image from its rank, and a sum over processes fills in the rows
    the others read (zeros here): every process holds the sample one process would, whatever their number."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    mine = torch.utils.data.Subset(sample, range(rank, len(sample), world))
    loader = torch.utils.data.DataLoader(mine, 64, num_workers=workers, worker_init_fn=data.leave_stop_signals_to_main)
    patches = torch.zeros(len(sample), sample.per_image, 3 * (sample.patch_size // 2) ** 2, device=device)
    for batch, index in tqdm(loader, desc="sampling patches", disable=None if rank == 0 else True):
        patches[index.to(device)] = batch.to(device)
    if world > 1:
        dist.all_reduce(patches)  # each row comes from the one process that read its image: exact
    return patches.flatten(0, 1)[:num_patches]


def build_vocab(kind, vocab_size, patch_size, seed, sample=None, num_patches=1_000_000, kmeans_iters=20,
                device="cpu", workers=0):
    """A vocabulary [V, 3*(patch_size//2)**2] of unit rows on device. random_projection needs no data; the others
    take num_patches patches of sample, a PatchSample (the paper clustered 3M). Every process builds the same
    vocabulary itself: none waits on another's k-means (a long wait trips NCCL's timeout)."""
    assert kind in VOCAB_KINDS, f"unknown vocabulary kind {kind!r}"
    assert kind == "random_projection" or sample is not None, f"{kind} samples training patches: pass a sample"
    if kind == "random_projection":
        return random_projection_vocab(vocab_size, 3 * (patch_size // 2) ** 2, seed).to(device)
    patches = sample_patches(sample, num_patches, workers, device)
    if kind == "random_patches":
        return random_patches_vocab(patches, vocab_size, seed)
    return kmeans_vocab(patches, vocab_size, seed, iters=kmeans_iters)


def fit_vocabulary(cfg, images, transform, num_patches, device):
    """Fitted on k patches of each of tokenizer_samples / k seeded training images: every process reads its share and
    fits the same vocabulary (none waits). Too many unreadable images stop the run here, before training."""
    per_image = min(num_patches, math.ceil(cfg["tokenizer_samples"] / len(images)))
    num_images = math.ceil(cfg["tokenizer_samples"] / per_image)
    sample = PatchSample(images, transform, cfg["patch_size"], per_image, num_images, cfg["seed"])
    vocab = build_vocab(cfg["tokenizer"], cfg["vocab_size"], cfg["patch_size"], cfg["seed"], sample,
                        cfg["tokenizer_samples"], device=device, workers=cfg["workers"])
    unreadable = torch.tensor(float(sample.unreadable), device=device)
    if common.WORLD > 1:
        dist.all_reduce(unreadable)
    data.check_unreadable(cfg, int(unreadable), len(sample), "the vocabulary pass read",
                          f", such as {', '.join(sample.unreadable_files())}")
    return vocab
