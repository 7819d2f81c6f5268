"""The monitor (features.Monitor): RankMe against features of known rank, the collapse warning on a made-up
history, k-NN rows that probe.py reproduces from the checkpoint, and training the monitor leaves unchanged."""
import json
import os
import shutil

import pytest
import torch

from features import collapse_warning, rankme
from test_pretrain import MONITOR, TINY, assert_same_weights, log_rows, run, weights


def monitor_rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "rankme" in row]


def test_rankme_is_the_rank_of_features_of_known_rank():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    equal = torch.linalg.qr(torch.randn(500, 64, generator=g))[0][:, :8] @ basis[:, :8].T  # 8 equal singular values
    assert rankme(equal) == pytest.approx(8.0, rel=1e-3)
    random_rank_8 = torch.randn(500, 8, generator=g) @ torch.randn(8, 64, generator=g)  # unequal: at most 8
    assert 6.0 < rankme(random_rank_8) <= 8.0
    assert rankme(torch.randn(500, 64, generator=g)) > 50  # full rank, nearly equal values
    assert rankme(torch.randn(1, 64, generator=g).repeat(500, 1)) == pytest.approx(1.0, abs=1e-2)  # one vector


def test_collapse_warns_once_per_fall_below_half_the_best():
    history = [10.0, 12.0, 11.0, 5.0, 4.0, 7.0, 3.0, 2.0, 20.0, 9.0]
    warned = [i for i in range(len(history)) if collapse_warning(history[: i + 1])]
    assert warned == [3, 6, 9]  # 5 < 12 / 2; not 4 (still below); 7 recovers; 3 falls again; 9 < 20 / 2


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("monitored"))
    result = run("pretrain.py", *TINY, MONITOR, f"--out_dir={out}")
    return out, result.stdout


def test_one_row_per_epoch_whose_knn_probe_py_gives_again(monitored, tmp_path):
    out, stdout = monitored
    rows = monitor_rows(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["step"] for r in rows] == [0, 4, 8]
    assert all(len(r["knn_by_block"]) == 12 and r["knn"] == r["knn_by_block"][-1] and r["rankme"] > 1 for r in rows)
    assert "monitor: 64 train and 200 val images" in stdout and "epoch 2/2 | k-NN" in stdout
    history = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["monitor"]  # the collapse warning's
    assert history == [r["rankme"] for r in rows[1:]]  # trained rows only: random init is no baseline
    # the last row was measured on the weights the final checkpoint holds: probe.py on the same subsets agrees
    run("probe.py", f"--init={out}/ckpt.pt", "--num_images=64", "--fraction=200", "--batch_size=16", "--workers=0",
        "--probe_epochs=1", f"--out_dir={tmp_path}")
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["knn"] == rows[-1]["knn_by_block"]


def test_the_monitor_does_not_change_training(monitored, tmp_path):
    out, _ = monitored
    run("pretrain.py", *TINY, f"--out_dir={tmp_path}")  # TINY: --monitor_every=0
    assert_same_weights(weights(str(tmp_path)), weights(out))
    assert [r["loss"] for r in log_rows(str(tmp_path))] == [r["loss"] for r in log_rows(out)]
    assert monitor_rows(str(tmp_path)) == []


def test_report_tables_and_draws_the_monitor_of_each_run(monitored, tmp_path, capsys):
    from report import report
    out, _ = monitored
    for name in ("a", "b"):  # the layout of make exp-*: <row>/pretrain/log.jsonl
        os.makedirs(tmp_path / name / "pretrain")
        with open(os.path.join(out, "log.jsonl")) as f, open(tmp_path / name / "pretrain" / "log.jsonl", "w") as g:
            g.write(f.read())
    os.makedirs(tmp_path / "c" / "ckpt_probe")  # probe.py's layout: <ckpt>_probe/ beside the run's log.jsonl
    shutil.copy(os.path.join(out, "log.jsonl"), tmp_path / "c" / "log.jsonl")
    (tmp_path / "c" / "ckpt_probe" / "results.json").write_text(json.dumps(dict(linear=[40.0], knn=[30.0],
                                                                                best_linear=40.0, best_layer=1)))
    report(str(tmp_path))
    first, last = monitor_rows(out)[0], monitor_rows(out)[-1]
    printed = capsys.readouterr().out
    knn, rank = f"{first['knn']:.1f} -> {last['knn']:.1f}", f"{first['rankme']:.1f} -> {last['rankme']:.1f}"
    assert f"| a | 2 | {knn} | {rank} |" in printed
    saved = json.loads((tmp_path / "report.json").read_text())["monitor"]
    assert list(saved) == ["c/ckpt", "a", "b"] and saved["a"] == monitor_rows(out)  # c's log once, not twice
    assert (tmp_path / "monitor.png").exists()
