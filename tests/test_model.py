"""model.py is checked against plain references written here: loops, naive attention, the textbook
InfoNCE with F.cross_entropy, hand-gathered cross-entropies, a real 2-process gloo run, and FLOPs
measured by torch.utils.flop_counter. Everything is tiny so the file runs on a couple of CPU cores."""
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model
from model import BEiT, SplitMask, ViT, drop_path, info_nce, info_nce_reference, param_groups

# The documented sizes (Dosovitskiy et al. / DeiT): name -> (width, depth, heads).
DOCUMENTED_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


# -----------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, and it does not collapse when the CI runner's
    cores are shared (OpenMP barriers across busy cores made this file 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_meta(fn, monkeypatch):
    """Build a (large) model on the meta device: no memory, no init time. ViT reads its drop-path
    rates with linspace(...).tolist(), which needs real data, so that one call is kept on the CPU."""
    real_linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: real_linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        return fn()


def random_split(B, n, mask_ratio, gen):
    """visible [B, 2, k]: two disjoint subsets from a random permutation of each image's patches
    (50%: the two halves; 75%: two disjoint quarters)."""
    k = round(n * (1 - mask_ratio))
    return torch.stack([torch.randperm(n, generator=gen)[: 2 * k].view(2, k) for _ in range(B)])


def make_splitmask(seed=0, img=16, patch=4, vocab=16, layer_scale=0.1, **kw):
    torch.manual_seed(seed)
    return SplitMask(ViT("tiny", img, patch, drop_path=0.0, layer_scale=layer_scale), vocab, **kw)


def make_batch(B, n, vocab, img=16, mask_ratio=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, img, img, generator=gen)
    token_ids = torch.randint(0, vocab, (B, n), generator=gen)
    return images, token_ids, random_split(B, n, mask_ratio, gen)


def naive_info_nce(xa, xb, t):
    """Symmetric InfoNCE as the paper writes it: cosine similarities / t, cross-entropy with the
    positive on the diagonal, once per direction, averaged."""
    a = xa / xa.norm(dim=1, keepdim=True)
    b = xb / xb.norm(dim=1, keepdim=True)
    logits = a @ b.T / t
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loss_and_grads(fn, xa, xb):
    xa, xb = xa.detach().clone().requires_grad_(), xb.detach().clone().requires_grad_()
    loss = fn(xa, xb)
    ga, gb = torch.autograd.grad(loss, (xa, xb))
    return loss.detach(), ga, gb


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# ViT


@pytest.mark.parametrize("img, patch", [(32, 4), (32, 2), (224, 16)])
def test_vit_output_shapes(img, patch):
    torch.manual_seed(0)
    enc = ViT("tiny", img, patch).eval()
    n = (img // patch) ** 2
    assert enc.num_patches == n and enc.grid == (img // patch, img // patch)
    images = torch.randn(2, 3, img, img)
    with torch.no_grad():
        out = enc(images)
        layers = enc(images, all_layers=True)
    assert out.shape == (2, n, 192) and torch.isfinite(out).all()
    assert len(layers) == 12 and all(h.shape == (2, n, 192) for h in layers)
    torch.testing.assert_close(layers[-1], out)


@pytest.mark.parametrize("size", list(DOCUMENTED_SIZES))
def test_vit_sizes(size, monkeypatch):
    dim, depth, heads = DOCUMENTED_SIZES[size]
    enc = on_meta(lambda: ViT(size, 224, 16), monkeypatch)
    assert (enc.dim, enc.depth, enc.heads) == (dim, depth, heads)
    assert len(enc.blocks) == depth
    assert all(b.attn.heads == heads for b in enc.blocks)
    assert enc.blocks[0].attn.qkv.weight.shape == (3 * dim, dim)
    assert enc.blocks[0].mlp[0].weight.shape == (4 * dim, dim)
    assert enc.pos_embed.shape == (1, 196, dim)
    # Parameter count from the architecture, by hand: per block qkv 3D^2+3D, proj D^2+D, MLP 8D^2+5D,
    # two LayerNorms 4D, two layer-scale gains 2D; patch embedding 3*16*16*D+D, positions 196*D, final norm.
    per_block = 12 * dim * dim + 15 * dim
    expected = depth * per_block + (3 * 16 * 16 * dim + dim) + 196 * dim + 2 * dim
    assert sum(p.numel() for p in enc.parameters()) == expected
    if size == "base":  # cross-check with timm's vit_base_patch16_224 (86,567,656 with cls token and head)
        assert expected == 86_567_656 - (768 * 1000 + 1000) - 768 - 768 + 12 * 2 * 768


def test_vit_bad_arguments():
    with pytest.raises(KeyError, match="huge"):  # an unknown model size
        ViT("huge", 32, 4)
    with pytest.raises(AssertionError):  # an image not divisible into patches
        ViT("tiny", 30, 4)


def test_patchify_is_row_major():
    torch.manual_seed(0)
    enc = ViT("tiny", 12, 4)
    images = torch.randn(2, 3, 12, 12)
    w, bias = enc.patch_embed.weight.reshape(192, -1), enc.patch_embed.bias
    expected = []
    for r in range(3):
        for c in range(3):
            pixels = images[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(2, -1)
            expected.append(pixels @ w.T + bias)
    torch.testing.assert_close(enc.patchify(images), torch.stack(expected, 1), rtol=1e-5, atol=1e-5)


def test_vit_keep_equals_hand_gathered_tokens():
    torch.manual_seed(0)
    enc = ViT("tiny", 32, 4).eval()
    images = torch.randn(3, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(64, generator=gen)[:20] for _ in range(3)])
    with torch.no_grad():
        x = enc.patchify(images) + enc.pos_embed
        gathered = torch.stack([torch.stack([x[b, int(i)] for i in keep[b]]) for b in range(3)])
        expected = enc.forward_tokens(gathered)
        got = enc(images, keep=keep)
        got_layers = enc(images, keep=keep, all_layers=True)
    assert got.shape == (3, 20, 192)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_layers[-1], expected, rtol=1e-5, atol=1e-5)


def test_attention_equals_naive_softmax():
    torch.manual_seed(0)
    dim, heads, N = 48, 3, 7
    attn = model.Attention(dim, heads)
    x = torch.randn(2, N, dim)
    d = dim // heads
    Wqkv, bqkv = attn.qkv.weight, attn.qkv.bias
    Wq, Wk, Wv = Wqkv[:dim], Wqkv[dim : 2 * dim], Wqkv[2 * dim :]
    bq, bk, bv = bqkv[:dim], bqkv[dim : 2 * dim], bqkv[2 * dim :]
    outs = []
    for b in range(2):
        q, k, v = x[b] @ Wq.T + bq, x[b] @ Wk.T + bk, x[b] @ Wv.T + bv
        per_head = []
        for h in range(heads):
            qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
            per_head.append(torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1) @ vh)
        outs.append(torch.cat(per_head, -1) @ attn.proj.weight.T + attn.proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), torch.stack(outs).detach(), rtol=1e-5, atol=1e-5)


