"""scripts/bench_memory.py: the storage counter, the fake-tensor step against a real one, the search."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from fixtures import script_module

ROOT = Path(__file__).resolve().parent.parent
bench_memory = script_module("bench_memory")


def _config(model: str, batch: int = 1, *overrides: str):
    args = argparse.Namespace(config=None, model=ROOT / "assets" / "models" / model,
                              set=["data.resolution=64", *overrides])
    return bench_memory._load(args, batch)


def _meta_pipeline(model: str):
    from diffalign.diffusion import load_pipeline

    with torch.device("meta"):
        return load_pipeline(ROOT / "assets/models" / model, random_init=True)


def test_live_storage_counts_each_storage_once_until_it_is_freed():
    with bench_memory.LiveStorage() as live:
        a = torch.empty(256)  # 1 KiB
        view = a.view(16, 16)
        view.add_(1)  # in place: no new storage
        b = torch.empty(512)  # 2 KiB
        assert live.current == 3072
        del a, view  # the last references: a's KiB is freed
        assert live.current == 2048
        c = torch.empty(128)  # 0.5 KiB
        assert live.current == 2048 + 512
    assert live.peak == 3072
    del b, c


@pytest.mark.slow
@pytest.mark.parametrize("model,overrides", [
    ("tiny-sd15", ["train.lora_rank=0"]),
    ("tiny-sdxl", ["train.lora_rank=4", "model.gradient_checkpointing=true", "train.ema_decay=0.9"]),
])
def test_the_fake_tensor_step_counts_what_the_real_step_allocates(model, overrides):
    """Same step, fake storage versus real CPU tensors: the same bytes at every moment, so the same peak."""
    fake = bench_memory.training_step_memory(_config(model, 2, *overrides), fake=True)
    real = bench_memory.training_step_memory(_config(model, 2, *overrides), fake=False)
    assert fake == real
    assert fake["activations_gb"] > 0 and fake["peak_gb"] > fake["weights_gb"]


@pytest.mark.slow
@pytest.mark.parametrize("model,overrides", [
    ("tiny-sd15", ["objective.name=diffusion_kto", "objective.loss=kto", "train.lora_rank=4"]),
    ("tiny-hunyuanvideo15", ["data.frames=5", "data.resolution=32", "train.lora_rank=4"]),
])
def test_a_step_that_selects_by_a_masks_values_counts_what_the_real_step_allocates(model, overrides):
    """KTO selects its desirable and undesirable rows by their labels; HunyuanVideo 1.5's transformer puts each
    sample's valid text and image tokens first by their attention masks. Fake tensors cannot size such selections;
    the masks hold real values here, and the estimate sizes by them: the same bytes as the real step."""
    fake = bench_memory.training_step_memory(_config(model, 2, *overrides), fake=True)
    real = bench_memory.training_step_memory(_config(model, 2, *overrides), fake=False)
    assert fake == real and fake["activations_gb"] > 0


@pytest.mark.slow
def test_large_real_tensors_become_fake_with_the_same_bytes(monkeypatch):
    """HunyuanVideo 1.5's (batch, 1, tokens, tokens) attention mask is built from real token masks in every block:
    with the threshold low enough that the tiny model's masks are made fake, its step still counts exactly what the
    real step allocates."""
    from diffalign.train.memory import RealAndFakeTensors

    overrides = ["data.frames=5", "data.resolution=32", "train.lora_rank=4"]
    real = bench_memory.training_step_memory(_config("tiny-hunyuanvideo15", 2, *overrides), fake=False)
    made_fake = []
    shapes_only = RealAndFakeTensors._shapes_only

    def recorded(self, func, args, kwargs):
        out = shapes_only(self, func, args, kwargs)
        if isinstance(out, torch.Tensor) and out.numel() >= self.large:
            made_fake.append(func)
        return out

    # above the (batch, 729, 1152) image tokens, whose values the transformer reads (zeros: text to video)
    monkeypatch.setattr(RealAndFakeTensors, "large", 65536)
    monkeypatch.setattr(RealAndFakeTensors, "_shapes_only", recorded)
    assert bench_memory.training_step_memory(_config("tiny-hunyuanvideo15", 2, *overrides), fake=True) == real
    assert torch.ops.aten.repeat.default in made_fake  # the mask's repeat over the tokens, at least


def test_masked_indexing_of_fake_tensors_is_sized_by_a_real_masks_values_and_refused_for_a_fake_mask():
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor, FakeTensorMode

    from diffalign.train.memory import RealAndFakeTensors

    with FakeTensorMode(allow_non_fake_inputs=True):  # as the estimate gives models fake storage
        x, fake_mask = torch.empty(4, 3, 5), torch.empty(4, 3, dtype=torch.bool)
    mask = torch.tensor([[True, False, True]] * 3 + [[False] * 3])
    with RealAndFakeTensors():
        assert x[mask].shape == (6, 5) and x[~mask].shape == (6, 5) and x[:, mask[0]].shape == (4, 2, 5)
        x[mask] = 0.0  # index_put_ by the same mask
        with pytest.raises(DynamicOutputShapeException):
            x[fake_mask]
        small, large = torch.ones(10, dtype=torch.bool), torch.ones(1, 2**12, dtype=torch.bool)
        assert not isinstance(small.repeat(10, 1), FakeTensor)  # a small real result stays real, values and all
        big = large.repeat(2**12, 1)  # 2**24 elements: shapes only
        assert isinstance(big, FakeTensor) and big.shape == (2**12, 2**12)


@pytest.mark.slow
def test_memory_grows_with_the_batch_and_checkpointing_saves_activations():
    one, four = (bench_memory.training_step_memory(_config("tiny-sdxl", b)) for b in (1, 4))
    assert four["weights_gb"] == one["weights_gb"]
    assert 3.0 < four["activations_gb"] / one["activations_gb"] < 4.5
    checkpointed = bench_memory.training_step_memory(_config("tiny-sdxl", 4, "model.gradient_checkpointing=true"))
    assert checkpointed["activations_gb"] < 0.8 * four["activations_gb"]


@pytest.mark.slow
def test_bf16_lora_counts_the_frozen_base_at_two_bytes_and_the_adapters_at_four():
    fp32 = bench_memory.training_step_memory(_config("tiny-sd15", 1, "train.lora_rank=4"))
    bf16 = bench_memory.training_step_memory(_config("tiny-sd15", 1, "train.lora_rank=4", "train.mixed_precision=bf16"))
    assert bf16["trained_weights_gb"] == fp32["trained_weights_gb"]
    pipe = _meta_pipeline("tiny-sd15")
    halved = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())  # the VAE stays fp32
    assert (fp32["weights_gb"] - bf16["weights_gb"]) * 2**30 == 2 * halved


@pytest.mark.slow
def test_precompute_leaves_the_text_encoder_and_vae_off_the_gpu():
    kept = bench_memory.training_step_memory(_config("tiny-sd15", 1))
    offloaded = bench_memory.training_step_memory(_config("tiny-sd15", 1, "data.precompute=true",
                                                          "data.cache_dir=never-written"))
    pipe = _meta_pipeline("tiny-sd15")
    encoders = sum(t.nbytes for m in (pipe.text_encoder, pipe.vae) for t in (*m.parameters(), *m.buffers()))
    assert (kept["weights_gb"] - offloaded["weights_gb"]) * 2**30 == encoders


def test_optimizer_state_bytes_follow_adamw_and_bitsandbytes_8bit():
    big, small = torch.zeros(5000), torch.zeros(100)
    adamw = bench_memory.optimizer_state([big, small], adam_8bit=False)
    assert sum(t.nbytes for t in adamw) == 2 * 4 * 5100
    eight = bench_memory.optimizer_state([big, small], adam_8bit=True)
    # uint8 m and v, one fp32 absmax per 256-value block each; tensors under 4096 values stay fp32
    assert sum(t.nbytes for t in eight) == 2 * 5000 + 2 * 4 * 20 + 2 * 4 * 100


def test_largest_fitting_finds_the_boundary_with_few_tries():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 37

    assert bench_memory.largest_fitting(fits) == 37
    assert len(tried) <= 12
    assert bench_memory.largest_fitting(lambda n: False) == 0
    assert bench_memory.largest_fitting(lambda n: True, limit=100) == 100


def test_sharding_divides_only_what_each_strategy_shards():
    """At 4 GPUs: ZeRO-1 keeps a quarter of the optimiser state (8 -> 2), ZeRO-2 of the gradients too (4 -> 1);
    FSDP2 a quarter of those and of every denoiser and reference weight (12 -> 3), plus what it gathers (1.5); with
    CPU offload none of the sharded state, only what it gathers. One GPU shards nothing."""
    row = {"peak_gb": 40.0, "optimizer_and_ema_gb": 8.0, "grads_gb": 4.0, "trained_weights_gb": 4.0,
           "sharded_weights_gb": 12.0, "gathered_gb": 1.5}
    per_gpu = bench_memory.sharded_per_gpu(row, 4)
    assert per_gpu == {"DDP": 40.0, "ZeRO-1": 34.0, "ZeRO-2": 31.0, "FSDP2": 40.0 - 0.75 * 24 + 1.5,
                       "FSDP2 + CPU offload": 40.0 - 24 + 1.5}
    assert bench_memory.sharded_per_gpu(row, 1) == {name: 40.0 for name in per_gpu}


def test_fsdp2_parts_count_every_denoiser_weight_and_two_blocks_gathered():
    """Tiny SD3 full fine-tune in bf16: every parameter of the denoiser and its reference is sharded; what is held
    whole at once is the root's own weights, two transformer blocks in bf16 and one block's fp32 gradients, by
    hand from the modules."""
    from diffalign.diffusion import load_pipeline
    from diffalign.train.memory import GIB, fsdp2_parts

    denoiser = load_pipeline(ROOT / "assets/models/tiny-sd3", random_init=True).transformer
    reference = load_pipeline(ROOT / "assets/models/tiny-sd3", random_init=True).transformer.requires_grad_(False)
    parts = fsdp2_parts(denoiser, reference, "bf16")
    params = sum(p.numel() for p in denoiser.parameters())
    assert parts["sharded_weights_gb"] * GIB == 2 * params * 4
    block = denoiser.transformer_blocks[0]
    in_blocks = sum(p.numel() for b in denoiser.transformer_blocks for p in b.parameters())
    block_params = max(sum(p.numel() for p in b.parameters()) for b in denoiser.transformer_blocks)
    assert block_params == sum(p.numel() for p in block.parameters())
    expected = (params - in_blocks) * 2 + 2 * block_params * 2 + block_params * 4
    assert parts["gathered_gb"] * GIB == pytest.approx(expected)


ONLINE = {"d3po": ["objective.name=d3po", "online.prompts=toy_train", "online.reward=toy_preference",
                   "objective.sample_steps=4", "online.sample_batch_size=2"],
          "grpo": ["objective.name=grpo", "objective.loss=ppo_clip", "online.prompts=toy_train",
                   "online.reward=toy_preference", "objective.sample_steps=5", "objective.sample_guidance_scale=4",
                   "online.group_size=4", "online.sample_batch_size=3", "train.lora_rank=4"]}


@pytest.mark.slow
@pytest.mark.parametrize("model,objective", [("tiny-sd15", "d3po"), ("tiny-qwenimage", "grpo")])
def test_an_online_step_and_its_rounds_sampling_count_what_the_real_ones_allocate(model, objective):
    """An online objective: one batch of a round's sampling and decoding (with the optimiser's state held), then one
    step on the units it makes of a round; fake storage and real CPU tensors agree at every moment (on Qwen-Image too,
    whose pipeline selects its prompt's tokens by the attention mask: sized by the mask's values)."""
    fake = bench_memory.training_step_memory(_config(model, 2, *ONLINE[objective]), fake=True)
    real = bench_memory.training_step_memory(_config(model, 2, *ONLINE[objective]), fake=False)
    assert fake == real
    # the denoiser computed at the first and last sampler steps only: the same peak as at every step
    assert bench_memory.training_step_memory(_config(model, 2, *ONLINE[objective]), every_step=True) == fake
    assert fake["peak_gb"] >= fake["sampling_gb"] > fake["weights_gb"] and fake["activations_gb"] > 0
    if objective == "grpo":  # groups sampled together: more memory; the training step is the same
        one, two = (bench_memory.training_step_memory(_config(model, 2, *ONLINE[objective],
                                                              f"online.sample_batch_size={n}")) for n in (1, 2))
        assert one["sampling_gb"] < two["sampling_gb"] < fake["sampling_gb"]  # that one samples 3 groups at once
        assert one["activations_gb"] == two["activations_gb"] == fake["activations_gb"]


REWARD_GRADIENT = ["online.prompts=toy_train", "online.reward=toy_preference_soft", "objective.sample_steps=4",
                   "objective.sample_guidance_scale=3", "train.lora_rank=4"]


@pytest.mark.slow
def test_a_reward_gradient_step_counts_what_the_real_one_allocates_and_checkpointing_saves_it():
    """DRaFT-K samples with gradients inside its step: fake storage and real CPU tensors agree (on Qwen-Image, as
    above); keeping every trained step's activations (checkpoint_steps off) costs more, and training more of the
    steps costs more only without checkpointing's recomputation (a step's checkpoint keeps its input alone)."""
    draft = [*REWARD_GRADIENT, "objective.name=draft", "objective.loss=draft"]
    fake = bench_memory.training_step_memory(_config("tiny-qwenimage", 2, *draft, "objective.options.k=3"), fake=True)
    real = bench_memory.training_step_memory(_config("tiny-qwenimage", 2, *draft, "objective.options.k=3"), fake=False)
    assert fake == real and fake["activations_gb"] > 0 and "sampling_gb" not in fake
    kept = bench_memory.training_step_memory(_config("tiny-qwenimage", 2, *draft, "objective.options.k=3",
                                                     "objective.options.checkpoint_steps=false"))
    one = bench_memory.training_step_memory(_config("tiny-qwenimage", 2, *draft, "objective.options.k=1",
                                                    "objective.options.checkpoint_steps=false"))
    assert one["activations_gb"] < kept["activations_gb"] and fake["activations_gb"] < kept["activations_gb"]


def test_measure_trains_real_steps_on_synthetic_pairs(tmp_path):
    """The GPU path, run on the CPU: the real trainer on the config, three steps."""
    row = bench_memory.measured_step_memory(_config("tiny-sdxl", 2, "train.gradient_accumulation=4",
                                                    "data.precompute=true", "data.cache_dir=replaced"), tmp_path)
    assert row["peak_gb"] > 0
    assert (tmp_path / "pairs.parquet").is_file() and any((tmp_path / "cache").iterdir())


def test_measure_refuses_objectives_that_need_more_than_labelled_pairs(tmp_path):
    with pytest.raises(SystemExit, match="pair objectives"):
        bench_memory.measured_step_memory(_config("tiny-sd15", 1, "objective.name=self_npo",
                                                  "objective.loss=huber"), tmp_path)


@pytest.mark.slow
def test_the_script_reports_each_batch_in_its_own_process(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "configs/tiny_sdxl_dpo.yaml",
                           "--batches", "1,2", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    one, two = report["rows"]
    assert (one["batch"], two["batch"]) == (1, 2) and two["peak_gb"] > one["peak_gb"]
    assert report["largest_batch"] is None  # no search asked for
    assert "| FSDP2 | " in done.stdout and "refused" not in done.stdout  # FSDP2 runs LoRA too


@pytest.mark.slow
def test_the_example_loop_estimate_holds_the_same_models_and_encodes_in_the_step():
    config = _config("tiny-sdxl", 2, "train.lora_rank=4")
    ours = bench_memory.training_step_memory(config)
    example = bench_memory.example_loop_memory(_config("tiny-sdxl", 2, "train.lora_rank=4"))
    assert example["weights_gb"] == ours["weights_gb"] and example["trained_params"] == ours["trained_params"]
    assert example["activations_gb"] > ours["activations_gb"]  # it VAE- and text-encodes inside the step
    with pytest.raises(SystemExit, match="LoRA only"):
        bench_memory.example_loop_memory(_config("tiny-sdxl", 2, "train.lora_rank=0"))
