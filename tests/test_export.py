"""export.py: our weights in timm's VisionTransformer layout and back, checked against a written table."""
import pytest
import torch

from export import from_timm, to_timm
from model import Classifier, ViT, load_encoder

# timm's vit_tiny_patch16_224 (D=192, 12 blocks, 14x14 patches, layer scale on): name -> shape
D = 192
TIMM_LAYOUT = {
    "cls_token": (1, 1, D), "pos_embed": (1, 197, D),
    "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
    **{f"blocks.{i}.{name}": shape for i in range(12) for name, shape in {
        "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,), "norm2.weight": (D,),
        "norm2.bias": (D,), "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D),
        "mlp.fc2.bias": (D,), "ls2.gamma": (D,)}.items()},
    "norm.weight": (D,), "norm.bias": (D,), "fc_norm.weight": (D,), "fc_norm.bias": (D,),
    "head.weight": (10, D), "head.bias": (10,),
}


def trained_like(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # no zero or constant tensors, so a mix-up would show
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_export_matches_timm_layout():
    exported = to_timm(trained_like(Classifier(ViT("tiny", 224, 16, layer_scale=0.1), 10)).state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == TIMM_LAYOUT
    assert exported["cls_token"].abs().sum() == 0 and exported["pos_embed"][:, 0].abs().sum() == 0


@pytest.mark.parametrize("cls_token", [True, False])
def test_round_trip_gives_identical_outputs(cls_token):
    model = trained_like(Classifier(ViT("tiny", 32, 4, layer_scale=0.1), 10))
    exported = to_timm(model.state_dict(), cls_token)
    assert exported["pos_embed"].shape == (1, 64 + cls_token, 192) and ("cls_token" in exported) == cls_token
    back = Classifier(ViT("tiny", 32, 4, layer_scale=0.1), 10).eval()
    back.load_state_dict(from_timm(exported))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(images), model(images))


def test_pretraining_checkpoint_exports_only_the_encoder():
    from model import SplitMask
    net = SplitMask(trained_like(ViT("tiny", 32, 4)), 16)
    exported = to_timm(net.state_dict())
    assert not any(k.startswith(("decoder", "mask", "head", "encoder")) for k in exported)
    encoder = ViT("tiny", 32, 4).eval()
    load_encoder(encoder, from_timm(exported))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(encoder(images), net.encoder.eval()(images))
