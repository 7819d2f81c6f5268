"""Nothing lost, nothing confusing: bad files, bad checkpoints, changed settings, NaN, a dead worker."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from test_pretrain import ENV, ROOT, TINY, free_port, log_rows, run, run_in_process, wait_for_step, weights


def write_images(folder, count, seed=0):
    """count readable images in every awkward form: modes, bit depths, sizes below the crop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        kind = i % 6
        if kind == 0:
            image.save(folder / f"{i}.jpg")
        elif kind == 1:
            image.convert("P").save(folder / f"{i}.png")  # palette
        elif kind == 2:
            image.convert("RGBA").save(folder / f"{i}.png")
        elif kind == 3:
            image.convert("CMYK").save(folder / f"{i}.jpg")
        elif kind == 4:
            Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257).save(folder / f"{i}.png")  # 16-bit gray
        else:
            image.resize((5, 4)).convert("L").save(folder / f"{i}.png")  # smaller than the 16 px crop


def write_bad_files(folder):
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    good = folder / "0.jpg"
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "notes.txt").write_text("ignored: not an image extension")


FOLDER = ["--dataset=folder", *TINY, "--epochs=1"]


def test_a_few_unreadable_images_are_skipped_and_counted(tmp_path):
    write_images(tmp_path / "images", 127)
    (tmp_path / "images" / "zero.jpg").write_bytes(b"")  # 1 bad of 128: under 1%
    result = run("pretrain.py", *FOLDER, f"--data_root={tmp_path / 'images'}", f"--out_dir={tmp_path / 'run'}")
    assert "skipping unreadable image" in result.stderr and "zero.jpg" in result.stderr
    assert "1 unreadable images were skipped in epoch 0" in result.stdout
    assert log_rows(str(tmp_path / "run"))[-1]["unreadable"] == 1


def test_too_many_unreadable_images_stop_the_run(tmp_path):
    """In the first epoch when no vocabulary pass read the images (random projection; else the pass stops first)."""
    write_images(tmp_path / "images", 61)
    write_bad_files(tmp_path / "images")  # 3 bad of 64
    result = run("pretrain.py", *FOLDER, "--tokenizer=random_projection", "--log_every=4",  # checked at the epoch's end
                 f"--data_root={tmp_path / 'images'}", f"--out_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0
    assert "unreadable images in epoch 0 (over 1% of 64)" in result.stderr
    for name in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert name in result.stderr


def test_finetune_stops_on_too_many_unreadable_images(tmp_path):
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_images(tmp_path / "data" / split / label, 15, seed=len(label + split))
    write_bad_files(tmp_path / "data" / "train" / "a")  # 3 bad of 33 training images
    result = run("finetune.py", "--dataset=imagefolder", f"--data_root={tmp_path / 'data'}", "--model=tiny",
                 "--img_size=16", "--patch_size=4", "--batch_size=8", "--epochs=1", "--workers=0", "--dtype=float32",
                 f"--out_dir={tmp_path / 'run'}", check=False)
    assert result.returncode != 0 and "unreadable images in epoch 0 (over 1% of 33)" in result.stderr, result.stderr
    assert "truncated.jpg" in result.stderr


@pytest.mark.parametrize("layout, dataset, message", [
    ("empty", "folder", "folder: no image files under"),
    ("missing", "imagenette", "is not a folder"),
    ("flat", "imagefolder", "no train folder in"),
    ("train_flat", "imagefolder", "no class folders in"),
])
def test_bad_dataset_folders_name_the_expected_layout(monkeypatch, capsys, tmp_path, layout, dataset, message):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "flat":
        write_images(root, 2)
    elif layout == "train_flat":
        write_images(root / "train", 2)
    code, _, err = run_in_process(monkeypatch, capsys, __import__("pretrain").main, f"--dataset={dataset}",
                                  f"--data_root={root}", *TINY[1:], f"--out_dir={tmp_path / 'run'}")
    assert code != 0 and message in err and "Expected" in err, err


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "probe.py"])
def test_checkpoints_that_are_not_ours_are_refused(monkeypatch, capsys, tmp_path, script):
    marker = tmp_path / "code_ran"
    evil = Evil()
    evil.marker = marker
    torch.save({"model": evil, "step": 0}, tmp_path / "evil.pt")  # loading it with pickle would run the command
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # a real torch file, not ours
    with pytest.raises(Exception):  # the guard works at the source: torch refuses the global
        torch.load(tmp_path / "evil.pt", weights_only=True)
    for name in ("evil.pt", "garbage.pt", "other.pt"):
        if script == "pretrain.py":  # a run folder holding it as ckpt.pt
            out = tmp_path / f"run_{name}"
            out.mkdir()
            (out / "ckpt.pt").write_bytes((tmp_path / name).read_bytes())
            flags = [*TINY, f"--out_dir={out}"]
        else:
            flags = ["--num_images=16", "--img_size=16", "--patch_size=4", "--workers=0", f"--init={tmp_path / name}",
                     f"--out_dir={tmp_path / 'out'}"]
        code, out, err = run_in_process(monkeypatch, capsys, __import__(script[:-3]).main, *flags)
        assert code != 0, (name, out[-500:])
        assert "cannot read checkpoint" in err or "is not a splitmask checkpoint" in err, err
    assert not marker.exists()  # weights_only=True: the pickled os.system never ran


def test_resuming_with_other_settings_is_refused_unless_asked(monkeypatch, capsys, tmp_path):
    import pretrain
    run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={tmp_path}")
    code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, *TINY, "--epochs=1", "--blr=0.1",
                                  "--mask_kind=random", f"--out_dir={tmp_path}")
    assert code != 0
    assert "'blr'" in err and "'mask_kind'" in err and "--override_config=True" in err
    result = run("pretrain.py", *TINY, "--epochs=2", "--blr=0.1", "--override_config=True", f"--out_dir={tmp_path}")
    assert "resuming" in result.stdout and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 8


def test_a_new_run_drops_the_log_rows_of_an_attempt_that_saved_nothing(tmp_path):
    """Killed in its first epoch (one row half written), a run starts again from step 0: so does its log."""
    import common
    (tmp_path / "log.jsonl").write_text('{"config": {}}\n{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    cfg = {"out_dir": str(tmp_path), "override_config": False}
    assert common.resume(str(tmp_path / "ckpt.pt"), cfg, None, None, None) is None
    assert (tmp_path / "log.jsonl").read_text() == '{"config": {}}\n'


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
    run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={tmp_path}")
    good = weights(str(tmp_path))
    # an infinite loss weight makes the loss infinite at the first step of epoch 2
    result = run("pretrain.py", *TINY, "--mim_weight=inf", "--override_config=True", f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "non-finite loss at step 5" in result.stderr
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 4
    for key, value in good.items():
        assert torch.equal(state["model"][key], value)


def test_float16_skips_overflowing_steps_then_stops_if_they_persist(tmp_path):
    # 8 px images (4 patches): CPUs emulate float16 matmuls, slowly
    result = run("pretrain.py", *TINY, "--img_size=8", "--dtype=float16", "--mim_weight=inf", "--epochs=6",
                 f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "float16 gradients kept overflowing up to step 17" in result.stderr, result.stderr


def test_a_dead_worker_brings_the_job_down(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "pretrain.py", *TINY, "--epochs=50", "--tokenizer=random_projection", f"--out_dir={tmp_path}"]
    job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(job, str(tmp_path), 2)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    start = time.time()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - start < 120
    assert "exitcode  : -9" in output or "Signal 9" in output or "SIGKILL" in output, output[-2000:]
