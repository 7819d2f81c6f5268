"""pretrain.py end to end, as a user runs it: subprocesses on tiny settings, CPU only."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ViT-tiny on 16 px images in 4 px patches: 16 tokens, 4 steps per epoch, a second or so per epoch.
TINY = ["--num_images=64", "--img_size=16", "--patch_size=4", "--vocab_size=16", "--tokenizer_samples=512",
        "--batch_size=16", "--epochs=2", "--workers=0", "--min_block=2", "--dtype=float32", "--log_every=1",
        "--monitor_every=0"]  # the tests of the monitor turn it on (it trains the same: tests/test_monitor.py)
MONITOR = "--monitor_every=1"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(script, *flags, check=True, timeout=300):
    result = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(flags)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def log_rows(out_dir):  # the training steps' rows (not the monitor's)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


def monitor_epochs(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row["epoch"] for row in map(json.loads, f) if "rankme" in row]


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, *flags, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", script, *flags]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run: the run every interrupted one must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("reference"))
    run("pretrain.py", *TINY, f"--out_dir={out}", "--pictures=2")
    return out


def test_run_leaves_checkpoint_log_and_pictures(reference):
    state = torch.load(os.path.join(reference, "ckpt.pt"), weights_only=True)
    assert state["step"] == 8 and state["config"]["epochs"] == 2 and state["config"]["vocab_size"] == 16
    assert state["vocab"].shape == (16, 3 * 2 * 2)  # words: 2x2 patches of the half-size image
    assert {"model", "optimizer", "rng", "scaler"} <= state.keys()
    rows = log_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "mim_loss", "nce_loss", "mim_acc", "grad_norm", "img_s", "mfu", "lr"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert os.path.exists(os.path.join(reference, "inpaint_00001.png"))
    assert os.path.exists(os.path.join(reference, "inpaint_00002.png"))
    assert not os.path.exists(os.path.join(reference, "ckpt.pt.tmp"))


def wait_for_step(process, out_dir, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        try:
            if any(r["step"] >= step for r in log_rows(out_dir)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_mid_epoch_and_resumes_bit_exact(reference, tmp_path, sig):
    out = str(tmp_path)
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, MONITOR, f"--out_dir={out}"], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(process, out, 2)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 2 <= saved < 8 and "stop signal" in output
    resumed = run("pretrain.py", *TINY, MONITOR, f"--out_dir={out}")
    assert f"resuming from {out}/ckpt.pt at step {saved}" in resumed.stdout
    assert_same_weights(weights(out), weights(reference))  # the reference ran without the monitor
    assert monitor_epochs(out) == [0, 1, 2]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sigusr1_to_the_whole_process_group_with_loader_workers_saves_and_resumes(reference, tmp_path, sig):
    """SLURM's --signal=USR1@T and its preemption SIGTERM reach every process of the job, DataLoader workers
    included (those of the vocabulary pass too): they must not die of it, so the run still saves and resumes."""
    out = str(tmp_path)
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--workers=1", f"--out_dir={out}"], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own process group, as a scheduler's job step
    wait_for_step(process, out, 2)
    os.killpg(process.pid, sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stop signal" in output, output
    resumed = run("pretrain.py", *TINY, "--workers=1", f"--out_dir={out}")
    assert "resuming" in resumed.stdout
    assert_same_weights(weights(out), weights(reference))


def test_sigkill_resumes_from_last_checkpoint_bit_exact(reference, tmp_path):
    out = str(tmp_path)
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, MONITOR, f"--out_dir={out}"], cwd=ROOT,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(process, out, 6)  # the epoch-1 checkpoint (step 4) is on disk by then
    process.kill()
    process.wait()
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4
    with open(os.path.join(out, "ckpt.pt.tmp"), "wb") as f:  # as if killed while writing the next one
        f.write(b"half a checkpoint")
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # or a log row
        f.write('{"step": 7, "lo')
    resumed = run("pretrain.py", *TINY, MONITOR, f"--out_dir={out}")
    assert "resuming" in resumed.stdout
    assert_same_weights(weights(out), weights(reference))
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))  # the rows after step 4 are not there twice
    assert monitor_epochs(out) == [0, 1, 2]  # the monitor's too: one row per epoch


@pytest.mark.parametrize("flags", [
    ["--method=beit"],  # Table 8: BEiT
    ["--nce_weight=0"],  # split + inpaint
    ["--mim_weight=0"],  # split + match
    ["--mask_ratio=0.75", "--mask_kind=random", "--tokenizer=random_patches"],  # two disjoint 25% subsets
    ["--tokenizer=random_projection", "--accum_steps=2"],
])
def test_table8_rows_train_with_finite_losses(tmp_path, flags):
    result = run("pretrain.py", *TINY, "--epochs=1", f"--out_dir={tmp_path}", *flags)
    rows = log_rows(str(tmp_path))
    assert len(rows) == 4
    for r in rows:
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["mim_loss"], r["nce_loss"], r["grad_norm"]])))
    if "--mim_weight=0" in flags:
        assert all(r["mim_loss"] == 0 for r in rows)
    if "--nce_weight=0" in flags or "--method=beit" in flags:
        assert all(r["nce_loss"] == 0 for r in rows)
    assert ("warning: accum_steps=2" in result.stdout) == ("--accum_steps=2" in flags)


def test_tiny_run_lowers_the_mim_loss(tmp_path):
    run("pretrain.py", *TINY, "--num_images=128", "--epochs=4", "--blr=0.1", "--drop_path=0", f"--out_dir={tmp_path}")
    mim = [r["mim_loss"] for r in log_rows(str(tmp_path))]
    first, last = sum(mim[:4]) / 4, sum(mim[-8:]) / 8  # batches of 16 are noisy: average a few steps
    assert first > 2.7  # ln(16) = 2.77 at the start
    assert last < first - 0.2, mim


def test_two_processes_match_one_process(tmp_path):
    # Same global batch and no drop path, so the runs differ only by float rounding; the k-means vocabulary, each
    # process reading half of the sample, is the one process's bit for bit (else the targets would differ).
    flags = [*TINY, "--drop_path=0", MONITOR]
    run("pretrain.py", *flags, f"--out_dir={tmp_path / 'one'}")
    result = torchrun(2, "pretrain.py", *flags, f"--out_dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    vocabs = [torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["vocab"] for name in ("one", "two")]
    assert torch.equal(*vocabs)
    one, two = log_rows(str(tmp_path / "one")), log_rows(str(tmp_path / "two"))
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        for key in ("loss", "mim_loss", "nce_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (a["step"], key)
    for key, value in weights(str(tmp_path / "one")).items():
        torch.testing.assert_close(weights(str(tmp_path / "two"))[key], value, rtol=1e-3, atol=1e-4)
    # the monitor: each process encodes half of its images, rank 0 gathers them; the same rows as one process
    one, two = ([json.loads(r) for r in open(tmp_path / n / "log.jsonl") if "rankme" in r] for n in ("one", "two"))
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [0, 1, 2]
    assert one[0] == two[0]  # the same weights at epoch 0: the same features, bit for bit after float16
    for a, b in zip(one[1:], two[1:]):  # then rounding: a query or two may change its vote
        assert a["knn_by_block"] == pytest.approx(b["knn_by_block"], abs=1.0)
        assert a["rankme"] == pytest.approx(b["rankme"], rel=1e-2)


def test_torchrun_resumes_bit_for_bit_after_a_signal_to_one_process(tmp_path):
    """Two processes with their own random streams (drop path), SIGUSR1 to rank 1 alone: both stop after the same
    step and save; the relaunch ends with the weights of an uninterrupted torchrun run."""
    flags = [*TINY, "--tokenizer=random_patches"]
    result = torchrun(2, "pretrain.py", *flags, f"--out_dir={tmp_path / 'reference'}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = str(tmp_path / "stopped")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "pretrain.py", *flags, f"--out_dir={out}"]
    job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(job, out, 2)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    rank1 = next(pid for pid in workers if b"RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read())
    os.kill(int(rank1), signal.SIGUSR1)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0 and output.count("stop signal: saved") == 1, output[-3000:]
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert 2 <= saved["step"] < 8 and len(saved["rng"]) == 2 and not torch.equal(*[r["cpu"] for r in saved["rng"]])
    result = torchrun(2, "pretrain.py", *flags, f"--out_dir={out}")
    assert result.returncode == 0 and f"resuming from {out}/ckpt.pt at step {saved['step']}" in result.stdout
    assert_same_weights(weights(out), weights(str(tmp_path / "reference")))
    assert [r["step"] for r in log_rows(out)] == list(range(1, 9))


def test_eight_processes_finish_and_print_once(tmp_path):
    """The headline command's shape, torchrun --nproc_per_node=8, at toy sizes on the CPU (gloo): 2 images each."""
    result = torchrun(8, "pretrain.py", *TINY, f"--out_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == len(set(lines)) and sum("on 8 x cpu" in line for line in lines) == 1, result.stdout
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]) == 8 and len(log_rows(str(tmp_path))) == 8


