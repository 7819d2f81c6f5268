"""finetune.py and probe.py: what they compute (in process) and how they run (subprocesses)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
from finetune import mixing
from model import Classifier, ViT, param_groups
from features import extract_features, knn_accuracy, my_share
from probe import probe_blocks, train_linear_probes
from test_pretrain import ENV, ROOT, TINY, assert_same_weights, run, run_in_process, torchrun, wait_for_step, weights

SMALL_DATA = ["--num_images=64", "--img_size=16", "--patch_size=4", "--batch_size=16", "--workers=0", "--dtype=float32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={out}")
    return str(out / "ckpt.pt")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "top1" in row]


def test_finetune_from_pretraining_one_process(pretrained, tmp_path):
    result = run("finetune.py", *SMALL_DATA, "--epochs=2", f"--init={pretrained}", f"--out_dir={tmp_path}")
    rows = read_log(str(tmp_path))
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in rows)
    assert os.path.exists(tmp_path / "best.pt") and "best val top-1" in result.stdout
    # the encoder really came from the checkpoint: block 0 moved little from it in 2 epochs at low lr
    start = torch.load(pretrained, weights_only=True)["model"]["encoder.blocks.0.attn.qkv.weight"]
    tuned = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["encoder.blocks.0.attn.qkv.weight"]
    fresh = ViT("tiny", 16, 4).blocks[0].attn.qkv.weight
    assert (tuned - start).norm() < 0.1 * (fresh - start).norm()


def test_finetune_two_processes_match_one_process(pretrained, tmp_path):
    """The same global batch over 2 processes: with no randomness drawn per batch (MixUp, CutMix, drop path off;
    augmentation is drawn per image), the runs differ only by float rounding."""
    flags = [*SMALL_DATA, "--epochs=1", "--mixup=0", "--cutmix=0", "--drop_path=0", f"--init={pretrained}"]
    run("finetune.py", *flags, f"--out_dir={tmp_path / 'one'}")
    result = torchrun(2, "finetune.py", *flags, f"--out_dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (one,), (two,) = read_log(str(tmp_path / "one")), read_log(str(tmp_path / "two"))
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-4) and one["top1"] == two["top1"]
    for key, value in weights(str(tmp_path / "one")).items():
        torch.testing.assert_close(weights(str(tmp_path / "two"))[key], value, rtol=1e-4, atol=1e-5)


def test_finetune_preempted_mid_epoch_resumes_bit_exact(pretrained, tmp_path):
    flags = [*SMALL_DATA, "--epochs=2", "--log_every=1", f"--init={pretrained}"]
    run("finetune.py", *flags, f"--out_dir={tmp_path / 'reference'}")
    out = str(tmp_path / "preempted")
    process = subprocess.Popen([sys.executable, "finetune.py", *flags, f"--out_dir={out}"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(process, out, 2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stop signal" in output, output
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 2 <= saved < 8
    result = run("finetune.py", *flags, f"--out_dir={out}")
    assert f"at step {saved}" in result.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert_same_weights(weights(out), weights(str(tmp_path / "reference")))
    # a relaunch with other settings is refused, naming them, unless asked for
    result = run("finetune.py", *flags, "--label_smoothing=0.2", f"--out_dir={out}", check=False)
    assert result.returncode != 0 and "'label_smoothing'" in result.stderr and "--override_config=True" in result.stderr


def test_finetune_refuses_a_checkpoint_of_another_model(monkeypatch, capsys, pretrained, tmp_path):
    import finetune
    code, _, err = run_in_process(monkeypatch, capsys, finetune.main, *SMALL_DATA, "--model=small",
                                  f"--init={pretrained}", f"--out_dir={tmp_path}")
    assert code != 0 and "does not fit" in err and "--model" in err


def test_layer_decay_table():
    # ViT-tiny has 12 blocks: embeddings are layer 0, block i is layer i+1, the rest layer 13.
    model = Classifier(ViT("tiny", 16, 4), num_classes=3)
    decay = 0.5
    expected = {"encoder.patch_embed.weight": decay**13, "encoder.patch_embed.bias": decay**13,
                "encoder.pos_embed": decay**13, "encoder.blocks.0.attn.qkv.weight": decay**12,
                "encoder.blocks.0.norm1.weight": decay**12, "encoder.blocks.5.mlp.0.bias": decay**7,
                "encoder.blocks.11.attn.proj.weight": decay**1, "encoder.norm.weight": 1.0,
                "head.weight": 1.0, "head.bias": 1.0}
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, decay) for p in g["params"]}
    assert len(scale) == len(names)
    for name, value in expected.items():
        assert scale[name] == pytest.approx(value), name


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixed_targets_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    mixed, targets = mixing(mixup, cutmix, 5)(images, labels)
    assert targets.shape == (8, 5) and mixed.shape == images.shape
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).any()  # something was mixed
    assert mixing(0.0, 0.0, 5) is None


def test_probe_features_are_the_mean_pooled_blocks():
    torch.manual_seed(0)
    encoder = ViT("tiny", 16, 4).eval()
    dataset = data.Augmented(data.SyntheticShapes(10, 16), data.eval_transform(16))
    cpu = torch.device("cpu")
    features, labels = extract_features(encoder, my_share(dataset, 4, 0, cpu), 10, range(12), cpu, cpu)
    images = torch.stack([dataset[i][0] for i in range(10)])
    with torch.no_grad():
        layers = encoder(images, all_layers=True)
    assert features.shape == (10, 12, 192) and labels.tolist() == dataset.dataset.targets
    assert features.dtype == torch.float16  # half the memory of float32
    for i, h in enumerate(layers):
        torch.testing.assert_close(features[:, i].float(), h.mean(1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(features[:, -1].float(), encoder(images).mean(1), rtol=1e-3, atol=1e-3)  # after the norm
    some, _ = extract_features(encoder, my_share(dataset, 4, 0, cpu), 10, [11, 5], cpu, cpu)
    assert torch.equal(some, features[:, [11, 5]])  # --blocks=12,6


def test_probes_a_few_blocks_at_a_time_give_what_all_at_once_give():
    """Where the features do not fit on the GPU, the probes take them a few blocks at a time."""
    torch.manual_seed(0)
    train_y, val_y = torch.arange(120) % 3, torch.arange(60) % 3
    train_x, val_x = torch.randn(120, 4, 8).half(), torch.randn(60, 4, 8).half()
    train_x[:, 2, :3] += 5 * F.one_hot(train_y, 3).half()  # block 3 carries the label
    val_x[:, 2, :3] += 5 * F.one_hot(val_y, 3).half()
    cfg = dict(probe_epochs=20, probe_lr=1e-2, batch_size=32, seed=0, knn_k=5, knn_temperature=0.07)
    cpu = torch.device("cpu")
    linear, knn = probe_blocks((train_x, train_y), (val_x, val_y), 3, cfg, cpu, at_once=4)
    assert linear[2] > 90 and knn[2] > 90 and max(linear[:2] + linear[3:]) < 70
    for at_once in (1, 3):
        lin, nn_ = probe_blocks((train_x, train_y), (val_x, val_y), 3, cfg, cpu, at_once)
        assert nn_ == knn and lin == pytest.approx(linear, abs=100 / 60 + 1e-6)  # within one validation image


def test_probe_says_where_the_features_go_and_stops_when_they_cannot_fit(monkeypatch, capsys, pretrained, tmp_path):
    import probe
    flags = [f"--init={pretrained}", "--num_images=32", "--workers=0", "--probe_epochs=2"]
    result = run("probe.py", *flags, "--blocks=12", f"--out_dir={tmp_path / 'last'}")
    assert "features: 532 images x 1 block x 192 in float16 = 0.000204 GB, in host memory" in result.stdout
    results = json.loads((tmp_path / "last" / "results.json").read_text())
    assert results["blocks"] == [12] and len(results["linear"]) == 1 and results["best_layer"] == 12
    monkeypatch.setattr(probe, "host_memory", lambda: 100_000)  # bytes: less than 12 blocks' features need
    code, out, err = run_in_process(monkeypatch, capsys, probe.main, *flags, f"--out_dir={tmp_path / 'all'}")
    assert code == 1 and "the features do not fit in the 0.0001 GB the host has free" in err, err
    assert "--blocks=12 (the last)" in err
    assert "12 blocks x 192 in float16 = 0.00245 GB" in out and not (tmp_path / "all" / "features.pt").exists()
    code, _, err = run_in_process(monkeypatch, capsys, probe.main, *flags, "--blocks=13")
    assert code == 1 and "--blocks=13: all, or numbers from 1 to 12" in err


def test_probe_features_under_torchrun_equal_one_process(pretrained, tmp_path):
    """Two processes each encode half of the images; rank 0 gathers them and alone trains the probes."""
    flags = [f"--init={pretrained}", "--num_images=30", "--workers=0", "--probe_epochs=2", "--batch_size=8"]
    run("probe.py", *flags, f"--out_dir={tmp_path / 'one'}")
    result = torchrun(2, "probe.py", *flags, f"--out_dir={tmp_path / 'two'}")
    assert result.returncode == 0 and result.stdout.count("best linear probe") == 1, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "features.pt", weights_only=True) for name in ("one", "two"))
    for split in ("train", "val"):
        assert torch.equal(one[split], two[split]) and torch.equal(one[f"{split}_labels"], two[f"{split}_labels"])
    assert json.loads((tmp_path / "one" / "results.json").read_text())["linear"] == \
        json.loads((tmp_path / "two" / "results.json").read_text())["linear"]


def test_knn_on_separable_features_is_perfect():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 32), dim=1)
    train_y, test_y = torch.arange(100) % 5, torch.arange(50) % 5
    train_x = centres[train_y] + 0.05 * torch.randn(100, 32)
    test_x = centres[test_y] + 0.05 * torch.randn(50, 32)
    assert knn_accuracy(train_x, train_y, test_x, test_y, 5) == 100.0
    assert knn_accuracy(train_x, train_y[torch.randperm(100)], test_x, test_y, 5) < 60  # labels matter


def test_linear_probes_learn_each_layer_separately():
    torch.manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 3, 8)
    x[:, 1, :4] += 5 * F.one_hot(y, 4).float()  # only layer 2 carries the label
    probe = train_linear_probes(x[:150], y[:150], 4, epochs=50, lr=1e-2, batch_size=32, seed=0)
    accuracy = (probe(x[150:]) == y[150:, None]).float().mean(0)  # the predicted class at every layer
    assert accuracy[1] > 0.95 and accuracy[0] < 0.6 and accuracy[2] < 0.6


def test_pretraining_beats_random_init(tmp_path):
    # A few minutes of SplitMask on the built-in scenes, then the probes on frozen features: both the
    # best linear probe and k-NN must beat the same encoder at random init by a wide margin (measured
    # at 16 px: linear 59 vs 23, k-NN 64 vs 38; a broken pipeline stays near the random-init numbers;
    # half the images at half the batch shrink the linear margin to 13, so this is as small as it can be).
    scenes = ["--img_size=16", "--patch_size=4", "--num_images=1000", "--workers=0"]
    run("pretrain.py", *scenes, "--epochs=4", "--batch_size=64", "--vocab_size=64", "--tokenizer_samples=20000",
        "--min_block=2", f"--out_dir={tmp_path / 'pretrain'}")
    results = {}
    for name, init in (("random", ""), ("splitmask", str(tmp_path / "pretrain" / "ckpt.pt"))):
        run("probe.py", *scenes, "--probe_epochs=30", f"--init={init}", f"--out_dir={tmp_path / name}")
        with open(tmp_path / name / "results.json") as f:
            results[name] = json.load(f)
    print({name: (r["best_linear"], r["knn_last"]) for name, r in results.items()})
    assert results["splitmask"]["best_linear"] > results["random"]["best_linear"] + 15
    assert max(results["splitmask"]["knn"]) > max(results["random"]["knn"]) + 15


def test_report_collects_the_rows_of_an_experiment(tmp_path, capsys):
    from report import report

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    write(tmp_path / "random" / "probe" / "results.json", [dict(linear=[30.0, 31.0], knn=[25.0, 24.0], best_linear=31.0, best_layer=2)])
    write(tmp_path / "splitmask" / "probe" / "results.json", [dict(linear=[40.0, 38.0], knn=[33.0, 35.0], best_linear=40.0, best_layer=1)])
    # 10 steps of 64 images at 32 img/s, then 10 more at 64 img/s: 30 seconds of pre-training
    write(tmp_path / "splitmask" / "pretrain" / "log.jsonl", [dict(config=dict(batch_size=64)), dict(step=10, img_s=32.0), dict(step=20, img_s=64.0)])
    write(tmp_path / "splitmask" / "finetune" / "log.jsonl", [dict(config={}), dict(step=5, loss=1.0), dict(epoch=0, top1=50.0), dict(epoch=1, top1=55.5)])
    write(tmp_path / "beit" / "probe" / "results.json", [dict(linear=[36.0, 37.0], knn=[30.0, 30.0], best_linear=37.0, best_layer=2)])
    write(tmp_path / "beit" / "finetune" / "log.jsonl", [dict(config={}), dict(step=5, loss=1.0)])  # still in epoch 0
    (tmp_path / "not_a_run").mkdir()
    report(str(tmp_path))
    table = json.loads((tmp_path / "report.json").read_text())["table"]
    assert list(table) == ["beit", "random", "splitmask"]
    assert table["random"] == dict(knn=25.0, linear=31.0, best_layer=2, finetune=None, hours=0.0)
    assert table["beit"]["finetune"] is None
    assert table["splitmask"]["hours"] == pytest.approx(30 / 3600)
    assert (table["splitmask"]["knn"], table["splitmask"]["finetune"]) == (35.0, 55.5)
    assert "| splitmask | 0.01 | 35.0 | 40.0 (1) | 55.5 |" in capsys.readouterr().out
    assert (tmp_path / "probe_by_block.png").exists()
