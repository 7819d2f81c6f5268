"""
Weights out to, and in from, the key layout of timm's VisionTransformer, which timm loads strictly and which
detection and segmentation codebases (detectron2 ViTDet, mmdet, mmseg) read.

    python export.py --ckpt=out/pretrain/ckpt.pt --out=out/vit_timm.pth         # ours -> timm: prints the model
    python export.py --ckpt=vit_small_patch16_224.pth --out=out/ckpt.pt --to=ours  # timm keys -> ours

Our ViT has no class token: it mean-pools its normalised tokens, which is timm's VisionTransformer with
class_token=False, global_pool="avg", fc_norm=False. The export prints that construction and the inputs it
expects; it gives our features (pre-training) or our logits (a fine-tuned classifier, with its head).
--cls_token=True adds a zero `cls_token` and class slot in `pos_embed`, for codebases that want one (in a
class_token=True timm model the zero token takes part in attention: other features); import drops them.
qkv is packed as [3 * D, D] with (q, k, v) x heads order in both, so it copies unchanged. Layer-scale gains
are folded into the layers they scale (gamma * (W x + b) = (gamma W) x + gamma b), because timm's
vit_*_patch16_224, ViTDet and mmseg have no layer scale and drop unknown keys silently; the import takes
`ls1.gamma`/`ls2.gamma` when a file has them (DeiT-3 style) and `load_encoder` fills missing gains with ones.
No timm import is needed either way.
"""
import math
import os

import torch

import common
from data import MEAN, STD
from model import VIT_SIZES

config = dict(
    ckpt="",  # the file to convert: a pretrain.py or finetune.py checkpoint, or (--to=ours) a timm-layout state dict
    out="",  # where to write the converted file
    to="timm",  # timm (ours -> timm keys) | ours (timm keys -> a checkpoint that --init reads)
    cls_token=False,  # timm export: add a zero class token, for codebases that expect one (not the same features)
)

# our name -> timm name, per block (the rest of the name is kept: .weight / .bias)
BLOCK_NAMES = {"gamma1": "ls1.gamma", "gamma2": "ls2.gamma", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
SCALED_BY = {"gamma1": "attn.proj", "gamma2": "mlp.2"}  # the layer whose output each gain multiplies
TOP_NAMES = {"encoder.patch_embed": "patch_embed.proj", "encoder.norm": "norm"}


def rename(name, table):
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def to_timm(state, cls_token=False):
    """Our Classifier / SplitMask / BEiT state dict -> timm VisionTransformer keys: the encoder, plus a fine-tuned
    classifier's head; pre-training decoders, mask tokens and vocabulary heads are dropped."""
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
        elif name.startswith(("encoder.patch_embed", "encoder.norm")):
            out[rename(name, TOP_NAMES)] = value
        elif name.startswith("head.") and not any(key.startswith("mask") for key in state):  # a classifier's head
            out[name] = value
    return out


def from_timm(state):
    """timm VisionTransformer keys -> our keys (ViT under `encoder.`; others, such as a head, as they are)."""
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


def timm_construction(config, path, num_classes, cls_token):
    """The Python that builds the exported network in timm and loads the file strictly."""
    dim, depth, heads = VIT_SIZES[config["model"]]
    return (f'import timm, torch\n'
            f'model = timm.models.VisionTransformer(img_size={config["img_size"]}, patch_size={config["patch_size"]}, '
            f'embed_dim={dim}, depth={depth}, num_heads={heads},\n'
            f'    class_token={cls_token}, global_pool="avg", fc_norm=False, num_classes={num_classes})\n'
            f'model.load_state_dict(torch.load("{path}"))  # strict: every key, every shape\n'
            f'model.eval()')


def main():
    cfg, _ = common.configure(config, __doc__, __file__, choices=dict(to=("timm", "ours")))
    if not cfg["ckpt"] or not cfg["out"]:
        common.fail("give --ckpt=<file> and --out=<file> (and --to=ours to import a timm file)")
    if cfg["to"] == "timm":
        saved = common.load(cfg["ckpt"])
        result = to_timm(saved["model"], cls_token=cfg["cls_token"])
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
    if cfg["to"] == "timm":
        size, classes = saved["config"]["img_size"], len(result["head.bias"]) if "head.bias" in result else 0
        gives = f"the logits of its {classes} classes" if classes else "the features probe.py reads at the last block"
        print(f"\nin timm (pip install timm), the same network{' with its head' if classes else ''}:\n\n"
              f"{timm_construction(saved['config'], cfg['out'], classes, cfg['cls_token'])}\n\n"
              f"model(images) gives {gives}" + (" (not quite: the zero class token takes part in attention)"
                                                if cfg["cls_token"] else "") + f". images: RGB [B, 3, {size}, {size}] "
              f"scaled to [0, 1], then normalised with mean {MEAN} and std {STD}; to evaluate, resize the short side "
              f"to {int(size / 0.875)} px (bicubic) and take the centre {size} px crop, as probe.py does.")

if __name__ == "__main__":
    main()
