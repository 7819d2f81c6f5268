"""Tests of the visual-word tokenizers against references written independently: plain loops."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import data
import tokenizers as tok


def brute_force_patches(images, patch_size):
    """Tokenizer patches by hand: every half-resolution pixel is the mean of a 2x2 slice."""
    B, C, H, W = images.shape
    p = patch_size // 2
    out = []
    for b in range(B):
        rows = []
        for gy in range(H // patch_size):  # row-major grid order
            for gx in range(W // patch_size):
                vector = []
                for c in range(C):  # (channel, row, col) order inside a patch
                    for r in range(p):
                        for s in range(p):
                            y, x = gy * patch_size + 2 * r, gx * patch_size + 2 * s
                            vector.append(images[b, c, y:y + 2, x:x + 2].double().mean().item())
                rows.append(vector)
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def brute_force_tokens(images, vocab, patch_size):
    """Eq. 1 by hand: the explicit cosine with every vocabulary row, then argmax.

    Also returns the gap between the best and second best cosine: where it is tiny, float32 and
    float64 may fairly disagree on the winner.
    """
    patches = brute_force_patches(images, patch_size)
    vocab = vocab.double()
    ids, gaps = torch.zeros(patches.shape[:2], dtype=torch.long), torch.zeros(patches.shape[:2])
    for b in range(patches.shape[0]):
        for k in range(patches.shape[1]):
            x = patches[b, k]
            cosines = [(x @ e / (x.norm() * e.norm())).item() for e in vocab]
            ranked = sorted(range(len(cosines)), key=lambda i: -cosines[i])
            ids[b, k] = ranked[0]
            gaps[b, k] = cosines[ranked[0]] - cosines[ranked[1]]
    return ids, gaps


def smooth_images(num_images, seed, size=32):
    """Image-like data: smooth random colour fields (4x4 noise upsampled) plus some pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_images, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.1 * torch.randn(num_images, 3, size, size, generator=g)


def kmeans_objective(patches, vocab, batch_size=16384):
    """Mean over patches of the best cosine similarity to a vocabulary row (higher is better)."""
    units = F.normalize(patches.float(), dim=-1, eps=tok.EPS)
    vocab = F.normalize(vocab.float().to(patches.device), dim=-1, eps=tok.EPS)
    return torch.cat([(c @ vocab.T).amax(dim=1) for c in units.split(batch_size)]).mean().item()


def pairwise_distances(a, b):
    return (a[:, None, :] - b[None, :, :]).norm(dim=-1)  # exact, unlike cdist's matmul shortcut


# ----------------------------------------------------------------------------- tokenizer patches

