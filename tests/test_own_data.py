"""A user's own photos, as a newcomer meets them: the next lines pasted as they are, timm, resume with other
settings, unreadable files, a stop during the vocabulary pass, folder mistakes, log files, pictures."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
from test_faults import write_bad_files, write_images
from test_pretrain import ENV, ROOT, TINY, log_rows, run, run_in_process


def photos(root, classes=("cat", "dog"), per_class=(70, 12), size=(40, 32)):
    """A class-folder set nobody has used: train/ and val/, a few JPEGs of each class (colour tells them apart)."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (*size[::-1], 3)) + np.array([160 * (c == 0), 80, 160 * (c == 1)])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


def line(output, start):
    """The command a script printed on its `start` line (next: or the report after done:), as argv."""
    text = next(row for row in output.splitlines() if row.startswith(start))
    return shlex.split(text.split("python ", 1)[1])


def paste(argv, timeout=600):
    """Run a printed command as it is (the scripts' folder as working directory, as the README's commands)."""
    return run(*argv, timeout=timeout)


def timm_model(export_output):
    namespace = {}
    exec(export_output.split("\n\n")[2], namespace)  # the construction export.py printed, as a user pastes it
    return namespace["model"]


FAST = ["--img_size=32", "--patch_size=8", "--epochs=1", "--batch_size=32", "--vocab_size=16",
        "--tokenizer_samples=512", "--workers=0", "--log_every=1"]


def test_the_newcomer_path_on_a_class_folder_runs_from_the_printed_lines(tmp_path):
    """imagefolder pre-training -> its next line (probe on the same data) -> the report it names -> the fine-tuning
    it suggests -> export -> the printed timm model: same features, same logits."""
    root = photos(tmp_path / "my photos")  # a space in the path: the printed lines quote it
    result = run("pretrain.py", "--dataset=imagefolder", f"--data_root={root}", *FAST, f"--out_dir={tmp_path}/run")
    assert "preset imagefolder/quick:" in result.stdout
    probe_cmd = line(result.stdout, "next:")
    assert probe_cmd == ["probe.py", f"--init={tmp_path}/run/ckpt.pt", "--dataset=imagefolder", f"--data_root={root}"]
    probed = paste(probe_cmd)
    results = json.loads(open(f"{tmp_path}/run/ckpt_probe/results.json").read())
    assert (results["config"]["dataset"], results["config"]["data_root"]) == ("imagefolder", str(root))
    assert "(140 train / 24 val images)" in probed.stdout  # the user's images, not the built-in scenes
    report = paste(shlex.split(probed.stdout.split("as a table and a plot: python ", 1)[1].splitlines()[0]))
    assert "| ckpt | " in report.stdout and os.path.exists(f"{tmp_path}/run/ckpt_probe/probe_by_block.png")
    tuned = paste(line(probed.stdout, "next:"))  # fine-tuning, on the same data, with the quick recipe
    assert "best val top-1" in tuned.stdout

    exported = paste(["export.py", f"--ckpt={tmp_path}/run/ckpt.pt", f"--out={tmp_path}/vit_timm.pth"])
    model = timm_model(exported.stdout)
    from model import Classifier, ViT, load_encoder
    encoder = ViT("tiny", 32, 8).eval()
    load_encoder(encoder, torch.load(f"{tmp_path}/run/ckpt.pt", weights_only=True)["model"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), encoder(images).mean(1), rtol=1e-5, atol=1e-5)
    classifier_export = paste(line(tuned.stdout, "next:"))
    best = torch.load(f"{tmp_path}/run/ckpt_finetune/best.pt", weights_only=True)["model"]
    classifier = Classifier(ViT("tiny", 32, 8), 2).eval()
    classifier.load_state_dict(best)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(classifier_export.stdout)(images), classifier(images), rtol=1e-5,
                                   atol=1e-5)


def test_an_unlabelled_folder_is_sent_to_the_export_not_to_the_probes(tmp_path):
    write_images(tmp_path / "images", 64)
    result = run("pretrain.py", "--dataset=folder", f"--data_root={tmp_path / 'images'}", *TINY, "--epochs=1",
                 "--monitor_every=1", f"--out_dir={tmp_path / 'run'}")
    assert "has no labels to probe with" in result.stdout
    monitor = [json.loads(row) for row in open(tmp_path / "run" / "log.jsonl") if "rankme" in row]
    assert [r["epoch"] for r in monitor] == [0, 1] and not any("knn" in r for r in monitor)  # RankMe alone
    exported = paste(line(result.stdout, "next:"))
    assert os.path.exists(tmp_path / "run" / "vit_timm.pth") and "timm.models.VisionTransformer" in exported.stdout


def test_class_folders_without_a_val_split_train_with_rankme_alone(tmp_path):
    """The monitor's k-NN needs validation images; a train/ folder alone still pre-trains, watched by RankMe."""
    shutil.rmtree(photos(tmp_path / "photos") / "val")
    result = run("pretrain.py", "--dataset=imagefolder", f"--data_root={tmp_path / 'photos'}", *FAST,
                 f"--out_dir={tmp_path / 'run'}")
    monitor = [json.loads(row) for row in open(tmp_path / "run" / "log.jsonl") if "rankme" in row]
    assert [r["epoch"] for r in monitor] == [0, 1] and not any("knn" in r for r in monitor)
    assert "monitor: 140 train images at 32 px, RankMe before training" in result.stdout


