"""Smoke test of ixc25-bench --quick: every contender runs, the JSON carries the reported fields."""
import json

from scripts.bench import decode_weight_bytes, main, QUICK_CFG
from ixc25_ms.config import IXCConfig


def test_decode_weight_bytes():
    cfg = IXCConfig.from_dict(QUICK_CFG)
    h, i, v, layers = 128, 256, 1024, 2
    qkv = (4 + 2 * 2) * 32
    assert decode_weight_bytes(cfg, 4) == 4 * (layers * (h * qkv + h * h + 3 * h * i) + v * h)


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--repeats", "1", "--new-tokens", "3", "--image", "560x560", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["contenders"]) == {"ms-pynative", "ms-jit", "torch-ref"}
    assert res["bandwidth_GBps"] > 0 and res["decode_bound_tok_s"] > 0
    for c in res["contenders"].values():
        for k in ("vit_ms_per_view", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "decode_pct_of_bound"):
            assert c[k] is not None, k
    assert "compile_s_estimate" in res["contenders"]["ms-jit"]
    ref = res["contenders"]["torch-ref"]["decode_tok_s_per_round"]
    jit = res["contenders"]["ms-jit"]
    assert len(ref) == 1 and jit["decode_vs_torch_per_round"] == [jit["decode_tok_s_per_round"][0] / ref[0]]
    assert res["greedy_ids_agree_first8"]
    # paired decode (--quick: chunks of 2 steps): the 2 decode steps in one chunk each, the same ids as the rounds
    assert res["paired_chunk_steps"] == 2
    for c in res["contenders"].values():
        assert len(c["paired_decode_steps_s"]) == 2 and c["paired_ids_equal_rounds"]
    steps = {n: res["contenders"][n]["paired_decode_steps_s"] for n in ("ms-jit", "torch-ref")}
    assert jit["decode_vs_torch_paired_chunks"] == [sum(steps["torch-ref"]) / sum(steps["ms-jit"])]
    # one chunk: bandwidth sampled before and after it; its bound uses the higher of the two
    bw = res["paired_bandwidth_samples_GBps"]
    assert len(bw) == 2 and min(bw) > 0
    bound = max(bw) * 1e9 / res["decode_weight_bytes_per_token"]
    for n, st in steps.items():
        want = 100 * (len(st) / sum(st)) / bound
        assert abs(res["contenders"][n]["decode_pct_of_bound_paired_chunks"][0] - want) < 1e-9 * want
    assert "ms-jit" in capsys.readouterr().out


def test_bench_tower_contenders_compute_the_same_loss(capsys):
    """scripts/bench_tower.py at a toy width: both contenders run in their own process on the same seeded case,
    their losses agree (main fails otherwise) and the ratio printed is the one of the printed step times."""
    import re
    from scripts.bench_tower import main as bench_tower
    assert bench_tower(["--width", "64", "--layers", "1", "--batch", "2", "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-5 * losses[1], out
    ms_s, pt_s, ratio = (float(x) for x in re.search(
        r"ms-jit ([\d.]+) s, torch-ref ([\d.]+) s a step; speed vs torch-ref ([\d.]+)x", out).groups())
    assert abs(ratio - pt_s / ms_s) <= ratio * 5e-5 * (1 / pt_s + 1 / ms_s) + 5e-4, out  # printed rounded
