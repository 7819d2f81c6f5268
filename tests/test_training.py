"""The training machinery against references written here: DistributedSampler's documented shards, one big batch
against accumulated micro-batches and against autograd, gradient clipping seen through plain SGD, the lr schedule
formula, F.interpolate on the position grid, and finetune.py --init at lr 0 (subprocesses, the last test only)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import tokenizers
from masking import beit_mask, split_patches
from common import set_lr
from model import BEiT, Classifier, SplitMask, ViT, load_encoder, param_groups
from pretrain import train_step
from test_pretrain import TINY, run, weights


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not collapse on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 1. data shards under DDP
def shard(dataset, rank, epoch, skip_batches=0, batch_size=2, seed=0):
    """Rank `rank` of 2: a loader as make_loader builds it (without a process group), set_epoch'd as pretrain does."""
    sampler = data.Sampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=True)
    data.set_epoch(loader, epoch, skip_batches)
    return loader


def test_sampler_shards_are_the_documented_split_of_the_seeded_permutation():
    """Two ranks of 11 items (drop_last drops one): disjoint, equal, and together the first 10 entries of
    randperm(11) under seed + epoch, rank r taking indices[r::2], as DistributedSampler documents. Catches a
    sampler seeded without the epoch (same order every epoch), shards that overlap, or a skip that cuts the
    wrong end of the shard or counts batches instead of samples."""
    N, seed = 11, 0
    dataset = list(range(N))
    orders = {}
    for epoch in (0, 1, 2):
        full = [list(shard(dataset, rank, epoch).sampler) for rank in (0, 1)]
        expected = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch)).tolist()[:2 * (N // 2)]
        assert full == [expected[0::2], expected[1::2]]
        assert len(full[0]) == len(full[1]) == N // 2 and not set(full[0]) & set(full[1])
        assert sorted(full[0] + full[1]) == sorted(expected)
        orders[epoch] = full
        for k, b in ((1, 2), (2, 1), (1, 3)):  # set_epoch(skip_batches=k) on a loader of batch b skips k * b samples
            for rank in (0, 1):
                loader = shard(dataset, rank, epoch, skip_batches=k, batch_size=b)
                assert loader.sampler.skip == k * b
                assert list(loader.sampler) == full[rank][k * b:]
                assert len(loader.sampler) == N // 2 - k * b == len(list(loader.sampler))
                batches = [x for batch in loader for x in batch.tolist()]  # what the loader yields, in order
                assert batches == full[rank][k * b:][:len(loader) * b]
    assert orders[0] != orders[1] != orders[2] != orders[0]  # set_epoch reshuffles
    assert list(shard(dataset, 0, 1, skip_batches=0).sampler) == orders[1][0]  # and a later skip=0 skips nothing


# ----------------------------------------------------------------------------- 2. gradient accumulation
VOCAB = tokenizers.random_projection_vocab(16, 12, 0)  # 16 words of 2x2 patches of the half-size image


def tiny_model(method):
    torch.manual_seed(0)
    encoder = ViT("tiny", 16, 4, drop_path=0.0)
    return BEiT(encoder, vocab_size=16) if method == "beit" else SplitMask(encoder, vocab_size=16, nce_weight=0.0)


def batch(method, n=16, seed=0):
    """n images and the masks the loader would draw for them (as bench.random_masks, on a 4x4 grid: blocks of 2+)."""
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    if method == "splitmask":
        masks = np.stack([split_patches((4, 4), 0.5, rng, "block", 2) for _ in range(n)])
    else:
        masks = np.stack([np.flatnonzero(beit_mask((4, 4), 0.4, rng, "block", 2)) for _ in range(n)])
    return images, torch.from_numpy(masks)


def step(model, optimizer, micro_batches, clip_grad):
    return train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                      torch.autocast("cpu", enabled=False), micro_batches, VOCAB, 4, clip_grad)


def autograd_grads(model, images, masks):
    """The gradient of the whole batch's loss, by plain autograd: {parameter name: grad}, and its global norm."""
    model.zero_grad(set_to_none=True)
    model(images, tokenizers.tokenize(images, VOCAB, 4), masks)["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, torch.stack([g.double().pow(2).sum() for g in grads.values()]).sum().sqrt().item()


@pytest.mark.parametrize("method", ["beit", "splitmask"])
def test_two_micro_batches_of_8_equal_one_batch_of_16(method):
    """BEiT and SplitMask without InfoNCE (the losses whose mean over 16 is the mean of two means over 8): one step
    on 16 images and one on the same 16 as two micro-batches leave the same weights, return the same mean losses
    and the same grad norm, the norm of autograd's 16-image gradient.
    Catches a loss not divided by the number of micro-batches (2x gradient), a zero_grad between micro-batches
    (only the last one's gradient), or a norm taken after clipping.
    AdamW's eps is 1e-3, near these gradients' size, not 1e-8: at 1e-8 the first step, lr * g / (|g| + eps),
    turns float32 summation noise (~1e-9) in gradients near 0 into weight differences of ~1e-4, and it would be
    blind to the gradient's scale; at 1e-3 the noise stays ~1e-12 and a 2x gradient moves the weights visibly."""
    images, masks = batch(method)
    one, two, reference = tiny_model(method), tiny_model(method), tiny_model(method)
    _, norm = autograd_grads(reference, images, masks)
    opt_one, opt_two = (torch.optim.AdamW(param_groups(m, 0.05), lr=1e-3, eps=1e-3) for m in (one, two))
    stats_one = step(one, opt_one, [(images, masks)], clip_grad=1e6)
    stats_two = step(two, opt_two, [(images[:8], masks[:8]), (images[8:], masks[8:])], clip_grad=1e6)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), reference.parameters()))  # the step moved
    assert list(stats_one) == list(stats_two) == ["loss", "mim_loss", "nce_loss", "mim_acc", "grad_norm"]
    for key in stats_one:  # means over the micro-batches; the norm of the step's whole gradient
        torch.testing.assert_close(stats_one[key], stats_two[key], rtol=1e-5, atol=1e-6, msg=key)
    assert stats_one["grad_norm"].item() == pytest.approx(norm, rel=1e-5)
    assert stats_two["grad_norm"].item() == pytest.approx(norm, rel=1e-5)
    assert stats_one["nce_loss"].item() == stats_two["nce_loss"].item() == 0.0  # no InfoNCE