def test_a_quick_run_on_a_users_folder_takes_about_10000_images(monkeypatch, capsys, tmp_path):
    import pretrain
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--dataset=imagefolder", "--data_root=x"])
    cfg = common.configure(pretrain.config, "", "pretrain.py", pretrain.PRESETS, pretrain.chosen_presets)[0]
    assert cfg["fraction"] == 10_000  # a number of images: all of a small folder, a class-balanced 10,000 of a big one
    photos(tmp_path / "set", per_class=(30, 6))
    few = data.build_dataset("imagefolder", str(tmp_path / "set"), "train", fraction=20)
    assert len(few) == 20 and sorted(few.targets) == [0] * 10 + [1] * 10
    assert len(data.build_dataset("imagefolder", str(tmp_path / "set"), "train", fraction=10_000)) == 60
    code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, *TINY, "--fraction=1.5",
                                  f"--out_dir={tmp_path / 'run'}")
    assert code == 1 and "--fraction=1.5 must be in (0, 1] (a share), or a whole number of images" in err


@pytest.mark.parametrize("mistake, message", [
    ("the train folder itself", "looks like a split folder itself: point --data_root at its parent"),
    ("a flat folder", "for images without class folders use --dataset=folder")])
def test_folder_mistakes_say_what_to_do(monkeypatch, capsys, tmp_path, mistake, message):
    import pretrain
    root = photos(tmp_path / "set", per_class=(4, 2)) / "train" if mistake == "the train folder itself" else \
        tmp_path / "flat"
    if mistake == "a flat folder":
        write_images(root, 4)
    code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, "--dataset=imagefolder", f"--data_root={root}",
                                  *TINY[1:], f"--out_dir={tmp_path / 'run'}")
    assert code == 1 and message in err, err


def test_a_new_architecture_cannot_resume_and_other_settings_say_what_changed(monkeypatch, capsys, tmp_path):
    import pretrain
    run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={tmp_path}")
    for flags in (["--patch_size=8"], ["--vocab_size=32"], ["--model=small"]):
        code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, *TINY, "--epochs=1", *flags,
                                      "--override_config=True", f"--out_dir={tmp_path}")
        assert code == 1 and "holds a network of another shape" in err and "cannot resume" in err, err
        assert "Use a new --out_dir" in err and "Traceback" not in err
    result = run("pretrain.py", *TINY, "--epochs=2", "--blr=0.1", "--override_config=True", f"--out_dir={tmp_path}")
    assert "resuming with other settings: --epochs 1 -> 2, --blr 0.015 -> 0.1 (--epochs, --blr: the learning-rate " \
           "schedule is recomputed, so the rate jumps here)" in result.stdout
    assert [r["step"] for r in log_rows(str(tmp_path))] == list(range(1, 9))


def test_too_many_unreadable_files_stop_the_vocabulary_pass_before_training(tmp_path):
    write_images(tmp_path / "images", 20)
    write_bad_files(tmp_path / "images")  # 3 bad of 23: 13%
    flags = ["--dataset=folder", f"--data_root={tmp_path / 'images'}", *TINY, "--batch_size=8", "--epochs=1",
             f"--out_dir={tmp_path / 'run'}"]
    result = run("pretrain.py", *flags, check=False)
    assert result.returncode == 1 and not os.path.exists(tmp_path / "run" / "ckpt.pt"), result.stderr[-2000:]
    assert "3 of the 23 images the vocabulary pass read are unreadable" in result.stderr
    for name in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert name in result.stderr.split("error:")[1]
    assert "--max_unreadable=0.14" in result.stderr and "step 1/" not in result.stdout  # before any training
    run("pretrain.py", *flags, "--max_unreadable=0.14")  # the value it names lets the run go on


def test_a_stop_during_the_vocabulary_pass_says_so_and_the_next_run_starts_cleanly(tmp_path):
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--num_images=100000",
                                "--tokenizer_samples=1000000", f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "splitmask ViT-tiny/4" in process.stdout.readline()  # printed before the vocabulary pass starts
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT and "SIGINT before training started: nothing saved yet" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "ckpt.pt")
    result = run("pretrain.py", *TINY, f"--out_dir={tmp_path}")  # the same folder: no complaint, a run from step 0
    assert "resuming" not in result.stdout and [r["step"] for r in log_rows(str(tmp_path))] == list(range(1, 9))


def test_a_log_file_gets_plain_lines_not_progress_bars_and_pictures_name_their_rows(tmp_path):
    """stdout and stderr are files here, as under nohup or a scheduler: no bar updates, a line per log step."""
    result = run("pretrain.py", *TINY, "--log_every=2", f"--out_dir={tmp_path}")
    assert "\r" not in result.stderr and "it/s" not in result.stderr, result.stderr[-500:]
    steps = [row for row in result.stdout.splitlines() if row.startswith("step ")]
    assert [row.split()[1] for row in steps] == ["2/8", "4/8", "6/8", "8/8"] and "| loss " in steps[0]
    picture = np.asarray(Image.open(tmp_path / "inpaint_00001.png").convert("L"))
    margin, row = picture[:, :100], (picture.shape[0]) // 5  # 5 rows: original, A sees, B sees, A and B predict
    assert picture.shape[1] == 100 + 8 * 130 + 2  # a 100-pixel margin beside 8 images zoomed to 128 px
    for r in range(5):
        assert (margin[r * row:(r + 1) * row] < 128).any(), r  # dark text in every row's margin
