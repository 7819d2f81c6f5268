"""gpu_check.py, the one command for a first GPU minute, runs its every step on a CPU at toy sizes so it cannot rot."""
import json

import torch

from test_pretrain import run, run_in_process


def test_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    result = run("gpu_check.py", "--device=cpu", "--tiny=True", f"--out_dir={tmp_path}", timeout=600)
    rows = {name: (value, note) for name, value, note in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    for name in ("SplitMask step", "BEiT step", "loading: plain torchvision, one worker", "loading: ours, one worker",
                 "loader workers to feed the step", "what limits the step"):
        assert name in rows and name in result.stdout, name
    assert rows["torchrun pretrain.py: kill and resume"][0] == "ok", rows["torchrun pretrain.py: kill and resume"]
    assert "2 processes, killed after step" in rows["torchrun pretrain.py: kill and resume"][1]
    assert rows["probe.py on its checkpoint"][0] == rows["finetune.py on its checkpoint"][0] == "ok", rows


def test_it_never_wipes_a_folder_it_did_not_write(monkeypatch, capsys, tmp_path):
    import gpu_check
    (tmp_path / "results.json").write_text("a user's file")
    code, _, err = run_in_process(monkeypatch, capsys, gpu_check.main, "--device=cpu", f"--out_dir={tmp_path}")
    assert code == 1 and "did not write" in err and (tmp_path / "results.json").exists(), err


def test_without_cuda_it_says_so_and_exits_0():
    if not torch.cuda.is_available():
        assert "no CUDA device here" in run("gpu_check.py").stdout
