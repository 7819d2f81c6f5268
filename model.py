"""SplitMask (El-Nouby et al., 2021) and its BEiT baseline, from scratch in one file: the ViT encoder, SplitMask
(split the patches in two, inpaint each half's visual words from the other, match the halves' descriptors with
InfoNCE), BEiT (mask tokens inside the encoder), and InfoNCE fused: tiled, fp32, negatives from all processes."""
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# name -> (width, depth, heads), as in Dosovitskiy et al. and DeiT.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}

# ------------------------------ The transformer
def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of some samples (and rescale the rest)."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], 1, 1).bernoulli_(1.0 - p) / (1.0 - p)  # a kept sample's branch is rescaled


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, fused
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block; layer scale (CaiT) multiplies each branch by a learned per-channel gain."""
    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0, layer_scale=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale > 0 else None
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale > 0 else None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        x = x + drop_path(a if self.gamma1 is None else a * self.gamma1, self.drop_path, self.training)
        m = self.mlp(self.norm2(x))
        return x + drop_path(m if self.gamma2 is None else m * self.gamma2, self.drop_path, self.training)


def init_weights(module):
    """ViT/BEiT init: truncated normal (std 0.02) for weights, embeddings and mask tokens; zero biases."""
    for name, p in module.named_parameters():
        if p.dim() > 1:
            nn.init.trunc_normal_(p, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def gather_tokens(x, index):  # x [B, n, D], index [B, k] -> the k tokens of each sequence named by index, [B, k, D]
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ViT(nn.Module):
    """ViT encoder: learned absolute position embeddings, no class token (every consumer here mean-pools)."""
    def __init__(self, size="small", img_size=224, patch_size=16, drop_path=0.0, layer_scale=0.1):
        super().__init__()
        assert img_size % patch_size == 0, (img_size, patch_size)
        self.dim, self.depth, self.heads = VIT_SIZES[size]
        self.img_size, self.patch_size, self.layer_scale = img_size, patch_size, layer_scale
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(3, self.dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, self.dim))
        rates = torch.linspace(0, drop_path, self.depth).tolist()  # deeper blocks are dropped more often
        self.blocks = nn.ModuleList(Block(self.dim, self.heads, 4.0, r, layer_scale) for r in rates)
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        init_weights(self)

    def patchify(self, images):
        """[B, 3, H, W] -> patch embeddings [B, n, D] in row-major grid order, positions not yet added."""
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def forward_tokens(self, x, all_layers=False):
        """Run the blocks and final norm on token sequences [B, k, D] (any k <= n)."""
        layers = []
        for block in self.blocks:
            layers.append(x := block(x))
        return [self.norm(h) for h in layers] if all_layers else self.norm(x)

    def forward(self, images, keep=None, all_layers=False):
        """Encode images; with keep [B, k] only those patches are encoded (MAE-style, no mask tokens)."""
        x = self.patchify(images) + self.pos_embed
        return self.forward_tokens(x if keep is None else gather_tokens(x, keep), all_layers)


def transformer_flops(tokens, seq_len, dim, depth):
    """Forward FLOPs of `depth` blocks on `tokens` tokens: 24*D^2 each in linear layers, 4*seq_len*D in attention."""
    return depth * tokens * (24 * dim * dim + 4 * seq_len * dim)


# ------------------------------ SplitMask: split, inpaint, match
class SplitMask(nn.Module):
    def __init__(self, encoder, vocab_size, decoder_depth=2, mim_weight=1.0, nce_weight=1.0, temperature=0.2):
        super().__init__()
        self.encoder = encoder
        self.mim_weight, self.nce_weight, self.temperature = mim_weight, nce_weight, temperature
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.decoder = nn.ModuleList(Block(encoder.dim, encoder.heads, 4.0, 0.0, encoder.layer_scale)
                                     for _ in range(decoder_depth))  # width = encoder width (paper, Sec. 3)
        self.decoder_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, vocab_size)
        for part in (self.decoder, self.head, self.decoder_norm):
            init_weights(part)
        nn.init.trunc_normal_(self.mask_embed, std=0.02)

    def forward(self, images, token_ids, visible):
        """images [N, 3, H, W], token_ids [N, n], visible [N, 2, k] (A's and B's patches) -> losses, MIM accuracy."""
        N = images.shape[0]
        # 1. Split, then encode each half with the shared encoder, as one batch of 2N sequences of k tokens: every
        #    image twice, A's patches kept in the first copy, B's in the second. No mask token enters the encoder.
        seen = torch.cat([visible[:, 0], visible[:, 1]])  # [2N, k]: rows :N are branch A, rows N: branch B
        z = self.encoder(torch.cat([images, images]), keep=seen)  # [2N, k, D]
        # 2. Inpaint: a canvas of the mask embedding plus each position's embedding; every encoder output goes back to
        #    its patch's position (MAE's ids_restore), canvas[i, seen[i, j]] = z[i, j]; the decoder runs over all n.
        canvas = (self.mask_embed + self.encoder.pos_embed).expand(2 * N, -1, -1)  # [2N, n, D]
        h = canvas.scatter(1, seen.unsqueeze(-1).expand_as(z), z.to(canvas.dtype))
        for block in self.decoder:
            h = block(h)
        h = self.decoder_norm(h)
        out = {"mim_loss": h.new_zeros(()), "nce_loss": h.new_zeros(()), "mim_acc": h.new_zeros(())}
        if self.mim_weight > 0:
            target_pos = torch.cat([visible[:, 1], visible[:, 0]])  # [2N, k]: A predicts the words of B, B those of A
            logits = self.head(gather_tokens(h, target_pos)).float()
            targets = torch.gather(token_ids.repeat(2, 1), 1, target_pos)
            out["mim_loss"] = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            out["pred_ids"] = logits.argmax(-1)  # [2N, k], for accuracy and pictures
            out["mim_acc"] = (out["pred_ids"] == targets).float().mean()
        if self.nce_weight > 0:
            # 3. Match: mean of ALL decoder outputs (seen and inpainted) is the branch's descriptor.
            descriptor = h.mean(1)
            out["nce_loss"] = info_nce(descriptor[:N], descriptor[N:], self.temperature)
        out["loss"] = self.mim_weight * out["mim_loss"] + self.nce_weight * out["nce_loss"]
        return out

    def flops_per_image(self, mask_ratio=0.5):
        """Training FLOPs per image (forward x 3), for MFU; each branch embeds the image, encodes k of its patches."""
        enc, n = self.encoder, self.encoder.num_patches
        k = round(n * (1 - mask_ratio))
        fwd = 2 * (2 * n) * 3 * enc.patch_size**2 * enc.dim + transformer_flops(2 * k, k, enc.dim, enc.depth)
        fwd += transformer_flops(2 * n, n, enc.dim, len(self.decoder))
        fwd += 2 * (2 * k) * enc.dim * self.head.out_features if self.mim_weight > 0 else 0
        return 3 * fwd


# ------------------------------ BEiT baseline (Bao et al., 2021): mask tokens inside the encoder, a linear head on top
class BEiT(nn.Module):
    def __init__(self, encoder, vocab_size):
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.head = nn.Linear(encoder.dim, vocab_size)
        init_weights(self.head)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, images, token_ids, masked):
        """masked [B, m]: indices of the masked patches. Same outputs as SplitMask.forward."""
        enc = self.encoder
        x = enc.patchify(images)
        is_masked = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, masked, True)
        x = torch.where(is_masked.unsqueeze(-1), self.mask_token.to(x.dtype), x) + enc.pos_embed
        logits = self.head(gather_tokens(enc.forward_tokens(x), masked)).float()
        targets = torch.gather(token_ids, 1, masked)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        pred_ids = logits.argmax(-1)
        return {"loss": loss, "mim_loss": loss.detach(), "nce_loss": loss.new_zeros(()), "pred_ids": pred_ids,
                "mim_acc": (pred_ids == targets).float().mean()}

    def flops_per_image(self, mask_ratio=0.4):
        enc, n = self.encoder, self.encoder.num_patches
        fwd = 2 * n * 3 * enc.patch_size**2 * enc.dim + transformer_flops(n, n, enc.dim, enc.depth)
        fwd += 2 * round(n * mask_ratio) * enc.dim * self.head.out_features
        return 3 * fwd


class Classifier(nn.Module):
    """Fine-tuning head: one linear layer on the mean of the encoder's (normalised) tokens, the features the probes
    read; timm's VisionTransformer(class_token=False, global_pool="avg", fc_norm=False) is the same network."""
    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # start near uniform predictions
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        return self.head(self.encoder(images).mean(1))


