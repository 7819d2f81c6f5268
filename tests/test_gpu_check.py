"""gpu_check.py, the one command for a first GPU minute, runs its every step on a CPU at toy sizes so it cannot rot."""
import json

import torch

from test_pretrain import run, run_in_process


def test_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    result = run("gpu_check.py", "--device=cpu", "--tiny=True", f"--out_dir={tmp_path}", timeout=600)
    rows = {name: (value, note) for name, value, note in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    for name in ("SplitMask step", "BEiT step", "loading: plain torchvision, one worker", "loading: ours, one worker",
                 "loader workers to feed the step", "what limits the step",
                 "device path: one worker (bytes, draws, masks)", "device path: decode + augment on the cpu",
                 "SplitMask step (ViT-S)",
                 "device path: decode + augment on the cpu (ViT-S)"):
        assert name in rows and name in result.stdout, name
    resumed = rows["torchrun pretrain.py: kill and resume"]
    assert resumed[0] == "ok" and "2 processes, killed after step 4, resumed from it to step 16" in resumed[1], resumed
    assert rows["probe.py on its checkpoint"][0] == rows["finetune.py on its checkpoint"][0] == "ok", rows
    assert rows["--dtype=auto"][0] == "float32"  # the rows made in process (host syncs: on a GPU only)
    assert rows["device path: batches made one ahead"][0] == rows["device path: pixels against the CPU's"][0] == "ok"
    for name in ("k-means fitted twice", "InfoNCE under bf16 autocast", "words under bf16 autocast"):
        assert rows[name][0] == "ok", (name, rows[name])
    assert "FAILED" not in result.stdout


def test_a_pretraining_that_fails_at_start_still_gives_the_whole_table(tmp_path):
    """The failure gpu_check exists to catch: the table, with the run's own error, the JSON, and exit code 1."""
    result = run("gpu_check.py", "--device=cpu", "--tiny=True", "--pretrain_flags=--model=huge",
                 f"--out_dir={tmp_path}", timeout=600, check=False)
    rows = {name: (value, note) for name, value, note in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    failed = rows["torchrun pretrain.py: kill and resume"]
    assert failed[0] == "FAILED" and "exit 1 before a checkpoint: error: unknown --model='huge'" in failed[1]
    assert rows["probe.py on its checkpoint"][0] == "FAILED" and rows["SplitMask step"][0] != "FAILED"
    assert "| torchrun pretrain.py: kill and resume | FAILED |" in result.stdout  # printed, not only saved
    assert "3 failed: torchrun pretrain.py: kill and resume, probe.py on its checkpoint" in result.stdout


def test_it_never_wipes_a_folder_it_did_not_write(monkeypatch, capsys, tmp_path):
    import gpu_check
    (tmp_path / "results.json").write_text("a user's file")
    code, _, err = run_in_process(monkeypatch, capsys, gpu_check.main, "--device=cpu", f"--out_dir={tmp_path}")
    assert code == 1 and "did not write" in err and (tmp_path / "results.json").exists(), err


def test_without_cuda_it_says_so_and_exits_0():
    if not torch.cuda.is_available():
        assert "no CUDA device here" in run("gpu_check.py").stdout
