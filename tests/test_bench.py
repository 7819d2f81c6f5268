"""bench.py runs end to end on tiny settings and writes every row (speed itself is never asserted)."""
import json

from test_pretrain import run


def test_bench_prints_and_saves_every_row(tmp_path):
    result = run("bench.py", "--model=tiny", "--img_size=32", "--patch_size=4", "--batch_size=4", "--vocab_size=64",
                 "--warmup=1", "--steps=2", "--nce_sizes=64", "--dtype=float32", "--loader=False",
                 "--probe_features=2000,2,16",
                 f"--out={tmp_path / 'bench.json'}")  # the loader rows: test_gpu_check.py
    saved = json.loads((tmp_path / "bench.json").read_text())
    names = [row[0] for row in saved["rows"]]
    for name in ("dense matmul (float32)", "SplitMask step", "BEiT step", "SplitMask / BEiT step time",
                 "tokenization share of the step", "our ViT / nn.TransformerEncoderLayer",
                 "InfoNCE N=64: fused / naive", "probe: 2,000 x 2 x 16 features", "probe: linear probes, one epoch",
                 "probe: k-NN of 1,000 queries, one block"):
        assert name in names and name in result.stdout, name
    assert [r["n"] for r in saved["nce"]] == [64] and all(r["fused_s"] > 0 for r in saved["nce"])