def load_encoder(encoder, state_dict):
    """Load the encoder part of a pre-training or fine-tuning state dict, resizing the position embedding if needed."""
    weights = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
    for name in encoder.state_dict():  # no layer scale in the checkpoint (timm, --layer_scale=0): gain 1
        if name.endswith(("gamma1", "gamma2")):
            weights.setdefault(name, torch.ones(encoder.dim))
    pos = weights["pos_embed"]
    if pos.shape[1] != encoder.num_patches:  # bicubic on the grid, as DeiT and BEiT do for other resolutions
        side = math.isqrt(pos.shape[1])  # checkpoints come from square images
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=encoder.grid, mode="bicubic", align_corners=False)
        weights["pos_embed"] = grid.permute(0, 2, 3, 1).reshape(1, encoder.num_patches, -1)
    encoder.load_state_dict(weights)


def encoder_weights(cfg, given, path):
    """A checkpoint describes its encoder: --model, --img_size, --patch_size come from it unless given; its weights."""
    saved = common.load(path)
    model, patch, size = (saved["config"][key] for key in ("model", "patch_size", "img_size"))
    cfg.update({k: v for k, v in dict(model=model, patch_size=patch, img_size=size).items() if k not in given})
    cfg["init_modified"] = time.ctime(os.path.getmtime(path))  # a resume refuses a checkpoint rewritten since
    if (cfg["model"], cfg["patch_size"]) != (model, patch):
        common.fail(f"--init={path} does not fit --model={cfg['model']} --patch_size={cfg['patch_size']}: it holds "
                    f"a ViT-{model}/{patch}; drop those flags (they come from the checkpoint)")
    if cfg["img_size"] != size:
        old, new = size // patch, cfg["img_size"] // patch
        common.print0(f"--img_size={new * patch}: the checkpoint was trained at {size} px; its position embeddings "
                      f"are resized from a {old}x{old} to a {new}^2 grid")
    return saved["model"]