def test_block_equals_prenorm_layer_scale_formula():
    torch.manual_seed(0)
    block = model.Block(48, 3, 4.0, 0.0, layer_scale=0.1)
    with torch.no_grad():  # distinct gains so the check can tell gamma1 from gamma2
        block.gamma1.copy_(torch.rand(48))
        block.gamma2.copy_(torch.rand(48) + 1)
        x = torch.randn(2, 5, 48)
        x1 = x + block.gamma1 * block.attn(block.norm1(x))
        expected = x1 + block.gamma2 * block.mlp(block.norm2(x1))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_drop_path_function():
    x = torch.randn(4000, 3, 5)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.3, training=True)
    kept = torch.isclose(y, x / 0.7, rtol=1e-6, atol=0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert (kept ^ dropped).all()  # every sample is entirely kept (rescaled) or entirely dropped
    assert abs(dropped.float().mean().item() - 0.3) < 0.05


def test_drop_path_in_vit():
    torch.manual_seed(0)
    enc = ViT("tiny", 16, 4, drop_path=0.5)
    rates = [b.drop_path for b in enc.blocks]
    assert rates == pytest.approx([0.5 * i / 11 for i in range(12)])  # linear from 0 to the maximum
    plain = ViT("tiny", 16, 4, drop_path=0.0)
    plain.load_state_dict(enc.state_dict())
    images = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        enc.eval(), plain.eval()
        torch.testing.assert_close(enc(images), plain(images))  # identity at evaluation
        enc.train(), plain.train()
        torch.manual_seed(1)
        y1 = enc(images)
        torch.testing.assert_close(plain(images), plain(images))  # no other randomness in training
        assert not torch.allclose(y1, enc(images))  # but stochastic depth is random in training


def test_layer_scale():
    enc = ViT("tiny", 16, 4, layer_scale=0.1)
    gammas = [p for n, p in enc.named_parameters() if "gamma" in n]
    assert len(gammas) == 2 * 12
    assert all(g.shape == (192,) and torch.all(g == 0.1) for g in gammas)
    sm = SplitMask(enc, 16)
    assert all(torch.all(b.gamma1 == 0.1) and torch.all(b.gamma2 == 0.1) for b in sm.decoder)
    enc0 = ViT("tiny", 16, 4, layer_scale=0.0)
    assert not any("gamma" in n for n, _ in enc0.named_parameters())
    assert all(b.gamma1 is None and b.gamma2 is None for b in enc0.blocks)
    assert not any("gamma" in n for n, _ in SplitMask(enc0, 16).named_parameters())


# -----------------------------------------------------------------------------
# Fused InfoNCE

NCE_CASES = [(1, 1), (1, 4), (3, 1), (3, 2), (3, 3), (3, 1024), (64, 7), (64, 64), (64, 100),
             (300, 128), (300, 300), (300, 1024)]  # (batch, tile): tiles smaller, equal, larger


@pytest.mark.parametrize("B, tile", NCE_CASES)
def test_info_nce_matches_naive_fp32(B, tile):
    gen = torch.Generator().manual_seed(B)
    xa, xb = torch.randn(B, 32, generator=gen), torch.randn(B, 32, generator=gen)
    xb[: B // 2] += 2 * xa[: B // 2]  # some positives clearly aligned, so the loss is not trivial
    loss, ga, gb = loss_and_grads(lambda a, b: info_nce(a, b, 0.2, tile=tile), xa, xb)
    ref_loss, ref_ga, ref_gb = loss_and_grads(lambda a, b: naive_info_nce(a, b, 0.2), xa, xb)
    assert loss.dtype == torch.float32 and ga.dtype == gb.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    scale = ref_ga.abs().max().item() + ref_gb.abs().max().item() + 1e-12
    torch.testing.assert_close(ga, ref_ga, rtol=1e-5, atol=1e-5 * scale + 1e-7)
    torch.testing.assert_close(gb, ref_gb, rtol=1e-5, atol=1e-5 * scale + 1e-7)
    # and the module's own readable reference agrees with ours
    torch.testing.assert_close(info_nce_reference(xa, xb, 0.2), ref_loss, rtol=1e-5, atol=1e-6)
    if B == 1:  # one pair, no negatives: softmax over a single logit
        assert loss.abs().item() < 1e-6


def test_info_nce_temperature():
    gen = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    for t in (0.05, 0.2, 1.0):
        torch.testing.assert_close(info_nce(xa, xb, t, tile=5), naive_info_nce(xa, xb, t), rtol=1e-5, atol=1e-6)


def test_info_nce_bf16_inputs():
    gen = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    xb[:32] += xa[:32]
    ref_loss, ref_ga, ref_gb = loss_and_grads(lambda a, b: naive_info_nce(a, b, 0.2), xa, xb)
    a16, b16 = xa.bfloat16().requires_grad_(), xb.bfloat16().requires_grad_()
    loss = info_nce(a16, b16, 0.2, tile=16)
    loss.backward()
    assert loss.dtype == torch.float32
    assert a16.grad.dtype == b16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)
    for g, ref in ((a16.grad, ref_ga), (b16.grad, ref_gb)):
        torch.testing.assert_close(g.float(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())


def test_info_nce_under_autocast_is_fp32():
    torch.manual_seed(0)
    proj = nn.Linear(16, 32)
    x = torch.randn(48, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa, xb = proj(x), proj(x + 0.3 * torch.randn(48, 16))
        assert xa.dtype == torch.bfloat16  # the descriptors really are in the AMP dtype
        loss = info_nce(xa, xb, 0.2, tile=10)
    assert loss.dtype == torch.float32
    # computed in fp32 from the bf16 descriptors: as exact as the fp32 reference on the same values
    torch.testing.assert_close(loss, naive_info_nce(xa.float(), xb.float(), 0.2), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


def test_info_nce_saves_no_square_matrix():
    # The point of the fused loss: nothing of size B x B is kept for backward.
    B, D = 300, 16
    xa, xb = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)

    def largest_saved(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(xa, xb, 0.2)
        return max(sizes)

    assert largest_saved(naive_info_nce) >= B * B  # the hook does see the naive version's logits
    assert largest_saved(lambda a, b, t: info_nce(a, b, t, tile=64)) < B * B


def test_info_nce_gradcheck_float64():
    # info_nce itself normalises with .float(), so float64 inputs are downcast (gradcheck on it is
    # impossible and is skipped). The hand-written backward of the Function is checked in float64
    # directly; its log-sum-exp buffers use the default dtype, hence the default is float64 here.
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert info_nce(a, a.detach() + 1).dtype == torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, 4, generator=gen, dtype=torch.float64, requires_grad=True) for s in (3, 3, 5, 5)]
        a, b, a_all, b_all = inputs
        # one process: a_all = b_all = None
        assert torch.autograd.gradcheck(lambda a, b: model._FusedInfoNCE.apply(a, b, None, None, 0.5, 2), (a, b))
        # the gathered path: rows of a against b_all, columns of a_all against b
        assert torch.autograd.gradcheck(
            lambda a, b, a_all, b_all: model._FusedInfoNCE.apply(a, b, a_all, b_all, 0.5, 2), (a, b, a_all, b_all)
        )
    finally:
        torch.set_default_dtype(old)


# -----------------------------------------------------------------------------
# Two real processes (gloo on localhost)

WORLD, NCE_ROWS, DDP_BATCH = 2, 8, 4


def nce_inputs():
    gen = torch.Generator().manual_seed(123)
    xa, xb = torch.randn(NCE_ROWS, 16, generator=gen), torch.randn(NCE_ROWS, 16, generator=gen)
    xb[::2] += xa[::2]
    return xa, xb


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        # 1. InfoNCE with negatives gathered across processes: each rank holds 4 of the 8 rows.
        xa, xb = nce_inputs()
        rows = slice(rank * NCE_ROWS // WORLD, (rank + 1) * NCE_ROWS // WORLD)
        a, b = xa[rows].clone().requires_grad_(), xb[rows].clone().requires_grad_()
        loss = info_nce(a, b, 0.2, tile=3)
        loss.backward()
        result["nce"] = (loss.detach(), a.grad, b.grad)
        # 2. SplitMask wrapped in DDP, each rank with half of the global batch of 4.
        sm = make_splitmask()
        images, token_ids, visible = make_batch(DDP_BATCH, sm.encoder.num_patches, 16)
        rows = slice(rank * DDP_BATCH // WORLD, (rank + 1) * DDP_BATCH // WORLD)
        ddp = nn.parallel.DistributedDataParallel(sm)
        out = ddp(images[rows], token_ids[rows], visible[rows])
        out["loss"].backward()
        result["ddp"] = (
            {k: out[k].detach() for k in ("loss", "mim_loss", "nce_loss")},
            {n: p.grad.clone() for n, p in sm.named_parameters()},
        )
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_info_nce_two_processes(two_process_results):
    # Each rank r computes L_r = its share of the symmetric loss over the global batch (its rows in
    # direction a->b, its columns in b->a), so the global loss is L = mean_r L_r. The all-gather's
    # backward SUMS every rank's gradient w.r.t. the gathered copy of rank r's rows back into rank r,
    # so rank r's leaf gradient is d(sum_r' L_r')/dx_r = WORLD * dL/dx_r. Dividing by the world size
    # (what DDP's averaging does to parameter gradients) gives the 1-process gradient of those rows.
    xa, xb = nce_inputs()
    ref_loss, ref_ga, ref_gb = loss_and_grads(lambda a, b: naive_info_nce(a, b, 0.2), xa, xb)
    losses = torch.stack([r["nce"][0] for r in two_process_results])
    assert not torch.allclose(losses[0], losses[1])  # the ranks really computed different shares
    torch.testing.assert_close(losses.mean(), ref_loss, rtol=1e-5, atol=1e-6)
    per = NCE_ROWS // WORLD
    for rank, result in enumerate(two_process_results):
        _, ga, gb = result["nce"]
        rows = slice(rank * per, (rank + 1) * per)
        torch.testing.assert_close(ga / WORLD, ref_ga[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb / WORLD, ref_gb[rows], rtol=1e-5, atol=1e-6)


def test_splitmask_ddp_matches_one_process(two_process_results):
    sm = make_splitmask()
    images, token_ids, visible = make_batch(DDP_BATCH, sm.encoder.num_patches, 16)
    out = sm(images, token_ids, visible)
    out["loss"].backward()
    # Same weights everywhere (same seed), equal token counts per rank: rank means average to the global one.
    for key in ("loss", "mim_loss", "nce_loss"):
        rank_mean = torch.stack([r["ddp"][0][key] for r in two_process_results]).mean()
        torch.testing.assert_close(rank_mean, out[key].detach(), rtol=1e-5, atol=1e-6)
    for rank, result in enumerate(two_process_results):
        grads = result["ddp"][1]
        assert set(grads) == {n for n, _ in sm.named_parameters()}
        for name, p in sm.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


# -----------------------------------------------------------------------------
# SplitMask


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_splitmask_outputs(mask_ratio):
    sm = make_splitmask(img=32, vocab=32)
    n = sm.encoder.num_patches
    images, token_ids, visible = make_batch(3, n, 32, img=32, mask_ratio=mask_ratio)
    k = visible.shape[-1]
    assert k == round(n * (1 - mask_ratio))
    assert all(len(set(visible[b].flatten().tolist())) == 2 * k for b in range(3))  # disjoint subsets
    out = sm(images, token_ids, visible)
    for key in ("loss", "mim_loss", "nce_loss", "mim_acc"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert out["mim_loss"] > 0 and out["nce_loss"] > 0
    assert 0.0 <= out["mim_acc"].item() <= 1.0
    assert out["pred_ids"].shape == (6, k)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sm.parameters())


@pytest.mark.parametrize("mim_weight, nce_weight", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_splitmask_loss_weights(mim_weight, nce_weight):
    both = make_splitmask()
    sm = make_splitmask(mim_weight=mim_weight, nce_weight=nce_weight)
    images, token_ids, visible = make_batch(4, 16, 16)
    ref, out = both(images, token_ids, visible), sm(images, token_ids, visible)
    torch.testing.assert_close(out["loss"], mim_weight * out["mim_loss"] + nce_weight * out["nce_loss"])
    # each weight only switches its own part: the parts equal those of the (1, 1) model
    if mim_weight > 0:
        torch.testing.assert_close(out["mim_loss"], ref["mim_loss"])
    else:
        assert out["mim_loss"].item() == 0.0
    if nce_weight > 0:
        torch.testing.assert_close(out["nce_loss"], ref["nce_loss"])
    else:
        assert out["nce_loss"].item() == 0.0
    out["loss"].backward()
    head_grad = sm.head.weight.grad
    if mim_weight == 0:
        assert head_grad is None or torch.all(head_grad == 0)
    else:
        assert head_grad is not None and head_grad.abs().sum() > 0
    assert sm.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_splitmask_mim_targets_are_the_other_branch(mask_ratio):
    sm = make_splitmask(vocab=16)
    with torch.no_grad():  # a large-weight head: well separated logits, so argmax is deterministic
        sm.head.weight.mul_(200.0)
        sm.head.bias.copy_(torch.randn(16))
    B, n, V = 3, 16, 16
    images, token_ids, visible = make_batch(B, n, V, mask_ratio=mask_ratio)
    k = visible.shape[-1]
    captured = {}
    sm.decoder_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o.detach()))
    with torch.no_grad():
        out = sm(images, token_ids, visible)
    h = captured["h"]
    assert h.shape == (2 * B, n, 192)
    # by hand: branch 0 (rows :B) saw visible[:, 0] and predicts the words at visible[:, 1]; branch 1 the reverse
    nll, hits, preds = [], [], torch.empty(2 * B, k, dtype=torch.long)
    for branch in range(2):
        for b in range(B):
            for j in range(k):
                p = int(visible[b, 1 - branch, j])
                logits = h[branch * B + b, p] @ sm.head.weight.T + sm.head.bias
                target = int(token_ids[b, p])
                nll.append(-torch.log_softmax(logits, -1)[target])
                preds[branch * B + b, j] = logits.argmax()
                hits.append(float(preds[branch * B + b, j] == target))
    torch.testing.assert_close(out["mim_loss"], torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out["pred_ids"], preds)
    torch.testing.assert_close(out["mim_acc"], torch.tensor(sum(hits) / len(hits)))
    # the descriptors: the mean of ALL decoder outputs of a branch (after the final norm)
    torch.testing.assert_close(out["nce_loss"], naive_info_nce(h[:B].mean(1), h[B:].mean(1), 0.2), rtol=1e-5, atol=1e-6)
    # Make every target the word the OTHER branch predicts there: accuracy must become exactly 1.
    # (The decoder does not depend on the token ids, so the predictions stay the same.)
    ids = token_ids.clone()
    for branch in range(2):
        for b in range(B):
            for j in range(k):
                ids[b, int(visible[b, 1 - branch, j])] = preds[branch * B + b, j]
    with torch.no_grad():
        assert sm(images, ids, visible)["mim_acc"].item() == 1.0


def test_splitmask_order_inside_a_subset_does_not_matter():
    sm = make_splitmask()
    images, token_ids, visible = make_batch(3, 16, 16, seed=5)
    gen = torch.Generator().manual_seed(7)
    perms = torch.stack([torch.stack([torch.randperm(8, generator=gen) for _ in range(2)]) for _ in range(3)])
    shuffled = torch.gather(visible, 2, perms)
    assert not torch.equal(shuffled, visible)
    with torch.no_grad():
        out, out_shuffled = sm(images, token_ids, visible), sm(images, token_ids, shuffled)
        swapped = sm(images, token_ids, visible.flip(1))  # A <-> B: the symmetric loss is unchanged
    for key in ("loss", "mim_loss", "nce_loss", "mim_acc"):
        torch.testing.assert_close(out_shuffled[key], out[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(swapped[key], out[key], rtol=1e-5, atol=1e-5)
    # predictions follow their positions: order the shuffled ones back (target position of branch 0 is subset 1)
    target_perm = torch.cat([perms[:, 1], perms[:, 0]])
    unshuffled = torch.empty_like(out_shuffled["pred_ids"]).scatter_(1, target_perm, out_shuffled["pred_ids"])
    assert torch.equal(unshuffled, out["pred_ids"])


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75])
def test_splitmask_encoder_and_decoder_inputs(mask_ratio):
    sm = make_splitmask()
    B, n = 3, 16
    images, token_ids, visible = make_batch(B, n, 16, mask_ratio=mask_ratio)
    k = visible.shape[-1]
    seen = {}
    sm.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    sm.encoder.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o.detach()))
    sm.decoder[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].detach()))
    with torch.no_grad():
        sm(images, token_ids, visible)
        x = sm.encoder.patchify(images) + sm.encoder.pos_embed
        filler = sm.mask_embed[0, 0] + sm.encoder.pos_embed[0]
    # the encoder gets 2B sequences of only the k visible tokens (patch + position), no mask token
    assert seen["x"].shape == (2 * B, k, 192) and seen["z"].shape == (2 * B, k, 192)
    # the decoder gets full-length sequences: the branch's encoder outputs where it looked, the mask
    # embedding + the position embedding everywhere else
    assert seen["h"].shape == (2 * B, n, 192)
    for branch in range(2):
        for b in range(B):
            row = branch * B + b
            own = [int(p) for p in visible[b, branch]]
            torch.testing.assert_close(seen["x"][row], torch.stack([x[b, p] for p in own]))
            for p in range(n):
                expected = seen["z"][row, own.index(p)] if p in own else filler[p]
                torch.testing.assert_close(seen["h"][row, p], expected)


