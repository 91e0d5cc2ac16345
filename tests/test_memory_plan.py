"""The memory planner against real models: exact parameter counts, and measured CPU peaks of a training step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from o1pruner.config import recipe_names
from o1pruner.memory_plan import (
    GIB,
    ModelArch,
    layer_activation_bytes,
    plan_memory,
    trainable_params,
    weight_bytes,
)

SMALL = dict(
    hidden_size=192, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, intermediate_size=448
)


@pytest.mark.parametrize("cls", [Qwen2Config, LlamaConfig])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_a_real_model(cls, tied):
    cfg = cls(vocab_size=517, tie_word_embeddings=tied, **SMALL)
    arch = ModelArch.from_config(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    assert arch.head_params == (0 if tied else 517 * 192)
    assert arch.kv_dim == 2 * 32


def test_from_dict_equals_from_config():
    d = {"model_type": "qwen2", "vocab_size": 300, **SMALL}
    assert ModelArch.from_config(d) == ModelArch.from_config(Qwen2Config(vocab_size=300, **SMALL))


def test_trainable_counts_match_peft_and_freeze():
    import peft

    cfg = Qwen2Config(vocab_size=300, **SMALL)
    arch = ModelArch.from_config(cfg)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_config(cfg), peft.LoraConfig(r=4, target_modules="all-linear")
    )
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_params(arch, "lora", 4, 0) == lora
    base = AutoModelForCausalLM.from_config(cfg)
    last = base.model.layers[-2:]
    freeze = sum(p.numel() for p in last.parameters()) + base.model.norm.weight.numel()
    assert trainable_params(arch, "freeze", 0, 2) == freeze
    assert trainable_params(arch, "full", 0, 0) == arch.total_params


def test_qlora_weight_bytes_match_bitsandbytes_footprint(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    cfg = Qwen2Config(vocab_size=512, **{**SMALL, "hidden_size": 256, "intermediate_size": 512})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head"],
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=q, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    measured = model.get_memory_footprint()
    planned = weight_bytes(ModelArch.from_config(cfg), "qlora")
    assert planned == pytest.approx(measured, rel=0.15)


_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from benchmarks.common import measure_peak
    tokens, ckpt = int(sys.argv[1]), sys.argv[2] == "1"
    cfg = Qwen2Config(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=1408, vocab_size=1000, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 1000, (1, tokens))
    model.model(input_ids=ids[:, :16]).last_hidden_state.pow(2).mean().backward()  # parameter grads exist
    step = lambda: model.model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    print(json.dumps({"extra": measure_peak(step, torch.device("cpu"))[0]}))
    """
)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_measured_cpu_peak(checkpointing):
    """fp32 on the CPU (act_bytes 4), one causal sequence of 4096 tokens: the planned activation peak of a
    micro-batch is within [0.7, 1.4] of the measured resident-memory rise of a real forward + backward."""
    tokens = 4096
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tokens), "1" if checkpointing else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    cfg = Qwen2Config(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1408, vocab_size=1000,
    )  # fmt: skip
    arch = ModelArch.from_config(cfg)
    layer = layer_activation_bytes(arch, tokens, 4.0)
    if checkpointing:
        planned = arch.num_layers * tokens * arch.hidden_size * 4.0 + 3 * layer
    else:
        planned = (arch.num_layers + 2) * layer
    assert 0.7 <= measured / planned <= 1.4, (measured, planned)


R1_7B = dict(
    model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
)  # fmt: skip


def test_plan_names_the_stage_the_budget_and_the_knob():
    arch = ModelArch.from_config(R1_7B)
    opts = {"mode": "qlora", "micro_batch_tokens": 8192, "sampling_backend": "hf", "sampling_batch_size": 64}
    plan = plan_memory(arch, opts, 24)
    assert [s.name for s in plan.failures()] == ["sample"]
    msg = plan.error_message()
    assert "'sample'" in msg and "24.0 GiB" in msg and "sampling_batch_size" in msg and "kv cache" in msg
    small = plan_memory(arch, {**opts, "sampling_batch_size": 4}, 24)
    assert small.fits(), small.table()
    train = next(s for s in small.stages if s.name == "train")
    assert 8 * GIB < train.peak < 16 * GIB  # 4-bit 7B + one 8k-token micro-batch


def test_packed_sdpa_mask_grows_quadratically_and_flash_removes_it():
    arch = ModelArch.from_config(R1_7B)

    def attention(attn, tokens):
        opts = {"mode": "qlora", "micro_batch_tokens": tokens, "attn_implementation": attn}
        return next(s for s in plan_memory(arch, opts, 80).stages if s.name == "train").parts["attention"]

    assert attention("sdpa", 32768) == pytest.approx(4 * attention("sdpa", 16384))
    assert attention("flash_attention_2", 32768) == 0.0