# ----------------------------------------------------------------------------- 3. gradient clipping
@pytest.mark.parametrize("clip_grad", [1e-3, 1e6])
def test_clipping_scales_the_applied_gradient_to_clip_grad(clip_grad):
    """SGD at lr 1, no momentum, no weight decay: the update is minus the gradient train_step applied. Its norm is
    min(norm, clip_grad), it points along autograd's gradient, and the norm returned is the one before clipping.
    Catches clipping after optimizer.step (no effect), clipping per parameter, or returning the clipped norm."""
    images, masks = batch("beit")
    model, reference = tiny_model("beit"), tiny_model("beit")
    grads, norm = autograd_grads(reference, images, masks)
    groups = param_groups(model, 0.0)  # weight decay 0 in every group: SGD reads it from the group
    assert all(g["weight_decay"] == 0.0 for g in groups)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = step(model, torch.optim.SGD(groups, lr=1.0, momentum=0.0), [(images, masks)], clip_grad)
    update = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    assert update.keys() == grads.keys()
    update_norm = torch.stack([u.double().pow(2).sum() for u in update.values()]).sum().sqrt().item()
    assert stats["grad_norm"].item() == pytest.approx(norm, rel=1e-5)  # before clipping
    assert norm > 1e-2  # so that 1e-3 clips
    assert update_norm == pytest.approx(min(norm, clip_grad), rel=1e-4)
    scale = min(1.0, clip_grad / (norm + 1e-6))  # clip_grad_norm_'s coefficient
    for name, u in update.items():  # p - (p - g) in float32 loses the bits of p that g lacks: atol ~ eps * |p|
        torch.testing.assert_close(u, grads[name] * scale, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- 4. learning-rate schedule
def expected_lr(step, total, warmup, peak, floor):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_set_lr_warmup_cosine_and_layer_decay():
    """set_lr against the formula written out here, at the points where a schedule goes wrong: the first and last
    warm-up steps, the first step after (the peak), the middle of the cosine (halfway to floor), the last step (floor
    plus a sliver) and past the end (floor). Each group's lr is that times 0.5 ** (13 - layer), the layer read
    from the parameter names here. Catches an off-by-one warm-up (0 at step 0, or peak reached a step late), a
    cosine without floor, no clamp past the end, or a group whose lr ignores its layer scale."""
    total, warmup, peak, floor = 100, 10, 1e-3, 1e-5
    last = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 89 / 90))  # progress 89/90 at step 99
    cases = {0: peak / 10, 9: peak, 10: peak, 55: floor + (peak - floor) / 2, 99: last, 100: floor, 150: floor,
             10**6: floor}
    classifier = Classifier(ViT("tiny", 16, 4), 3)
    names = {id(p): name for name, p in classifier.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(classifier, 0.05, layer_decay=0.5), lr=1.0)

    def layer(name):  # 0: patch and position embeddings, b + 1: block b, 13: the norm and head above the blocks
        if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
            return 0
        return int(name.split(".")[2]) + 1 if name.startswith("encoder.blocks.") else 13

    for step_, lr in cases.items():
        assert expected_lr(step_, total, warmup, peak, floor) == pytest.approx(lr, rel=1e-12)
        got = set_lr(optimizer, step_, total, warmup, peak, floor)
        assert got == pytest.approx(lr, rel=1e-12), step_
        for group in optimizer.param_groups:
            layers = {layer(names[id(p)]) for p in group["params"]}
            assert len(layers) == 1
            assert group["lr"] == pytest.approx(lr * 0.5 ** (13 - layers.pop()), rel=1e-12), step_
    assert floor < cases[99] < floor + 1e-6  # the last step is not floor yet, but within a sliver of it
    for step_ in range(160):  # and the formula at every step, warm-up, decay and beyond
        assert set_lr(optimizer, step_, total, warmup, peak, floor) == pytest.approx(
            expected_lr(step_, total, warmup, peak, floor), rel=1e-12), step_
    scales = {layer(names[id(g["params"][0])]): g["lr"] / got for g in optimizer.param_groups}
    assert scales[0] == pytest.approx(0.5**13) and scales[13] == 1.0 and len(scales) == 14  # all 14 depths differ