# -----------------------------------------------------------------------------
# BEiT


def test_beit_forward():
    torch.manual_seed(0)
    beit = BEiT(ViT("tiny", 16, 4), 16)
    with torch.no_grad():
        beit.head.weight.mul_(50.0)
    B, n, m = 3, 16, 6
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 16, 16, generator=gen)
    token_ids = torch.randint(0, 16, (B, n), generator=gen)
    masked = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(B)])
    captured = {}
    beit.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    beit.encoder.norm.register_forward_hook(lambda mod, i, o: captured.__setitem__("z", o.detach()))
    out = beit(images, token_ids, masked)
    assert torch.isfinite(out["loss"]) and out["pred_ids"].shape == (B, m)
    assert 0.0 <= out["mim_acc"].item() <= 1.0 and out["nce_loss"].item() == 0.0
    x, z = captured["x"], captured["z"]
    assert x.shape == (B, n, 192)  # the encoder sees all n positions
    with torch.no_grad():
        patches = beit.encoder.patchify(images)
        pos, mask_token = beit.encoder.pos_embed[0], beit.mask_token[0, 0]
    nll, preds = [], torch.empty(B, m, dtype=torch.long)
    for b in range(B):
        masked_set = set(masked[b].tolist())
        for p in range(n):
            expected = mask_token + pos[p] if p in masked_set else patches[b, p] + pos[p]
            torch.testing.assert_close(x[b, p], expected)
        for j, p in enumerate(masked[b].tolist()):
            logits = z[b, p] @ beit.head.weight.T + beit.head.bias
            nll.append(-torch.log_softmax(logits, -1)[token_ids[b, p]])
            preds[b, j] = logits.argmax()
    torch.testing.assert_close(out["loss"].detach(), torch.stack(nll).mean().detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out["pred_ids"], preds)
    torch.testing.assert_close(out["mim_acc"], (preds == torch.gather(token_ids, 1, masked)).float().mean())
    out["loss"].backward()
    assert beit.mask_token.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# Optimiser groups