def test_vllm_stage_fits_its_share_and_quantization_fixes_it():
    qwq = {**R1_7B, "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40,
           "num_key_value_heads": 8, "intermediate_size": 27648}  # fmt: skip
    arch = ModelArch.from_config(qwq)
    opts = {
        "mode": "qlora",
        "sampling_backend": "vllm",
        "gpu_memory_utilization": 0.8,
        "max_new_tokens": 8192,
    }
    sample = lambda o: next(s for s in plan_memory(arch, o, 80).stages if s.name == "sample")
    plan = plan_memory(arch, opts, 80)
    assert "sample" in [s.name for s in plan.failures()]
    assert "quantization" in plan.error_message()
    assert sample({**opts, "quantization": "fp8"}).peak < 0.8 * 80 * GIB


def test_plan_command_prints_every_stage_and_exits_2_when_one_does_not_fit():
    from cli_runs import run_cli

    ok = run_cli("plan", "--recipe", "r1-distill-qwen-7b", "--gpu-memory-gb", "24", timeout=300)
    assert ok.returncode == 0, ok.stderr
    for stage in ("sample", "score", "train", "eval"):
        assert f"\n{stage} " in ok.stdout
    bad = run_cli(
        "plan",
        "--recipe",
        "r1-distill-qwen-7b",
        "--gpu-memory-gb",
        "24",
        "--eval-batch-size",
        "64",
        timeout=300,
    )
    assert bad.returncode == 2
    assert "'eval'" in bad.stderr and "eval_batch_size" in bad.stderr and "24.0 GiB" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_shipped_recipe_fits_the_card_it_names(recipe):
    """Each recipe names a card in cards.yaml and a GPU count; planned on that card, every stage fits."""
    from importlib.resources import files

    import yaml

    from o1pruner.config import resolve_config
    from o1pruner.memory_plan import card_memory_gb, plan_run

    raw = yaml.safe_load((files("o1pruner") / "recipes" / f"{recipe}.yaml").read_text())
    assert raw["card"] and raw["num_gpus"] >= 1, "a shipped recipe names its card and GPU count"
    cfg = resolve_config(recipe=recipe)
    assert raw["model"] == cfg.model
    plan = plan_run(cfg.to_dict())  # no GPU here: the recipe's card
    assert plan.budget == card_memory_gb(raw["card"]) * GIB and plan.num_gpus == raw["num_gpus"]
    assert plan.fits(), plan.table()


def test_more_gpus_with_fsdp_shard_training_only():
    arch = ModelArch.from_config(R1_7B)
    opts = {"mode": "full", "optimizer": "adamw", "micro_batch_tokens": 8192, "fsdp": True}
    stage = lambda o, n, name: next(
        s for s in plan_memory(arch, {**o, "num_gpus": n}, 80).stages if s.name == name
    )
    one, eight = stage(opts, 1, "train"), stage(opts, 8, "train")
    for part in ("weights", "gradients", "optimizer"):  # full: every weight is trained (fp32)
        assert eight.parts[part] == pytest.approx(one.parts[part] / 8)
    assert eight.parts["checkpoints"] == one.parts["checkpoints"]  # activations are per GPU
    assert not plan_memory(arch, opts, 79.1).fits()
    assert plan_memory(arch, {**opts, "num_gpus": 8}, 79.1).fits()
    ddp = {**opts, "fsdp": False}  # data parallel: every GPU holds everything
    assert stage(ddp, 8, "train").parts == stage(ddp, 1, "train").parts
    # every process loads the whole model in 16 bits, and scores with it, before FSDP2 shards it
    assert stage(opts, 8, "score").parts["weights"] == weight_bytes(arch, "none")
    assert stage(opts, 1, "score").parts["weights"] == weight_bytes(arch, "full")
    freeze = {**opts, "mode": "freeze", "freeze_last_n_layers": 4}
    w = lambda n: stage(freeze, n, "train").parts["weights"]
    assert w(4) == pytest.approx(weight_bytes(arch, "freeze", 4) / 4)  # frozen layers are sharded too


def test_a_recipe_on_a_card_too_small_exits_2_with_the_numbers():
    from cli_runs import run_cli

    bad = run_cli("plan", "--recipe", "qwq-32b-preview-qlora", "--card", "24gb", timeout=300)
    assert bad.returncode == 2, bad.stdout
    assert "budget: 22.0 GiB (card 24gb)" in bad.stdout
    assert "stage 'train' needs ~" in bad.stderr and "over its 22.0 GiB" in bad.stderr
    assert "quantization" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_that_does_not_fit_the_gpu_stops_before_loading(tmp_path, monkeypatch):
    """On a (pretended) 0.5 GiB GPU the run refuses with the numbers; with no GPU the check is skipped."""
    from helpers import make_tiny_model

    from o1pruner import memory_plan
    from o1pruner.config import resolve_config
    from o1pruner.options import ConfigError
    from o1pruner.pipeline import Pipeline

    model = make_tiny_model(tmp_path / "m")
    cfg = resolve_config(overrides={"model": str(model), "output_dir": str(tmp_path / "run")})
    pipe = Pipeline(cfg)
    pipe.check_memory_plan(["train"])  # no GPU here: nothing to check
    monkeypatch.setattr(memory_plan, "visible_gpu_memory_gb", lambda: 0.5)
    monkeypatch.setattr(pipe.models, "reference", lambda: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=r"does not fit this GPU \(0\.5 GiB\)"):
        pipe.check_memory_plan(["train"])