def run_in_process(monkeypatch, capsys, script_main, *flags):
    """A script's main() here, for the paths that exit early (no interpreter start-up, which is most of
    such a run): (exit code, stdout, stderr). The stop-signal handlers a script installs are put back."""
    monkeypatch.setattr(sys, "argv", ["script.py", *flags])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(SystemExit) as exit_:
            script_main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    code = exit_.value.code
    return (1, out, err + code) if isinstance(code, str) else (code, out, err)


FAULTS_OF_REPEATED_BLOCKS = """
import resource, sys, torch, common
if sys.argv[1] == "keep":
    common.keep_freed_memory()
for _ in range(10):  # warm-up: the first steps' memory is new either way
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)  # a 64 MiB activation, freed at the end of its step
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and its page-fault counter")
def test_keep_freed_memory_stops_page_faults_of_steps_after_the_first():
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BLOCKS, mode], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] >= 5 * 32  # every block faults in anew: 16384 4 KiB pages, or 32 huge pages
    assert faults["keep"] * 20 < faults["default"], faults


def test_help_lists_every_flag(monkeypatch, capsys):
    import pretrain
    code, out, _ = run_in_process(monkeypatch, capsys, pretrain.main, "--help")
    assert code == 0
    for flag in ("--dataset=", "--method=", "--mim_weight=", "--tokenizer=", "--dtype=", "--override_config="):
        assert flag in out


@pytest.mark.parametrize("flags, message", [
    (["--batch_sz=8"], "unknown or malformed flag '--batch_sz=8'"),
    (["batch_size=8"], "unknown or malformed flag"),
    (["--batch_size=eight"], "--batch_size='eight' is not a valid int"),
    (["--batch_size=-16"], "must be positive"),
    (["--mask_ratio=1.5"], "--mask_ratio=1.5 must be in (0, 1)"),
    (["--mask_ratio=0.3"], "at least 0.5"),
    (["--img_size=18"], "--img_size=18 is not divisible by --patch_size=4"),
    (["--patch_size=3", "--img_size=15"], "--patch_size=3 must be even"),
    (["--vocab_size=1"], "--vocab_size=1 must be at least 2"),
    (["--vocab_size=1024"], "--tokenizer_samples=512 must be at least --vocab_size=1024"),
    (["--dataset=imagenett"], "unknown --dataset='imagenett'"),
    (["--dataset=imagenette", "--data_root=/nonexistent"], "is not a folder"),
    (["--model=huge"], "--model='huge'"),
    (["--dtype=float8"], "--dtype='float8'"),
    (["--compile=maybe"], "is not a valid bool"),
    (["--patch_size=0"], "--patch_size=0 must be positive"),  # not a division by zero
    (["--log_every=0"], "--log_every=0 must be positive"),
    (["--fraction=0"], "--fraction=0.0 must be in (0, 1]"),
    (["--workers=-1"], "--workers=-1 must be 0 or more"),
    (["--out_dir="], "--out_dir must name a folder"),  # not a KeyError: pre-training has no checkpoint to sit beside
])
def test_bad_flags_fail_with_a_message(tmp_path, monkeypatch, capsys, flags, message):
    import pretrain
    code, _, err = run_in_process(monkeypatch, capsys, pretrain.main, *TINY, f"--out_dir={tmp_path}", *flags)
    assert code != 0 and message in err, err


def test_torchrun_passes_every_flag_of_every_script_on_unchanged():
    """torchrun's own options are matched by prefix, anywhere on the line: a flag of ours that is the start of two of
    theirs (--monitor: --monitor-interval, --monitor_interval) would stop `torchrun ... pretrain.py --flag=value`."""
    import finetune
    import pretrain
    import probe
    from torch.distributed.run import get_args_parser
    for script in (pretrain, finetune, probe):
        for key in script.config:
            args = get_args_parser().parse_args(["--nproc_per_node=2", "x.py", f"--{key}=1"])
            assert args.training_script_args == [f"--{key}=1"], (script.__name__, key)