@pytest.mark.parametrize("patch_size,H,W", [(16, 32, 48), (4, 16, 12), (2, 6, 10)])
def test_tokenizer_patches_match_hand_slicing(patch_size, H, W):
    images = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(patch_size))
    patches = tok.tokenizer_patches(images, patch_size)
    p = patch_size // 2
    assert patches.shape == (2, (H // patch_size) * (W // patch_size), 3 * p * p)
    assert patches.dtype == torch.float32
    assert torch.allclose(patches.double(), brute_force_patches(images, patch_size), atol=1e-6)


def test_tokenizer_patches_order_on_a_tiny_image():
    # 4x4 image, patch_size 2: four 1x1x3 tokenizer patches, one per 2x2 block, row-major.
    images = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4)
    patches = tok.tokenizer_patches(images, 2)
    top_right = images[0, :, 0:2, 2:4].mean(dim=(1, 2))  # grid cell (0, 1) is patch 1
    bottom_left = images[0, :, 2:4, 0:2].mean(dim=(1, 2))  # grid cell (1, 0) is patch 2
    assert torch.allclose(patches[0, 1], top_right) and torch.allclose(patches[0, 2], bottom_left)
    # patch_size 4 on 8x8: one 2x2x3 patch per 4x4 block, flattened (channel, row, col)
    images = torch.randn(1, 3, 8, 8)
    patch = tok.tokenizer_patches(images, 4)[0, 3]  # bottom-right block
    half = images[0, :, 4:8, 4:8].reshape(3, 2, 2, 2, 2).mean(dim=(2, 4))  # [C, row, col]
    assert torch.allclose(patch, half.flatten(), atol=1e-6)


# ----------------------------------------------------------------------------- tokenize (Eq. 1)

@pytest.mark.parametrize("patch_size,H,W", [(16, 32, 48), (4, 16, 12), (2, 6, 10)])
def test_tokenize_matches_brute_force_cosine_argmax(patch_size, H, W):
    g = torch.Generator().manual_seed(100 + patch_size)
    images = torch.randn(3, 3, H, W, generator=g)
    dim = 3 * (patch_size // 2) ** 2
    vocab = torch.randn(64, dim, generator=g)  # rows not unit: Eq. 1 is a cosine all the same
    ids = tok.tokenize(images, vocab, patch_size)
    ref_ids, ref_gaps = brute_force_tokens(images, vocab, patch_size)
    assert ids.shape == ref_ids.shape and ids.dtype == torch.long
    clear = ref_gaps > 1e-5  # no near tie: float32 must find the same winner as float64
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], ref_ids[clear])
    # the input dtype does not matter: tokenize computes in float32
    assert torch.equal(tok.tokenize(images.double(), vocab, patch_size), ids)
    # nor does autocast: the targets are the same words in a bfloat16 run (a bf16 matmul changes a few percent)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(tok.tokenize(images, vocab, patch_size), ids)


