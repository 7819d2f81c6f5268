"""export.py: our weights in timm's VisionTransformer layout and back, checked against a written table."""
import os

import pytest
import torch

from export import from_timm, to_timm
from model import BEiT, Classifier, SplitMask, ViT, load_encoder
from test_pretrain import ROOT, run

# timm's vit_tiny_patch16_224 (D=192, 12 blocks, 14x14 patches, no layer scale), with a 10-class head
D = 192
TIMM_LAYOUT = {
    "cls_token": (1, 1, D), "pos_embed": (1, 197, D),
    "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
    **{f"blocks.{i}.{name}": shape for i in range(12) for name, shape in {
        "norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
        "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)}.items()},
    "norm.weight": (D,), "norm.bias": (D,), "head.weight": (10, D), "head.bias": (10,),
}
BACKBONE = {k: v for k, v in TIMM_LAYOUT.items() if not k.startswith("head")}  # what ViTDet / mmseg load


def trained_like(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # no zero or constant tensors, so a mix-up would show
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_export_matches_timm_layout():
    pretrained = to_timm(SplitMask(trained_like(ViT("tiny", 224, 16, layer_scale=0.1)), 16).state_dict(), True)
    assert shapes(pretrained) == BACKBONE  # layer scale folded away, decoder and word head dropped
    assert pretrained["cls_token"].abs().sum() == 0 and pretrained["pos_embed"][:, 0].abs().sum() == 0
    finetuned = to_timm(trained_like(Classifier(ViT("tiny", 224, 16, layer_scale=0.1), 10)).state_dict(), True)
    assert shapes(finetuned) == TIMM_LAYOUT
    assert shapes(to_timm(BEiT(ViT("tiny", 224, 16), 16).state_dict(), True)) == BACKBONE  # its word head dropped


def import_into(model, timm_state):
    """What finetune.py --init does with an imported file, plus the classifier's own head."""
    state = from_timm(timm_state)
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.endswith(("gamma1", "gamma2")) for k in missing), missing
    load_encoder(model.encoder, state)  # gains the file does not have become 1
    return model.eval()


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("layer_scale", [0.0, 0.1])
def test_round_trip_gives_identical_outputs(cls_token, layer_scale):
    model = trained_like(Classifier(ViT("tiny", 32, 4, layer_scale=layer_scale), 10))
    exported = to_timm(model.state_dict(), cls_token)
    assert exported["pos_embed"].shape == (1, 64 + cls_token, 192) and ("cls_token" in exported) == cls_token
    back = import_into(Classifier(ViT("tiny", 32, 4, layer_scale=layer_scale), 10), exported)
    images = torch.randn(2, 3, 32, 32)
    if layer_scale == 0:
        assert torch.equal(back(images), model(images))
    else:  # gamma folded into the weights: equal up to fp32 rounding of one product
        torch.testing.assert_close(back(images), model(images), rtol=1e-5, atol=1e-6)
        assert not torch.equal(back.encoder.blocks[0].attn.proj.weight, model.encoder.blocks[0].attn.proj.weight)


def test_import_reads_layer_scale_and_position_layouts_of_other_vits():
    """DeiT-3 style timm files: ls*.gamma keys, and pos_embed without the class slot next to a cls_token."""
    model = trained_like(Classifier(ViT("tiny", 32, 4, layer_scale=0.1), 10))
    unscaled = {k: v for k, v in model.state_dict().items() if not k.endswith(("gamma1", "gamma2"))}
    timm_state = to_timm(unscaled, cls_token=False)  # nothing folded: the gains travel as their own keys
    timm_state["cls_token"] = torch.zeros(1, 1, 192)
    for i, block in enumerate(model.encoder.blocks):
        timm_state[f"blocks.{i}.ls1.gamma"], timm_state[f"blocks.{i}.ls2.gamma"] = block.gamma1, block.gamma2
    back = Classifier(ViT("tiny", 32, 4, layer_scale=0.1), 10).eval()
    back.load_state_dict(from_timm(timm_state))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(images), model(images))


def test_pretraining_checkpoint_exports_only_the_encoder():
    net = SplitMask(trained_like(ViT("tiny", 32, 4)), 16)
    exported = to_timm(net.state_dict(), cls_token=True)
    assert not any(k.startswith(("decoder", "mask", "head", "encoder")) for k in exported)
    encoder = ViT("tiny", 32, 4).eval()
    load_encoder(encoder, from_timm(exported))  # gains folded on the way out, set to 1 on the way in
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(images), net.encoder.eval()(images), rtol=1e-5, atol=1e-6)


def test_encoder_without_layer_scale_loads_into_one_with_it():
    """A --layer_scale=0 pre-training run fine-tunes and probes (their encoders have gains): gain 1 is exact."""
    plain = trained_like(ViT("tiny", 32, 4, layer_scale=0.0))
    scaled = ViT("tiny", 32, 4, layer_scale=0.1).eval()
    load_encoder(scaled, {f"encoder.{k}": v for k, v in plain.state_dict().items()})
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(scaled(images), plain(images))


# ----------------------------------------------------------------------------- in timm itself (a test requirement)

def exported(tmp_path, model, config):
    """A checkpoint of model as our scripts write one, exported by export.py: the timm construction it prints."""
    torch.save(dict(model=model.state_dict(), config=config), tmp_path / "ckpt.pt")
    os.makedirs(tmp_path / "out", exist_ok=True)
    result = run("export.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'out' / 'vit_timm.pth'}")
    return result.stdout.split("\n\n")[2]


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_the_printed_timm_model_loads_strictly_and_computes_ours(tmp_path, fine_tuned):
    """Features of a pre-training checkpoint, logits of a fine-tuned one: timm's numbers are ours, to 1e-5."""
    encoder = trained_like(ViT("tiny", 32, 4, layer_scale=0.1))
    ours = trained_like(Classifier(encoder, 10)) if fine_tuned else trained_like(SplitMask(encoder, 16))
    code = exported(tmp_path, ours, dict(model="tiny", img_size=32, patch_size=4))
    assert ("num_classes=10" if fine_tuned else "num_classes=0") in code
    namespace = {}
    exec(code, namespace)  # load_state_dict is strict by default: a missing or extra key raises
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = ours(images) if fine_tuned else ours.encoder(images).mean(1)
        torch.testing.assert_close(namespace["model"](images), expected, rtol=1e-5, atol=1e-5)


def test_the_readme_timm_snippet_runs_on_an_export_of_the_default_run(tmp_path, monkeypatch):
    """The README's lines, as written, on the export of a checkpoint of `make pretrain`'s architecture."""
    model = trained_like(SplitMask(ViT("tiny", 32, 4), 16))
    exported(tmp_path, model, dict(model="tiny", img_size=32, patch_size=4))
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = readme.split("## Export to timm", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.splitlines()) == 5 and "timm.models.VisionTransformer(img_size=32, patch_size=4" in snippet
    monkeypatch.chdir(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    namespace = {"images": images}
    exec(snippet, namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["features"], model.encoder(images).mean(1), rtol=1e-5, atol=1e-5)
