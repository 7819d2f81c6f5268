"""
Weights out to, and in from, the key layout of timm's VisionTransformer (vit_small_patch16_224 style),
the layout detection and segmentation codebases (detectron2 ViTDet, mmdet, mmseg) load.

    python export.py --ckpt=out/pretrain/ckpt.pt --out=out/vit_timm.pth         # ours -> timm keys
    python export.py --ckpt=vit_small_patch16_224.pth --out=out/ckpt.pt --to=ours  # timm keys -> ours

Our ViT has no class token (everything mean-pools), so the export adds a zero `cls_token` and a zero
first row of `pos_embed` [1, 1 + n, D], as a standard timm checkpoint has; import drops them. A
fine-tuned classifier's pooled norm and head go to `fc_norm` and `head` (timm's global_pool='avg'
names; timm builds `norm` or `fc_norm`, never both, so it loads the backbone of such a file, not
the whole classifier). qkv is packed as [3 * D, D] with (q, k, v) x heads order in both, so it
copies unchanged. Layer-scale gains are folded into the layers they scale
(gamma * (W x + b) = (gamma W) x + gamma b), because timm's vit_*_patch16_224, ViTDet and mmseg
have no layer scale and drop unknown keys silently; the import takes `ls1.gamma`/`ls2.gamma` when a
checkpoint has them (DeiT-3 style) and `load_encoder` fills missing gains with ones. No timm import
is needed either way.
"""
import math
import os

import torch

import common
from model import VIT_SIZES

config = dict(
    ckpt="",  # the file to convert: a pretrain.py or finetune.py checkpoint, or (--to=ours) a timm-layout state dict
    out="",  # where to write the converted file
    to="timm",  # timm (ours -> timm keys) | ours (timm keys -> a checkpoint that --init reads)
    cls_token=True,  # timm export: add a zero class token (False: for timm's class_token=False models)
)

# our name -> timm name, per block (the rest of the name is kept: .weight / .bias)
BLOCK_NAMES = {"gamma1": "ls1.gamma", "gamma2": "ls2.gamma", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
SCALED_BY = {"gamma1": "attn.proj", "gamma2": "mlp.2"}  # the layer whose output each gain multiplies
TOP_NAMES = {"encoder.patch_embed": "patch_embed.proj", "encoder.norm": "norm", "fc_norm": "fc_norm", "head": "head"}


def rename(name, table):
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def to_timm(state, cls_token=True):
    """Our Classifier / SplitMask / BEiT state dict -> timm VisionTransformer keys: the encoder, plus
    a fine-tuned classifier's fc_norm and head; pre-training decoders and vocabulary heads are dropped."""
    out = {}
    for name, value in state.items():
        if name == "encoder.pos_embed" and not cls_token:
            out["pos_embed"] = value
        elif name == "encoder.pos_embed":
            out["pos_embed"] = torch.cat([value.new_zeros(1, 1, value.shape[2]), value], 1)  # the class slot
            out["cls_token"] = value.new_zeros(1, 1, value.shape[2])
        elif name.startswith("encoder.blocks.") and not name.endswith(("gamma1", "gamma2")):
            _, _, i, rest = name.split(".", 3)
            for gain, layer in SCALED_BY.items():
                gamma = state.get(f"encoder.blocks.{i}.{gain}")
                if gamma is not None and rest.startswith(layer + "."):  # weight [D, in] or bias [D]
                    value = value * (gamma[:, None] if value.dim() == 2 else gamma)
            out[f"blocks.{i}.{rename(rest, BLOCK_NAMES)}"] = value
        elif name.startswith(("encoder.patch_embed", "encoder.norm")) or (
                name.split(".")[0] in ("fc_norm", "head") and "fc_norm.weight" in state):  # a classifier's head
            out[rename(name, TOP_NAMES)] = value
    return out


def from_timm(state):
    """timm VisionTransformer keys -> our keys (ViT under `encoder.`, plus fc_norm / head if present)."""
    out = {}
    inverse_block = {v: k for k, v in BLOCK_NAMES.items()}
    inverse_top = {v: k for k, v in TOP_NAMES.items()}
    for name, value in state.items():
        if name == "pos_embed":  # drop the class (and register) token slots if any: patches fill a square
            out["encoder.pos_embed"] = value[:, value.shape[1] - math.isqrt(value.shape[1]) ** 2:]
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            out[f"encoder.blocks.{i}.{rename(rest, inverse_block)}"] = value
        elif name != "cls_token":
            out[rename(name, inverse_top)] = value
    return out


def architecture(state):
    """The config a converted timm file needs to be self-describing: model size, patch and image size."""
    dim, patch = state["encoder.patch_embed.weight"].shape[0], state["encoder.patch_embed.weight"].shape[-1]
    depth = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.blocks."))
    model = next((name for name, size in VIT_SIZES.items() if size[:2] == (dim, depth)), None)
    if model is None:
        common.fail(f"{dim} wide and {depth} deep is none of our ViT sizes ({', '.join(VIT_SIZES)})")
    return dict(model=model, patch_size=patch, img_size=math.isqrt(state["encoder.pos_embed"].shape[1]) * patch)


def main():
    cfg, _ = common.configure(config, __doc__, __file__, choices=dict(to=("timm", "ours")))
    if not cfg["ckpt"] or not cfg["out"]:
        common.fail("give --ckpt=<file> and --out=<file> (and --to=ours to import a timm file)")
    if cfg["to"] == "timm":
        state = common.load(cfg["ckpt"])["model"]
        result = to_timm(state, cls_token=cfg["cls_token"])
    else:
        try:
            state = torch.load(cfg["ckpt"], map_location="cpu", weights_only=True)
        except Exception as e:
            common.fail(f"cannot read {cfg['ckpt']}: {type(e).__name__}")
        state = from_timm(state.get("model", state.get("state_dict", state)))  # plain, or wrapped as many codebases do
        result = dict(model=state, config=dict(architecture(state), source=os.path.abspath(cfg["ckpt"])))
    os.makedirs(os.path.dirname(cfg["out"]) or ".", exist_ok=True)
    common.save(cfg["out"], result)
    print(f"wrote {cfg['out']} ({len(result if cfg['to'] == 'timm' else result['model'])} tensors)")


if __name__ == "__main__":
    main()