@pytest.mark.parametrize("which", ["splitmask", "beit"])
def test_param_groups(which):
    torch.manual_seed(0)
    enc = ViT("tiny", 16, 4, layer_scale=0.1)
    net = SplitMask(enc, 16) if which == "splitmask" else BEiT(enc, 16)
    net.encoder.blocks[3].mlp[0].weight.requires_grad_(False)  # a frozen parameter goes nowhere
    # Expected, from the module types: only Linear/Conv weights decay.
    expected_decay, expected_none = set(), set()
    for module in net.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d)) and pname == "weight":
                expected_decay.add(id(p))
            else:  # biases, LayerNorm weights, gamma, pos_embed, mask_embed / mask_token
                expected_none.add(id(p))
    names = {id(p): n for n, p in net.named_parameters()}
    assert any("gamma" in names[i] for i in expected_none) and any("pos_embed" in names[i] for i in expected_none)
    assert any("mask" in names[i] for i in expected_none)
    groups = param_groups(net, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert set(ids) == trainable
    by_wd = {}
    for g in groups:
        by_wd.setdefault(g["weight_decay"], set()).update(id(p) for p in g["params"])
    assert by_wd[0.05] == expected_decay, [names[i] for i in by_wd[0.05] ^ expected_decay]
    assert by_wd[0.0] == expected_none, [names[i] for i in by_wd[0.0] ^ expected_none]
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


# -----------------------------------------------------------------------------
# FLOPs


def measured_training_flops(net, *inputs):
    """Forward + backward FLOPs counted by PyTorch (matmuls, convolutions, attention as bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(*inputs)["loss"].backward()
    return counter.get_total_flops()


# The formula and the counter agree to well under 0.1% here; 2% leaves room only for work neither
# counts the same way (the patch embedding's unneeded input gradient). Two regimes: a vocabulary of
# 8192 makes the head about a fifth of the total (it must be counted right, and only when used);
# patch 2 (n = 256) makes attention about a sixth (sequence lengths must be right).
FLOP_CASES = [(4, 8192, 0.5, 1.0), (4, 8192, 0.75, 1.0), (4, 8192, 0.5, 0.0), (2, 16, 0.5, 1.0), (2, 16, 0.75, 1.0)]


@pytest.mark.parametrize("patch, vocab, mask_ratio, mim_weight", FLOP_CASES)
def test_splitmask_flops_match_counter(patch, vocab, mask_ratio, mim_weight):
    sm = make_splitmask(img=32, patch=patch, vocab=vocab, mim_weight=mim_weight)
    n = sm.encoder.num_patches
    images, token_ids, visible = make_batch(1, n, vocab, img=32, mask_ratio=mask_ratio)
    measured = measured_training_flops(sm, images, token_ids, visible)
    assert sm.flops_per_image(mask_ratio) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("patch, vocab", [(4, 8192), (2, 16)])
def test_beit_flops_match_counter(patch, vocab):
    torch.manual_seed(0)
    beit = BEiT(ViT("tiny", 32, patch), vocab)
    n = beit.encoder.num_patches
    gen = torch.Generator().manual_seed(0)
    masked = torch.randperm(n, generator=gen)[: round(0.4 * n)][None]
    inputs = (torch.randn(1, 3, 32, 32), torch.randint(0, vocab, (1, n)), masked)
    assert beit.flops_per_image(0.4) == pytest.approx(measured_training_flops(beit, *inputs), rel=0.02)


def test_splitmask_beit_flop_ratio_vit_small(monkeypatch):
    sm = on_meta(lambda: SplitMask(ViT("small", 224, 16), 8192), monkeypatch)
    beit = on_meta(lambda: BEiT(ViT("small", 224, 16), 8192), monkeypatch)
    ratio = sm.flops_per_image(0.5) / beit.flops_per_image(0.4)
    assert 1.2 < ratio < 1.5