def test_render_of_own_patches_reproduces_patch_directions():
    image = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    own = tok.tokenizer_patches(image, 8)[0]  # [24, 48]
    own = own / own.norm(dim=1, keepdim=True)
    vocab = torch.cat([tok.random_projection_vocab(40, 48, seed=0), own])  # distractors first
    ids = tok.tokenize(image, vocab, 8)
    assert torch.equal(ids[0], torch.arange(40, 64))  # every patch picks itself (cosine 1)
    picture = tok.render(ids, vocab, grid=(4, 6), patch_size=8)
    assert picture.shape == image.shape
    half = picture[:, :, ::2, ::2]  # nearest upsampling: every 2x2 block is one value
    assert torch.equal(picture, half.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    directions = brute_force_patches(image, 8)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    assert torch.allclose(brute_force_patches(picture, 8), directions, atol=1e-5)


# ----------------------------------------------------------------------------- vocabularies

def test_kmeans_objective_increases_with_iterations():
    patches = tok.tokenizer_patches(smooth_images(100, seed=0), 8).reshape(-1, 48)
    objectives = [kmeans_objective(patches, tok.kmeans_vocab(patches, 64, seed=0, iters=i))
                  for i in (0, 1, 5, 20)]
    assert all(b >= a - 1e-6 for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[-1] > objectives[1] + 0.005, objectives
    # zero iterations is the initialisation: the random-patches vocabulary of the same seed
    assert torch.equal(tok.kmeans_vocab(patches, 64, seed=0, iters=0),
                       tok.random_patches_vocab(patches, 64, seed=0))


def test_kmeans_beats_random_patches_on_held_out_patches():
    train = tok.tokenizer_patches(smooth_images(100, seed=0), 8).reshape(-1, 48)
    held_out = tok.tokenizer_patches(smooth_images(100, seed=1), 8).reshape(-1, 48)
    kmeans = kmeans_objective(held_out, tok.kmeans_vocab(train, 64, seed=0))
    random_patches = kmeans_objective(held_out, tok.random_patches_vocab(train, 64, seed=0))
    random_projection = kmeans_objective(held_out, tok.random_projection_vocab(64, 48, seed=0))
    assert kmeans > random_patches + 0.02, (kmeans, random_patches)
    assert random_patches > random_projection + 0.2, (random_patches, random_projection)


def test_kmeans_reseeds_empty_clusters_and_chunking_does_not_matter():
    # 4 directions, each repeated exactly: the random init picks one twice, and the duplicate
    # centroid wins no patch (argmax takes the first of equal scores), so it must be re-seeded.
    patches = tok.random_projection_vocab(4, 12, seed=3).repeat(50, 1)
    init = tok.random_patches_vocab(patches, 4, seed=0)
    assert kmeans_objective(patches, init) < 0.99  # the init did miss a direction
    vocab = tok.kmeans_vocab(patches, 4, seed=0, iters=20)
    assert torch.allclose(vocab.norm(dim=1), torch.ones(4))  # no empty (zero) centroid left
    assert kmeans_objective(patches, vocab) > 0.9999  # all 4 directions found
    chunked = tok.kmeans_vocab(patches, 4, seed=0, iters=20, batch_size=7)
    assert torch.allclose(chunked, vocab, atol=1e-6)


@pytest.mark.parametrize("kind", tok.VOCAB_KINDS)
def test_build_vocab_seeded_unit_rows(kind):
    build = lambda seed: tok.build_vocab(kind, 32, patch_size=4, seed=seed, kmeans_iters=3, num_patches=300,
                                         sample=patch_sample(per_image=8, seed=seed)[0])
    vocab = build(0)
    assert vocab.shape == (32, 12) and vocab.dtype == torch.float32
    assert torch.allclose(vocab.norm(dim=1), torch.ones(32), atol=1e-5)
    assert torch.equal(build(0), vocab)
    assert not torch.allclose(build(1), vocab)


def test_random_projection_components_are_uniform_in_minus_one_one():
    g = torch.Generator().manual_seed(5)
    expected = torch.rand(1000, 12, generator=g) * 2 - 1
    vocab = tok.random_projection_vocab(1000, 12, seed=5)
    assert torch.allclose(vocab, expected / expected.norm(dim=1, keepdim=True))
    assert (vocab < 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_random_patches_are_training_patches_without_replacement_and_skip_flat_ones():
    patches = torch.randn(100, 12, generator=torch.Generator().manual_seed(0))
    patches[::2] = 0.0  # flat patches have no direction and must never be picked
    vocab = tok.random_patches_vocab(patches, 50, seed=0)
    units = patches[1::2] / patches[1::2].norm(dim=1, keepdim=True)
    match = (vocab @ units.T).argmax(dim=1)
    assert torch.allclose(vocab, units[match], atol=1e-6)
    assert len(set(match.tolist())) == 50  # all 50 non-flat patches, each once


# ----------------------------------------------------------------------------- sampling patches

def patch_sample(num_images=40, per_image=3, chosen=40, seed=0, size=16):
    """tokenizers.PatchSample over random uint8 images, unaugmented: its patches are those of the images."""
    images = torch.randint(0, 256, (num_images, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(100 + seed))
    dataset = TensorDataset(images, torch.zeros(num_images, dtype=torch.long))
    return tok.PatchSample(dataset, lambda image: image, 4, per_image, chosen, seed), images


def test_sample_patches_draws_real_patches_spread_over_the_dataset():
    patches, images = patch_sample(num_images=80, chosen=34)  # ceil(100 / 3) images of the 80, 3 patches each
    all_patches = tok.tokenizer_patches(data.normalize(images), 4)  # [80, 16, 12]
    sample = tok.sample_patches(patches, num_patches=100)
    assert sample.shape == (100, 12)
    distance = pairwise_distances(sample, all_patches.reshape(-1, 12))
    nearest = distance.argmin(dim=1)
    assert distance.min(dim=1).values.max() < 1e-5  # every row is an actual patch
    assert len(set(nearest.tolist())) == 100  # distinct patches
    drawn = torch.randperm(80, generator=torch.Generator().manual_seed(0))[:34]  # images drawn at random, in order
    assert (nearest // 16).tolist() == [drawn[i // 3].item() for i in range(100)]  # not the first 34 of the folder
    assert torch.equal(tok.sample_patches(patches, 100), sample)
    assert not torch.equal(tok.sample_patches(patch_sample(num_images=80, chosen=34, seed=1)[0], 100), sample)


def test_sample_patches_takes_every_patch_when_the_images_have_too_few():
    patches, images = patch_sample(num_images=2, per_image=16)  # 2 x 16 patches, 100 asked for
    sample = tok.sample_patches(patches, num_patches=100)
    distance = pairwise_distances(sample, tok.tokenizer_patches(data.normalize(images), 4).reshape(-1, 12))
    assert sample.shape == (32, 12) and len(set(distance.argmin(dim=1).tolist())) == 32


# ----------------------------------------------------------------------------- bad inputs

def test_clear_errors_for_bad_inputs():
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(AssertionError, match="even"):
        tok.tokenizer_patches(images, 3)
    with pytest.raises(AssertionError, match="divisible"):
        tok.tokenizer_patches(images, 12)  # even, but 12 does not divide 16
    with pytest.raises(AssertionError, match="at least 64"):
        tok.random_patches_vocab(torch.randn(10, 12), 64, seed=0)
    with pytest.raises(AssertionError, match="192 dims"):
        tok.tokenize(torch.randn(1, 3, 32, 32), torch.randn(8, 12), 16)
    with pytest.raises(AssertionError, match="grid"):
        tok.render(torch.zeros(1, 16, dtype=torch.long), torch.randn(8, 12), (3, 4), patch_size=4)
    with pytest.raises(AssertionError, match="unknown vocabulary kind"):
        tok.build_vocab("dall-e", 64, 16, seed=0)
    with pytest.raises(AssertionError, match="pass a sample"):
        tok.build_vocab("kmeans", 64, 16, seed=0)


# ----------------------------------------------------------------------------- several processes (gloo on localhost)

class Counting(torch.utils.data.Dataset):
    """Built-in scenes that note which images this process read."""
    def __init__(self, num_images):
        self.scenes, self.reads = data.SyntheticShapes(num_images, 16), []

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.scenes[i]


def vocabularies(slow_fit=0.0):
    """Both data-fitted vocabularies of 40 built-in scenes, built as pretrain.py does under torchrun."""
    scenes = Counting(40)
    patches = tok.PatchSample(scenes, data.pretrain_transform(16), 4, per_image=8, num_images=38, seed=0)
    if slow_fit:  # a k-means longer than the processes' collective timeout
        fit = tok.kmeans_vocab
        tok.kmeans_vocab = lambda *args, **kwargs: time.sleep(slow_fit) or fit(*args, **kwargs)
    vocabs = {kind: tok.build_vocab(kind, 32, 4, seed=0, sample=patches, num_patches=300, kmeans_iters=3)
              for kind in ("kmeans", "random_patches")}
    return vocabs, scenes.reads


def _vocab_worker(rank, world, port, out_dir, timeout, slow_fit):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        vocabs, reads = vocabularies(slow_fit)
        dist.barrier()  # after the fits: still within the timeout of one another
        torch.save(dict(vocabs=vocabs, reads=reads), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_fit_the_same_vocabularies_as_one_each_reading_half_the_images(tmp_path):
    """Every process fits the vocabulary itself, so no process waits on another's k-means: with a 2 s collective
    timeout, a 4 s k-means still finishes (NCCL's is 10 minutes, and a k-means at ImageNet scale can be longer)."""
    from test_pretrain import free_port
    one, reads = vocabularies()
    drawn = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:38].tolist()  # ceil(300 / 8) of 40
    assert sorted(reads) == sorted(2 * drawn)  # each drawn image once per vocabulary
    mp.spawn(_vocab_worker, args=(2, free_port(), str(tmp_path), 2, 4.0), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(ranks[0]["reads"] + ranks[1]["reads"]) == sorted(reads)  # each image read once, by one process
    assert len(ranks[0]["reads"]) == len(ranks[1]["reads"]) == 38
    images = data.normalize(torch.stack([data.SyntheticShapes(40, 16)[i][0] for i in range(40)]))
    for kind, vocab in one.items():
        for rank in ranks:
            assert torch.equal(rank["vocabs"][kind], vocab), kind  # bit for bit
            assert torch.equal(tok.tokenize(images, rank["vocabs"][kind], 4), tok.tokenize(images, vocab, 4))
