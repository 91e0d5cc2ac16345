"""The benchmark harness on the CPU: tiny shapes, CSV rows, the plots and tables made from them.

GPU numbers come from benchmarks/device_check.sh on a lent GPU; here only the machinery is checked, plus
the fact that every provider computes the same loss on the same inputs.
"""

from __future__ import annotations

import csv
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from benchmarks import bench_e2e, bench_kernels, gpu_check, phases, plot, side_by_side
from benchmarks.common import MIN_REPS, CsvLog, measure_peak


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_parse_tokens_and_choices():
    assert bench_kernels.parse_tokens("2k, 4k,8192,0.5k") == [2048, 4096, 8192, 512]
    with pytest.raises(SystemExit, match="4q"):
        bench_kernels.parse_tokens("4q")
    with pytest.raises(SystemExit, match="--providers"):
        bench_kernels.parse_choice("naive,trl", bench_kernels.PROVIDERS, "--providers")


def test_linear_extrapolation_is_exact_on_a_line():
    assert bench_e2e._linear_extrapolate([(2, 5.0), (4, 9.0)], 64) == pytest.approx(129.0)
    assert bench_e2e._linear_extrapolate([(1, 1.0), (2, 2.1), (3, 2.9)], 3) == pytest.approx(3.0, abs=0.05)


def test_csv_log_refuses_a_file_with_other_columns(tmp_path):
    path = tmp_path / "x.csv"
    CsvLog(path, ["a", "b"]).write({"a": 1, "b": 2.5})
    CsvLog(path, ["a", "b"]).write({"a": 3})
    assert _rows(path) == [{"a": "1", "b": "2.5"}, {"a": "3", "b": ""}]
    with pytest.raises(SystemExit, match="differs"):
        CsvLog(path, ["a", "c"])
    with pytest.raises(KeyError, match="zzz"):
        CsvLog(path, ["a", "b"]).write({"zzz": 1})


