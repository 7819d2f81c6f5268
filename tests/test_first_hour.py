"""A new user's first hour, at the command line: checkpoints that carry their architecture, each script's
own --help, recipes, stopping without loss, the errors a user meets, and outputs a user can find."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_faults import write_bad_files, write_images
from test_pretrain import ENV, ROOT, TINY, log_rows, run, run_in_process, torchrun, wait_for_step, weights

SCRIPTS = ["pretrain.py", "finetune.py", "probe.py", "export.py", "bench.py", "report.py"]


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """A one-epoch run at 16 px in 4 px patches (not the downstream scripts' default 32 px): its output."""
    out = tmp_path_factory.mktemp("pretrain")
    return str(out / "ckpt.pt"), run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={out}").stdout


@pytest.fixture(scope="module")
def pretrained(pretraining):
    return pretraining[0]


# ----------------------------------------------------------------------------- 1. checkpoints carry their architecture

def test_probe_and_finetune_take_the_architecture_from_the_checkpoint(pretrained, tmp_path):
    result = run("probe.py", f"--init={pretrained}", "--num_images=32", "--workers=0", "--probe_epochs=2")
    results = json.loads(open(pretrained.replace(".pt", "_probe/results.json")).read())  # out_dir named after it
    assert (results["config"]["img_size"], results["config"]["patch_size"]) == (16, 4)
    assert "resized" not in result.stdout and f"done: {pretrained[:-3]}_probe/results.json" in result.stdout
    result = run("finetune.py", f"--init={pretrained}", "--num_images=32", "--batch_size=16", "--epochs=1",
                 "--workers=0")
    assert f"in {pretrained[:-3]}_finetune/best.pt" in result.stdout  # beside its checkpoint, like the probe's
    config = json.loads(open(pretrained.replace(".pt", "_finetune/log.jsonl")).readline())["config"]
    assert (config["model"], config["img_size"], config["patch_size"]) == ("tiny", 16, 4)


def test_fine_tuning_a_rewritten_checkpoint_does_not_resume_the_old_fine_tuning(monkeypatch, capsys, pretrained,
                                                                                tmp_path):
    import finetune
    init = tmp_path / "ckpt.pt"
    shutil.copy(pretrained, init)
    flags = [f"--init={init}", "--num_images=32", "--batch_size=16", "--epochs=1", "--workers=0"]
    run("finetune.py", *flags)
    os.utime(init, (time.time() + 60, time.time() + 60))  # pre-training went on and saved again
    code, _, err = run_in_process(monkeypatch, capsys, finetune.main, *flags)
    assert code == 1 and "'init_modified'" in err and "--override_config=True" in err, err


def test_a_missing_checkpoint_or_an_output_folder_that_cannot_be_made_is_said(monkeypatch, capsys, pretrained,
                                                                               tmp_path):
    import probe
    code, _, err = run_in_process(monkeypatch, capsys, probe.main, f"--init={tmp_path / 'missing.pt'}")
    assert code == 1 and f"no checkpoint file at {tmp_path / 'missing.pt'}" in err, err
    shutil.copy(pretrained, tmp_path / "ckpt.pt")
    (tmp_path / "ckpt_probe").write_text("a file where the probe's folder would go")
    code, _, err = run_in_process(monkeypatch, capsys, probe.main, f"--init={tmp_path / 'ckpt.pt'}", "--workers=0")
    assert code == 1 and f"cannot create the output folder {tmp_path}/ckpt_probe" in err and "--out_dir" in err, err


def test_an_explicit_size_wins_and_says_what_it_changes(pretrained, tmp_path):
    result = run("probe.py", f"--init={pretrained}", "--img_size=32", "--num_images=32", "--workers=0",
                 "--probe_epochs=2", f"--out_dir={tmp_path}")
    assert "trained at 16 px" in result.stdout and "resized from a 4x4 to a 8^2 grid" in result.stdout
    assert json.loads((tmp_path / "results.json").read_text())["config"]["img_size"] == 32


@pytest.mark.parametrize("script", ["probe.py", "finetune.py"])
def test_a_checkpoint_that_cannot_fit_names_what_it_holds(monkeypatch, capsys, pretrained, tmp_path, script):
    code, _, err = run_in_process(monkeypatch, capsys, __import__(script[:-3]).main, f"--init={pretrained}",
                                  "--patch_size=8", "--workers=0", f"--out_dir={tmp_path}")
    assert code == 1 and "does not fit" in err and "ViT-tiny/4" in err
    assert "drop those flags" in err  # (a traceback would fail this test)


def test_a_timm_file_is_sent_to_the_converter_and_the_converted_file_is_self_describing(monkeypatch, capsys,
                                                                                        pretrained, tmp_path):
    import probe
    run("export.py", f"--ckpt={pretrained}", f"--out={tmp_path / 'timm.pth'}")
    code, _, err = run_in_process(monkeypatch, capsys, probe.main, f"--init={tmp_path / 'timm.pth'}", "--workers=0",
                                  f"--out_dir={tmp_path}")
    assert code == 1 and "python export.py" in err and "--to=ours" in err
    run("export.py", f"--ckpt={tmp_path / 'timm.pth'}", f"--out={tmp_path / 'ours.pt'}", "--to=ours")
    config = torch.load(tmp_path / "ours.pt", weights_only=True)["config"]
    assert (config["model"], config["img_size"], config["patch_size"]) == ("tiny", 16, 4)
    run("probe.py", f"--init={tmp_path / 'ours.pt'}", "--num_images=32", "--workers=0", "--probe_epochs=2",
        f"--out_dir={tmp_path / 'probe'}")


# ----------------------------------------------------------------------------- 2. each script's own --help

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_scripts_own_with_a_line_per_flag(monkeypatch, capsys, script):
    code, stdout, _ = run_in_process(monkeypatch, capsys, __import__(script[:-3]).main, "--help")
    assert code == 0
    source = open(os.path.join(ROOT, script)).read()
    first_line = source.split('"""', 2)[1].strip().splitlines()[0]
    assert stdout.startswith(first_line)
    config = source.split("config = dict(", 1)[1].split("\n)", 1)[0]
    flags = [line.split("=")[0].strip() for line in config.splitlines() if "=" in line and "#" in line]
    described = [line for line in stdout.splitlines() if line.startswith("  --")]
    assert len(described) == len(flags) and all(len(line.split(None, 1)) == 2 for line in described), described


def test_help_shows_the_value_each_preset_gives(monkeypatch, capsys):
    import pretrain
    out = run_in_process(monkeypatch, capsys, pretrain.main, "--help")[1]
    epochs = out.split("--epochs=5", 1)[1].split("  --", 1)[0]
    assert "quick 8" in epochs and "paper 5000 (imagenet 300, coco 3000, ade20k 21000" in epochs


# ----------------------------------------------------------------------------- 3. recipes at the size of the machine

def test_real_datasets_start_from_the_quick_recipe_and_the_paper_is_one_flag_away(monkeypatch, capsys):
    import common
    import pretrain

    def resolved(*flags):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", *flags])
        return common.configure(pretrain.config, "", "pretrain.py", pretrain.PRESETS, pretrain.chosen_presets)[0]

    quick = resolved("--dataset=imagenette", "--data_root=x")
    assert (quick["model"], quick["img_size"], quick["epochs"], quick["vocab_size"]) == ("tiny", 112, 8, 1024)
    assert "preset imagenette/quick: --model=tiny --img_size=112" in capsys.readouterr().out  # printed at start
    paper = resolved("--dataset=coco", "--data_root=x", "--recipe=paper", "--epochs=3")
    assert (paper["model"], paper["img_size"], paper["epochs"], paper["vocab_size"]) == ("base", 224, 3, 8192)
    assert "--epochs=3000" not in capsys.readouterr().out  # a flag overrides the preset, and is not shown as its
    assert resolved("--dataset=cifar10", "--data_root=x")["fraction"] == 0.2  # about 10,000 images
    assert resolved("--method=beit")["mask_ratio"] == 0.4


def test_fine_tuning_checks_its_loss_at_every_log_step(monkeypatch, capsys, tmp_path):
    """A stop signal saves at the next step, so a non-finite loss must be caught there, not at the epoch's end."""
    import finetune
    code, _, err = run_in_process(monkeypatch, capsys, finetune.main, "--label_smoothing=nan", "--num_images=32",
                                  "--img_size=16", "--batch_size=16", "--epochs=1", "--log_every=1", "--workers=0",
                                  "--dtype=float32", f"--out_dir={tmp_path}")
    assert code == 1 and "non-finite loss at step 1 " in err and not (tmp_path / "ckpt.pt").exists(), err


def test_warm_up_longer_than_the_run_is_refused(monkeypatch, capsys, tmp_path):
    import finetune
    code, _, err = run_in_process(monkeypatch, capsys, finetune.main, "--epochs=1", "--warmup_epochs=5",
                                  f"--out_dir={tmp_path}")
    assert code == 1 and "--warmup_epochs=5 is more than --epochs=1" in err, err


def test_workers_default_to_the_cores_this_machine_has():
    import data
    assert 0 <= data.cpu_workers() < max(2, len(os.sched_getaffinity(0)))


# ----------------------------------------------------------------------------- 4. stopping loses nothing

def test_ctrl_c_saves_within_a_step_and_resumes(tmp_path):
    """SIGINT as SIGTERM, and a signal acts after the current step, not at the next log step."""
    flags = [*TINY, "--num_images=256", "--log_every=1000"]  # 2 epochs of 16 steps, logged at their ends
    reference = tmp_path / "reference"
    run("pretrain.py", *flags, f"--out_dir={reference}")
    out = str(tmp_path / "stopped")
    process = subprocess.Popen([sys.executable, "pretrain.py", *flags, f"--out_dir={out}"], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(process, out, 16)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stop signal" in output and "KeyboardInterrupt" not in output, output
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 16 < saved < 32, saved  # mid-epoch: the old behaviour saved at the next log step, 32
    resumed = run("pretrain.py", *flags, f"--out_dir={out}")
    assert "2 pictures" in resumed.stdout  # the done line counts the pictures drawn before the stop too
    for key, value in weights(str(reference)).items():
        assert torch.equal(weights(out)[key], value), key


# ----------------------------------------------------------------------------- 5. errors a user meets

def test_a_missing_data_root_is_said_once_under_torchrun(tmp_path):
    result = torchrun(2, "pretrain.py", "--dataset=coco", "--workers=0", f"--out_dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and output.count("--dataset=coco: it needs --data_root=<its folder>") == 1, output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_at_once(monkeypatch, capsys, tmp_path):
    import pretrain
    code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, "--device=cuda", f"--out_dir={tmp_path}")
    assert code == 1 and "--device=cuda but PyTorch sees no CUDA GPU" in err
    assert "sampling" not in err  # refused before any work (a traceback would fail this test)


def test_an_unreadable_image_is_counted_once_and_more_can_be_allowed(tmp_path):
    write_images(tmp_path / "images", 61)
    write_bad_files(tmp_path / "images")  # 3 bad of 64, one after the other: each one's replacement is bad too
    run("pretrain.py", "--dataset=folder", f"--data_root={tmp_path / 'images'}", *TINY, "--epochs=1",
        "--max_unreadable=0.05", f"--out_dir={tmp_path / 'run'}")
    assert log_rows(str(tmp_path / "run"))[-1]["unreadable"] == 3


@pytest.mark.parametrize("script", ["finetune.py", "probe.py"])
def test_bad_checkpoints_do_not_echo_torchs_advice(monkeypatch, capsys, tmp_path, script):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    code, _, err = run_in_process(monkeypatch, capsys, __import__(script[:-3]).main,
                                  f"--init={tmp_path / 'garbage.pt'}", f"--out_dir={tmp_path}")
    assert code == 1 and "cannot read checkpoint" in err
    assert "weights_only" not in err  # (a traceback would fail this test)


@pytest.mark.parametrize("script, flag, suggestion", [("pretrain.py", "--epoch=3", "--epochs"),
                                                      ("pretrain.py", "--lr=0.1", "--blr"),
                                                      ("probe.py", "--epochs=3", "--probe_epochs")])
def test_did_you_mean(monkeypatch, capsys, script, flag, suggestion):
    main = __import__(script[:-3]).main
    code, _, err = run_in_process(monkeypatch, capsys, main, flag)
    assert code == 1 and "did you mean" in err and suggestion in err.split("did you mean")[1], err


def test_one_epoch_reads_one_epoch(pretraining):
    assert "1 epoch of 4 steps" in pretraining[1]


# ----------------------------------------------------------------------------- 6. outputs a user can find

def test_runs_say_where_their_outputs_are_and_a_finished_run_says_so(tmp_path):
    result = run("pretrain.py", *TINY, "--pictures=0", f"--out_dir={tmp_path}")
    assert f"done: checkpoint {tmp_path}/ckpt.pt" in result.stdout and "picture" not in result.stdout
    again = run("pretrain.py", *TINY, "--pictures=0", f"--out_dir={tmp_path}")
    assert "nothing left to train" in again.stdout and len(log_rows(str(tmp_path))) == 8


def test_pictures_by_default_spread_over_the_run(tmp_path):
    result = run("pretrain.py", *TINY, "--epochs=8", "--num_images=32", f"--out_dir={tmp_path}")
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".png")) == [f"inpaint_{e:05d}.png" for e in (2, 4, 6, 8)]
    assert "4 pictures" in result.stdout
