"""The GPU path, checked on a CPU wherever its logic allows: dtypes, precision, device-specific optimizer kernels,
no CUDA in a CPU run, the process group on exit, MFU's denominator. (gpu_check.py checks the rest on a GPU.)"""
import os
import subprocess
import sys

import pytest
import torch

import common
import data
from test_pretrain import ENV, ROOT, TINY, free_port, log_rows, run


# ----------------------------------------------------------------------------- dtypes and precision

@pytest.mark.parametrize("capability, dtype", [((7, 0), "float16"), ((7, 5), "float16"), ((8, 0), "bfloat16"),
                                               ((8, 6), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_dtype_is_bfloat16_only_where_the_gpu_has_it_natively(monkeypatch, capsys, capability, dtype):
    """V100 (7.0), T4 (7.5): float16 with loss scaling. (A pretend GPU: the calls setup makes are answered here.)"""
    for name, answer in (("is_available", True), ("set_device", None), ("get_device_capability", capability),
                         ("get_device_name", "NVIDIA Test"), ("is_bf16_supported", True)):
        monkeypatch.setattr(torch.cuda, name, lambda *args, answer=answer: answer)
    cfg = dict(device="cuda", dtype="auto")
    device, _, scaler = common.setup(cfg)
    assert (device.type, cfg["dtype"]) == ("cuda", dtype) and f"--dtype=auto: {dtype} on NVIDIA Test" in \
        capsys.readouterr().out
    assert scaler.is_enabled() == (dtype == "float16")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # (a CPU run hides the GPUs: put the variable back afterwards)
    cpu = dict(device="cpu", dtype="auto")
    common.setup(cpu)
    assert cpu["dtype"] == "float32"


def test_setup_turns_tf32_off(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # (a CPU run hides the GPUs: put the variable back afterwards)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a forked script might
    try:
        cfg = dict(device="cpu", dtype="auto")
        device, autocast, scaler = common.setup(cfg)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert (device.type, cfg["dtype"], autocast.fast_dtype, scaler.is_enabled()) == ("cpu", "float32", torch.float32,
                                                                                     False)


def test_normalize_makes_its_statistics_once_per_device():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    data.normalize(images)
    made = data._statistics(images.device)
    data.normalize(images)
    assert data._statistics(images.device) is made  # on a GPU each new one would be a copy that waits


# ----------------------------------------------------------------------------- resume on another device or dtype

def saved_run(tmp_path, fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    cfg = dict(out_dir=str(tmp_path), override_config=False)
    common.save_run(str(tmp_path / "ckpt.pt"), cfg, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1)
    return cfg


@pytest.mark.parametrize("saved_fused, fused", [(False, True), (True, False)])
def test_resume_sets_the_optimizer_up_for_the_device_it_runs_on(tmp_path, saved_fused, fused):
    """A checkpoint written on a CPU (unfused AdamW) resumes fused on a GPU, and one written on a GPU unfused on a
    CPU; before, the saved flags came back, and float16's loss scaling met an AssertionError in the unfused kernel."""
    cfg = saved_run(tmp_path, saved_fused)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # --dtype=float16 now
    assert common.resume(str(tmp_path / "ckpt.pt"), cfg, model, optimizer, scaler)["step"] == 1
    assert optimizer.param_groups[0]["fused"] == fused and optimizer.param_groups[0]["foreach"] is None
    before = model.weight.detach().clone()
    with torch.autocast("cpu", torch.float16):
        loss = model(torch.randn(2, 4)).float().sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before) and optimizer.state_dict()["state"][0]["step"] == 2


def test_a_bfloat16_run_resumes_in_float16_and_back(tmp_path):
    tiny = [*TINY, "--img_size=8", "--dtype=bfloat16", f"--out_dir={tmp_path}"]  # 8 px: CPUs emulate float16
    run("pretrain.py", *tiny, "--epochs=1")
    resumed = run("pretrain.py", *tiny, "--epochs=2", "--dtype=float16", "--override_config=True")
    assert "resuming" in resumed.stdout and torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]
    resumed = run("pretrain.py", *tiny, "--epochs=3", "--override_config=True")  # bfloat16 again
    assert "resuming" in resumed.stdout and [r["step"] for r in log_rows(str(tmp_path))] == list(range(1, 13))


# ----------------------------------------------------------------------------- a CPU run on a GPU machine

NO_CUDA = """
import runpy, sys, torch, torch.utils.data
import os  # a GPU machine, as far as the scripts can tell: a GPU, unless hidden
torch.cuda.is_available = lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != ""
def lazy_init():  # what every first use of CUDA calls, from Python or C++
    raise RuntimeError("a CPU run started CUDA")
torch.cuda._lazy_init = lazy_init
loader_init = torch.utils.data.DataLoader.__init__
def no_pinning(self, *args, **kwargs):
    assert not kwargs.get("pin_memory"), "a CPU run pins memory for a GPU"
    loader_init(self, *args, **kwargs)
torch.utils.data.DataLoader.__init__ = no_pinning
for command in sys.argv[1:]:
    sys.argv = command.split()
    runpy.run_path(sys.argv[0], run_name="__main__")
print("CUDA initialised:", torch.cuda.is_initialized())
"""


def test_a_cpu_run_on_a_gpu_machine_never_starts_cuda(tmp_path):
    small = "--num_images=32 --img_size=16 --patch_size=4 --batch_size=16 --workers=0 --device=cpu"
    pretrain = f"pretrain.py {' '.join(TINY)} --epochs=1 --device=cpu --out_dir={tmp_path}"
    commands = [pretrain, f"probe.py {small} --probe_epochs=1 --init={tmp_path}/ckpt.pt",
                f"finetune.py {small} --epochs=1 --init={tmp_path}/ckpt.pt"]
    result = subprocess.run([sys.executable, "-c", NO_CUDA, *commands], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "CUDA initialised: False" in result.stdout, result.stderr[-3000:]
    assert os.path.exists(tmp_path / "ckpt_finetune" / "best.pt")


# ----------------------------------------------------------------------------- the process group on exit

LEAVES_THE_GROUP = """
import atexit, os, sys, torch.distributed as dist
rank = int(os.environ["RANK"])
atexit.register(lambda: print(f"rank {rank} left the process group: {not dist.is_initialized()}", flush=True))
import common
common.setup(dict(device="cpu", dtype="auto"))
if rank == 1:
    raise RuntimeError("rank 1 fails")
"""


def test_every_process_leaves_the_process_group_however_it_ends(tmp_path):
    script = tmp_path / "fails_on_rank_1.py"
    script.write_text(LEAVES_THE_GROUP)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(script)], cwd=ROOT, env=dict(ENV, PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "rank 1 fails" in result.stderr, result.stderr[-2000:]
    for rank in (0, 1):  # the one that failed too: its atexit ran after the error
        assert f"rank {rank} left the process group: True" in result.stdout, result.stdout + result.stderr[-2000:]


# ----------------------------------------------------------------------------- MFU

@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "float32", 67e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12), ("NVIDIA H100 NVL", "float16", 835e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12), ("NVIDIA A100 80GB PCIe", "float32", 19.5e12)])
def test_mfu_on_a_known_gpu_is_against_its_spec_sheet(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, source = common.peak_flops(torch.device("cuda", 0), dtype)
    assert flops == peak and "spec sheet" in source and dtype in source


def test_a_gpu_whose_name_only_contains_a_known_one_is_not_taken_for_it(monkeypatch):
    """"RTX A1000" holds "A100": it must not be divided by an A100's peak, but by a matmul timed on it (here a
    small one on the CPU: the test has no GPU)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A1000")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: torch.ones(64, 64))
    monkeypatch.setattr(torch, "Generator", lambda device=None: None)
    flops, source = common.peak_flops(torch.device("cuda", 0), "bfloat16")
    assert source == "a bfloat16 matmul measured on this GPU (NVIDIA RTX A1000: no spec sheet here)"


def test_mfu_on_a_cpu_is_against_a_matmul_measured_now():
    flops, source = common.peak_flops(torch.device("cpu"), "float32")
    assert 1e8 < flops < 1e14 and source == "a float32 matmul measured on this CPU"