def test_kernel_bench_quick_rows_agree_and_plot(tmp_path):
    out = tmp_path / "kernels.csv"
    assert bench_kernels.main(["--quick", "--out", str(out), "--strict", "--rep-ms", "1"]) == 0
    rows = _rows(out)
    # 2 N x (logprobs: 2 providers + loss: 2 providers x 2 levels)
    assert len(rows) == 2 * (2 + 4)
    assert {r["provider"] for r in rows} == {"ours-torch", "naive"}
    assert {r["status"] for r in rows} == {"ok"}, [(r["provider"], r["status"], r["note"]) for r in rows]
    for r in rows:
        assert r["device"] == "cpu" and r["head"] == "tiny" and r["H"] == "64" and r["V"] == "1003"
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert int(r["reps"]) >= MIN_REPS
        # efficiency counts the valid (unmasked) tokens only: count them on the inputs themselves
        x = bench_kernels.make_inputs(
            int(r["N"]), 64, 1003, int(r["seq_len"]), torch.float32, torch.device("cpu"), 0
        )
        valid = int((x.labels != bench_kernels.IGNORE_INDEX).sum())
        assert int(r["valid_tokens"]) == valid < int(r["N"])
        flops = (4 if r["mode"] == "loss-fwd-bwd" else 2) * valid * 64 * 1003
        assert float(r["flops"]) == pytest.approx(flops)
        assert float(r["ratio_to_ceiling"]) == pytest.approx(
            float(r["median_ms"]) / (flops / (float(r["ceiling_tflops"]) * 1e12) * 1e3), rel=1e-3
        )
    # the fused torch backend and the naive path compute the same loss / log-probs on the same inputs
    by = {(r["provider"], r["mode"], r["level"], r["N"]): float(r["check_value"]) for r in rows}
    for (provider, mode, level, n), value in by.items():
        if provider == "ours-torch":
            assert math.isclose(value, by[("naive", mode, level, n)], rel_tol=2e-3, abs_tol=2e-3), (
                mode,
                level,
            )

    md = tmp_path / "summary.md"
    assert plot.main([str(out), "--out-dir", str(tmp_path), "--md", str(md)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["kernels-logprobs-fwd.png", "kernels-loss-fwd-bwd-sequence_geomean.png",
                    "kernels-loss-fwd-bwd-token.png"]  # fmt: skip
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| N | ours-torch | naive |" in text
    assert "| 256 |" in text and "Targets at the 7b head" in text


def test_cce_provider_matches_naive_where_it_imports():
    pytest.importorskip("cut_cross_entropy")
    x = bench_kernels.make_inputs(64, 16, 301, 32, torch.float32, torch.device("cpu"), 3)
    x.hidden.requires_grad_(True)
    values = {}
    for provider in ("naive", "cce"):
        for mode in ("logprobs-fwd", "loss-fwd-bwd"):
            fn = bench_kernels.build_case(provider, mode, "sequence_geomean", x, torch.device("cpu"))
            x.hidden.grad = None
            values[provider, mode] = fn()
            if mode == "loss-fwd-bwd":
                values[provider, "grad"] = x.hidden.grad.clone()
    for key in ("logprobs-fwd", "loss-fwd-bwd", "grad"):
        torch.testing.assert_close(values["cce", key], values["naive", key], rtol=1e-4, atol=1e-5)


def test_phase_split_names_the_two_gemms_by_shape():
    assert phases.classify("aten::mm", [[7, 64], [64, 1003], [7, 1003]], 64, 1003) == "gemm1"
    assert phases.classify("aten::mm", [[7, 1003], [1003, 64]], 64, 1003) == "gemm2"
    assert phases.classify("aten::addmm", [[1003, 64], [1003, 7], [7, 64]], 64, 1003) is None
    assert phases.classify("aten::mm", [[7, 5], [5, 9]], 64, 1003) is None
    assert phases.classify("aten::logsumexp", [[7, 1003]], 64, 1003) is None
    from o1pruner.kernels import linear_ppo_loss

    x = bench_kernels.make_inputs(96, 64, 1003, 32, torch.float32, torch.device("cpu"), 1)
    x.hidden.requires_grad_(True)

    def call():
        out = linear_ppo_loss(x.hidden, x.weight, x.labels, x.old_logps, x.advantages, seq_ids=x.seq_ids,
                              backend="torch", chunk_size=16)  # fmt: skip
        out.loss.backward()

    split = phases.phase_breakdown(call, torch.device("cpu"), 64, 1003)
    assert set(split) == set(phases.PHASES)
    assert split["gemm1_ms"] > 0 and split["gemm2_ms"] > 0 and split["row_ms"] > 0


def test_cpu_peak_memory_sees_a_large_temporary():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs")
    peak, _ = measure_peak(lambda: torch.ones(64, 2**20).sum(), torch.device("cpu"))  # 256 MiB
    assert 200 * 2**20 <= peak <= 400 * 2**20


def test_gpu_check_loss_scale_does_not_cancel():
    """Two sequences with opposite advantages: the loss is ~0, the scale is mean_i |l_i|."""
    labels = torch.tensor([5, 6, -100, 7, 8])
    seq_ids = torch.tensor([0, 0, 0, 1, 1])
    logp = torch.tensor([-1.0, -2.0, 0.0, -1.5, -1.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    terms = gpu_check.sequence_terms(logp, logp, adv, labels, seq_ids, "sequence_geomean")
    torch.testing.assert_close(terms, torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert gpu_check.loss_from_logps(logp, logp, adv, labels, seq_ids, "sequence_geomean") == 0.0
    assert gpu_check.loss_scale(logp, logp, adv, labels, seq_ids, "sequence_geomean") == 1.0


def test_side_by_side_ratios_summary_and_a_tiny_run(tmp_path):
    with pytest.raises(SystemExit, match="HEAD:N"):
        side_by_side.parse_cases("1.5b:many")
    base = {"head": "1.5b", "N": "1024", "dtype": "fp32", "status": "ok", "note": "", "reps": "3"}
    rows = [
        dict(base, provider="ours-torch", median_ms="300", p20_ms="290", p80_ms="320", peak_extra_mib="40",
             gemm1_ms="100", row_ms="90", gemm2_ms="100", other_ms="10"),
        dict(base, provider="naive", median_ms="400", p20_ms="390", p80_ms="410", peak_extra_mib="1800",
             gemm1_ms="", row_ms="", gemm2_ms="", other_ms=""),
        dict(base, provider="liger-grpo", status="unavailable", note="liger_kernel does not import"),
    ]  # fmt: skip
    rt = side_by_side.ratios(rows, "ours-torch")
    assert rt["naive_time"] == pytest.approx(0.75) and rt["naive_memory"] == pytest.approx(40 / 1800)
    assert math.isnan(rt["liger_time"])
    text = side_by_side.summary(rows, "ours-torch", "python -m benchmarks.side_by_side", ("1.0/2", "1.1/2"))
    assert "| ours-torch time / naive | 0.75 | <= 1.0 | yes |" in text
    assert "| ours-torch time / liger-grpo | nan | <= 0.8 | - |" in text
    assert "| liger-grpo | unavailable |" in text and "100/90/100/10" in text
    out = tmp_path / "sbs.csv"
    argv = ["--cases", "tiny:64", "--dtypes", "fp32", "--providers", "ours-torch,naive", "--min-reps", "2",
            "--seq-len", "32", "--out", str(out)]  # fmt: skip
    assert side_by_side.main(argv) == 0
    got = _rows(out)
    assert [r["provider"] for r in got] == ["ours-torch", "naive"] and {r["status"] for r in got} == {"ok"}
    assert got[0]["gemm1_ms"] and not got[1]["gemm1_ms"]
    assert "## tiny head (H=64, V=1003), N=64, fp32" in out.with_suffix(".md").read_text()


def test_device_check_runs_liger_last_and_fits_its_budget():
    script = (Path(bench_kernels.__file__).parent / "device_check.sh").read_text().replace("\\\n", " ")
    phases_ = re.findall(r"^phase (\S+) (\d+) (.*)$", script, flags=re.M)
    assert sum(int(limit) for _, limit, _ in phases_) <= 480
    names = [name for name, _, _ in phases_]
    liger = [i for i, (_, _, cmd) in enumerate(phases_) if "liger-grpo" in cmd]
    heads_32b = [i for i, (_, _, cmd) in enumerate(phases_) if "32b" in cmd and "liger-grpo" not in cmd]
    assert liger == [len(names) - 2] and names[-1] == "plot"  # Liger, then only the plots
    assert heads_32b and max(heads_32b) < liger[0]
    assert "tests/kernels" in script


def test_out_of_memory_is_a_row_and_stops_larger_n(tmp_path, monkeypatch):
    import torch

    real = bench_kernels.build_case

    def build_case(provider, mode, level, x, device):
        if provider == "naive" and x.hidden.shape[0] >= 64:

            def boom():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

            return boom
        return real(provider, mode, level, x, device)

    monkeypatch.setattr(bench_kernels, "build_case", build_case)
    out = tmp_path / "k.csv"
    argv = ["--quick", "--out", str(out), "--tokens", "32,64,128", "--modes", "logprobs-fwd", "--rep-ms", "1"]
    assert bench_kernels.main(argv) == 0
    status = {(r["provider"], r["N"]): (r["status"], r["note"]) for r in _rows(out)}
    assert status[("naive", "32")] == ("ok", "")
    assert status[("naive", "64")] == ("oom", "OutOfMemoryError")
    assert status[("naive", "128")] == ("oom", "not run: out of memory at N=64")
    assert status[("ours-torch", "128")][0] == "ok"


def test_e2e_bench_quick_step_and_plot(tmp_path):
    out = tmp_path / "e2e.csv"
    assert bench_e2e.main(["--quick", "--out", str(out), "--strict"]) == 0
    rows = _rows(out)
    assert [(r["loss"], r["status"]) for r in rows] == [("ours", "ok"), ("naive", "ok")], rows
    for r in rows:
        assert r["model"] == "tiny" and r["extrapolated"] == "false" and r["quant"] == "nf4"
        assert int(r["trainable_params"]) > 0
        assert float(r["tokens_per_s"]) == pytest.approx(128 / float(r["step_s"]), rel=1e-3)
    assert plot.main([str(out), "--out-dir", str(tmp_path), "--md", str(tmp_path / "e2e.md")]) == 0
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tiny | 2 | 128 | ours |" in (tmp_path / "e2e.md").read_text()


@pytest.mark.parametrize(("name", "billions"), [("qwen2.5-7b", 7.6156), ("qwq-32b", 32.7639)])
def test_model_configs_have_the_real_parameter_counts(name, billions):
    """The written-out configs give the published sizes (7.61B, 32.76B), counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**bench_e2e.MODEL_CONFIGS[name]))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=1e-3)


def test_device_check_commands_parse(capsys):
    """Every benchmark command of device_check.sh is valid (flags, heads, token counts), run as --dry-run."""
    script = (Path(bench_kernels.__file__).parent / "device_check.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r"\$PY -m benchmarks\.(bench_kernels|bench_e2e)([^\n]*)", script)
    assert len(calls) >= 6
    for module, rest in calls:
        main = {"bench_kernels": bench_kernels.main, "bench_e2e": bench_e2e.main}[module]
        assert main([*shlex.split(rest), "--dry-run", "--device", "cpu"]) == 0, (module, rest)
    plan = capsys.readouterr().out
    assert "plan: 7b H,V=(3584, 152064) loss-fwd-bwd N=16384 liger-grpo" in plan
    assert "plan: qwq-32b layers [2, 4] N=[8192]" in plan


def test_gpu_check_quick_passes_on_the_torch_backend(tmp_path):
    out = tmp_path / "check.csv"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 * 3  # float32 and bfloat16 x three importance levels
    assert all(r["status"] in ("ok", "warn") for r in rows), rows
    assert all(r["status"] == "ok" for r in rows if r["dtype"] == "float32" or r["level"] != "sequence")


def test_plot_skips_missing_files_but_not_all(tmp_path):
    with pytest.raises(SystemExit, match="none of the CSV"):
        plot.main([str(tmp_path / "absent.csv"), "--out-dir", str(tmp_path)])