# ----------------------------------------------------------------------------- 5. position-embedding resize
def checkpoint_with_grid(grid):
    """A real ViT-tiny/4 at 16 px state dict, pre-training style ("encoder." keys), with pos_embed = grid
    [1, D, 4, 4] laid out row-major ([1, 16, D], position i * 4 + j)."""
    torch.manual_seed(0)
    state = {f"encoder.{k}": v for k, v in ViT("tiny", 16, 4).state_dict().items()}
    pos = torch.empty(1, 16, grid.shape[1])
    for i in range(4):
        for j in range(4):
            pos[0, i * 4 + j] = grid[0, :, i, j]
    state["encoder.pos_embed"] = pos
    return state


def test_load_encoder_resizes_the_position_grid_bicubically():
    """A 4x4 position grid into a ViT at 32 px (8x8): the loaded pos_embed is F.interpolate(bicubic) of the grid,
    read back row-major by hand; the other weights are copied as they are. Catches nearest or bilinear resizing,
    align_corners=True, and a grid read column-major or written back transposed."""
    D = 192
    grid = torch.arange(D * 16, dtype=torch.float32).reshape(1, D, 4, 4).sin()  # distinct everywhere, not symmetric
    state = checkpoint_with_grid(grid)
    encoder = ViT("tiny", 32, 4)
    load_encoder(encoder, state)
    resized = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    expected = torch.stack([resized[0, :, i, j] for i in range(8) for j in range(8)])[None]
    torch.testing.assert_close(encoder.pos_embed.data, expected, rtol=0, atol=1e-6)
    for name, value in encoder.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(value, state[f"encoder.{name}"]), name


def test_resized_ramp_along_x_stays_constant_along_y():
    """A ramp along x (columns), constant along y: after resizing, every row of the 8x8 grid is the same increasing
    ramp. A transposed layout would give constant columns instead."""
    D = 192
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4) * torch.arange(1, D + 1).view(1, D, 1, 1)
    encoder = ViT("tiny", 32, 4)
    load_encoder(encoder, checkpoint_with_grid(ramp.expand(1, D, 4, 4)))
    grid = encoder.pos_embed.data.view(8, 8, D)  # [y, x, D], row-major
    torch.testing.assert_close(grid, grid[:1].expand(8, 8, D), rtol=1e-6, atol=1e-6)  # values to 576
    assert (grid[0, 1:, 0] > grid[0, :-1, 0]).all()  # and it still rises along x


# ----------------------------------------------------------------------------- 6. finetune.py --init, exactly
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={out}")
    return str(out)


FINETUNE = ["--epochs=1", "--num_images=32", "--batch_size=16", "--workers=0", "--dtype=float32"]


def test_finetune_at_lr_0_keeps_the_pretrained_encoder_bit_exact(pretrained, tmp_path):
    """finetune.py --init at --blr=0 --min_lr=0: AdamW at lr 0 moves nothing (weight decay included), so every
    encoder tensor of its checkpoint is the pre-training one, bit for bit. An --init that were ignored (or loaded
    into a copy, or loaded before a re-init) would leave random weights here. The default --blr moves every one
    of them: the equality is not a checkpoint that training never touches."""
    source = {k: v for k, v in weights(pretrained).items() if k.startswith("encoder.")}
    init = os.path.join(pretrained, "ckpt.pt")
    run("finetune.py", *FINETUNE, "--blr=0", "--min_lr=0", f"--init={init}", f"--out_dir={tmp_path / 'lr0'}")
    frozen = {k: v for k, v in weights(str(tmp_path / "lr0")).items() if k.startswith("encoder.")}
    assert frozen.keys() == source.keys() and len(source) > 100
    for key in source:
        assert torch.equal(frozen[key], source[key]), key
    run("finetune.py", *FINETUNE, f"--init={init}", f"--out_dir={tmp_path / 'default'}")
    trained = weights(str(tmp_path / "default"))
    moved = [key for key in source if not torch.equal(trained[key], source[key])]
    assert moved == list(source)