def param_groups(model, weight_decay, layer_decay=1.0):
    """AdamW groups: no weight decay on biases, norms, gains, embeddings, tokens. layer_decay < 1 (fine-tuning, BEiT
    Sec. 2.6) scales the lr at depth i by layer_decay ** (L + 1 - i): 0 embeddings, b + 1 block b, L + 1 the rest."""
    depth, groups = model.encoder.depth, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "pos_embed" in name or "mask" in name
        layer = depth + 1
        if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                              "lr_scale": layer_decay ** (depth + 1 - layer)})["params"].append(p)
    return list(groups.values())


# ------------------------------ InfoNCE (Sec. 3, "match")
def info_nce_reference(xa, xb, temperature=0.2):
    """The definition, in plain PyTorch (one process); read this first. S = a @ b.T / t holds every pair's
    similarity, S_ii image i's positive: loss = 1/2 (mean_i [lse_j S_ij - S_ii] + mean_j [lse_i S_ij - S_jj]), lse
    the log-sum-exp. Its gradient: dL/dS = (softmax of each row + softmax of each column - 2 I) / 2N."""
    a, b = F.normalize(xa.float(), dim=-1), F.normalize(xb.float(), dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# The fused path: the same loss and gradient without holding S (N x N, 4 GB at N = 32768, kept twice by autograd).
# Forward keeps each row's and column's lse; backward makes S again a tile of rows at a time for the softmaxes.
# bench.py: less memory from N = 1024, less time only from N = 16384 (tiles cost 7-30% on a CPU below that).
def _tiled_lse(x, y, temperature, tile):
    """lse_j S_ij (rows) and lse_i S_ij (columns) of S = x @ y.T / t, one tile of rows of S alive at a time."""
    rows = torch.empty(x.shape[0], device=x.device)
    cols = torch.full((y.shape[0],), -math.inf, device=x.device)
    for start in range(0, x.shape[0], tile):
        s = (x[start : start + tile] @ y.T).div_(temperature)
        rows[start : start + tile] = s.logsumexp(1)
        cols = torch.logaddexp(cols, s.logsumexp(0))  # a column's lse, accumulated over the tiles of rows
    return rows, cols


def _tiled_softmax_grads(x, y, row_lse, col_lse, temperature, tile, scale):
    """dL/dx, dL/dy for L = scale * (sum of the row lse + sum of the column lse) of S = x @ y.T / t:
    dL/dS = scale * (row softmax + column softmax), and dS/dx = y / t, dS/dy = x / t (chain rule, tile by tile)."""
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    for start in range(0, x.shape[0], tile):
        s = (x[start : start + tile] @ y.T).div_(temperature)
        # softmax = exp(S - lse), in place where it can be: at most two tiles are alive
        p = (s - row_lse[start : start + tile, None]).exp_() if row_lse is not None else None
        if col_lse is not None:
            column_softmax = s.sub_(col_lse[None, :]).exp_()
            p = column_softmax if p is None else p.add_(column_softmax)
        p *= scale / temperature
        gx[start : start + tile] = p @ y
        gy += p.T @ x[start : start + tile]
    return gx, gy


class _FusedInfoNCE(torch.autograd.Function):
    """info_nce_reference of unit vectors a, b [N, D]; a_all, b_all [G, D]: the global batch's (None in one process).
    a->b takes this process's rows of S = a_all @ b_all.T / t, b->a its columns: their mean is the global loss."""
    @staticmethod
    def forward(ctx, a, b, a_all, b_all, temperature, tile):
        row_lse, col_lse = _tiled_lse(a, b if b_all is None else b_all, temperature, tile)  # lse_j S_ij
        if a_all is not None:  # several processes: this process's columns of S run over the gathered a
            _, col_lse = _tiled_lse(a_all, b, temperature, tile)  # lse_i S_ij
        positive = (a * b).sum(1) / temperature  # S_ii
        ctx.save_for_backward(a, b, a_all, b_all, row_lse, col_lse)
        ctx.temperature, ctx.tile = temperature, tile
        return 0.5 * ((row_lse - positive).mean() + (col_lse - positive).mean())

    @staticmethod
    def backward(ctx, grad):
        a, b, a_all, b_all, row_lse, col_lse = ctx.saved_tensors
        t, tile, scale = ctx.temperature, ctx.tile, grad / (2 * a.shape[0])  # the 1/2N of dL/dS
        if a_all is None:  # (backward runs outside autocast: the engine does not re-enter it)
            ga, gb = _tiled_softmax_grads(a, b, row_lse, col_lse, t, tile, scale)
            ga_all = gb_all = None
        else:  # rows against the gathered b, columns against the gathered a; _GatherWithGrad sums the rest
            ga, gb_all = _tiled_softmax_grads(a, b_all, row_lse, None, t, tile, scale)
            ga_all, gb = _tiled_softmax_grads(a_all, b, None, col_lse, t, tile, scale)
        ga -= 2 * scale * b / t  # the -2I of dL/dS: the positive S_ii = a_i.b_i / t, once per direction
        gb -= 2 * scale * a / t
        return ga, gb, ga_all, gb_all, None, None


class _GatherWithGrad(torch.autograd.Function):
    """[B, D] per process -> [world * B, D]. Every loss uses every slice: backward all-reduces, keeps this slice."""
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def info_nce(xa, xb, temperature=0.2, tile=None):
    """Symmetric InfoNCE of descriptors xa, xb [B, D] in fp32; negatives: the GLOBAL batch, gathered with gradients."""
    a, b = F.normalize(xa.float(), dim=-1), F.normalize(xb.float(), dim=-1)
    a_all = b_all = None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        a_all, b_all = _GatherWithGrad.apply(a), _GatherWithGrad.apply(b)
    tile = tile or max(1, 2**22 // len(b if b_all is None else b_all))  # 4M similarities (16 MB) per tile
    with torch.autocast(a.device.type, enabled=False):  # similarities and exps stay in fp32
        return _FusedInfoNCE.apply(a, b, a_all, b_all, temperature, tile)
