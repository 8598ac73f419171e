"""Preferences over edits: FLUX.1 Kontext and FLUX.2 klein read source images beside the noisy latents as their
pipelines feed them, edit pairs and lists (data.source_columns) train every pair/list objective on them with the
sources' latents cached as any image's, and a run that gives sources to a text-to-image model stops."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import pickapic_parquet, ranked_parquet, tiny_clip_folder
from PIL import Image
from safetensors.torch import load_file

from diffalign.diffusion import Conditioning, TensorCache, backbone_for, load_pipeline
from diffalign.data.open import open_dataset
from diffalign.errors import UserError
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train

MODELS = ASSETS / "models"


def _first_transformer_call(pipe) -> dict:
    """The keyword arguments and output of the pipeline's first transformer call (its conditional one)."""
    seen = {}

    def hook(module, args, kwargs, output):
        if not seen:
            seen.update(kwargs=dict(kwargs), output=output[0])
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    return seen, handle


def _source(seed: int, size: int = 32) -> Image.Image:
    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).byte().numpy())


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1


def test_kontext_predict_is_the_pipelines_own_call_with_the_source_tokens_after_the_target():
    """FluxKontextBackbone.predict, given the source's latents as ``reference``, equals the transformer's output
    (target tokens) in FluxKontextPipeline's own first denoising call: the source packed after the noisy tokens,
    its position ids' first axis 1, the guidance embedding; a different source changes the prediction."""
    pipe = load_pipeline(MODELS / "tiny-flux-kontext", random_init=True)
    backbone = backbone_for(pipe, distilled_guidance=2.5)
    seen, handle = _first_transformer_call(pipe)
    source = _source(0)
    pipe(prompt="make it red", image=source, height=32, width=32, num_inference_steps=2, guidance_scale=2.5,
         _auto_resize=False, max_area=32 * 32, max_sequence_length=64, generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs = seen["kwargs"]
    c, h, w = backbone.latent_shape(32)
    tokens, scale = (h // 2) * (w // 2), backbone.vae_scale_factor
    noisy = pipe._unpack_latents(kwargs["hidden_states"][:, :tokens], 32, 32, scale)
    cond = backbone.encode_prompts(["make it red"])
    cond.reference = backbone.encode_images(_pixels(source))[:, None]
    with torch.no_grad():
        ours = backbone.predict(noisy, kwargs["timestep"] * 1000, cond)
        other = backbone.predict(noisy, kwargs["timestep"] * 1000,
                                 Conditioning(cond.embeds, cond.pooled,
                                              reference=backbone.encode_images(_pixels(_source(1)))[:, None]))
    assert kwargs["hidden_states"].shape[1] == 2 * tokens  # the pipeline did read the source
    torch.testing.assert_close(ours, pipe._unpack_latents(seen["output"][:, :tokens], 32, 32, scale))
    assert (ours - other).abs().max() > 1e-4


def test_flux2_klein_predict_reads_reference_images_as_the_pipeline_feeds_them():
    """Flux2Backbone.predict with two reference images equals Flux2KleinPipeline's own first call given those images:
    their tokens after the target's, at times 10 and 20 of the position ids, each at its own size."""
    pipe = load_pipeline(MODELS / "tiny-flux2-klein", random_init=True)
    backbone = backbone_for(pipe)
    seen, handle = _first_transformer_call(pipe)
    sources = [_source(0, 64), _source(1, 64)]  # the pipeline reads no image under 64 pixels a side
    pipe(prompt="put the two together", image=sources, height=32, width=32, num_inference_steps=2,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs = seen["kwargs"]
    _, h, w = backbone.latent_shape(32)
    per_source = (64 // backbone.vae_scale_factor) ** 2
    assert kwargs["hidden_states"].shape[1] == h * w + 2 * per_source  # the pipeline did read both references
    noisy = kwargs["hidden_states"][:, : h * w].permute(0, 2, 1).reshape(1, -1, h, w)
    cond = backbone.encode_prompts(["put the two together"])
    cond.reference = torch.stack([backbone.encode_images(_pixels(s)) for s in sources], dim=1)
    with torch.no_grad():
        ours = backbone.predict(noisy, kwargs["timestep"] * 1000, cond)
    torch.testing.assert_close(ours, seen["output"][:, : h * w].permute(0, 2, 1).reshape(1, -1, h, w))


def _scheduler_inputs(pipe, monkeypatch) -> list:
    """The model outputs (guided, as the pipeline combined them) each scheduler step of ``pipe`` is given."""
    seen, step = [], pipe.scheduler.step

    def recording(model_output, *args, **kwargs):
        seen.append(model_output)
        return step(model_output, *args, **kwargs)
    monkeypatch.setattr(pipe.scheduler, "step", recording)
    return seen


@pytest.mark.parametrize("model, sources", [("tiny-qwenimage-edit", 1), ("tiny-qwenimage-edit-plus", 2)])
def test_qwen_image_edit_reads_its_sources_as_the_pipeline_does(model, sources, monkeypatch):
    """Qwen-Image-Edit and Edit-Plus: the prompt's embeddings come from Qwen2.5-VL reading the instruction with the
    source images (resized as the pipeline resizes them), the sources' packed latents follow the noisy ones, and
    true CFG's empty prompt reads the sources too, its guided output rescaled to the conditional norm. The guided
    prediction of the first step equals the one the pipeline hands its scheduler; other sources change the prompt."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    from diffalign.diffusion.logprob import guided_output

    # the pipelines size sources to a fixed pixel area (1024^2 for the VAE); 32 px keeps the test on a CPU budget
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", 32 * 32)
    pipe = load_pipeline(MODELS / model, random_init=True)
    backbone = backbone_for(pipe)
    seen, handle = _first_transformer_call(pipe)
    guided = _scheduler_inputs(pipe, monkeypatch)
    images = [_source(s) for s in range(sources)]
    pipe(prompt="make it red", image=images if sources > 1 else images[0], negative_prompt="", true_cfg_scale=4.0,
         height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    kwargs = seen["kwargs"]
    _, h, w = backbone.latent_shape(32)
    tokens, scale = (h // 2) * (w // 2), backbone.vae_scale_factor
    assert kwargs["hidden_states"].shape[1] == (1 + sources) * tokens  # the pipeline did read every source
    noisy = pipe._unpack_latents(kwargs["hidden_states"][:, :tokens], 32, 32, scale)[:, :, 0]
    pixels = torch.cat([_pixels(image) for image in images])[None]
    cond = backbone.encode_prompts(["make it red"], pixels)
    cond.reference = backbone.encode_images(pixels[0])[None]
    cond = cond.with_negative(backbone.encode_prompts([""], pixels))
    timestep = kwargs["timestep"] * 1000
    with torch.no_grad():
        ours = backbone.predict(noisy, timestep, cond)
        ours_guided = guided_output(backbone, noisy, timestep, cond, None, 4.0, None)
    torch.testing.assert_close(cond.embeds, kwargs["encoder_hidden_states"])
    torch.testing.assert_close(ours, pipe._unpack_latents(seen["output"][:, :tokens], 32, 32, scale)[:, :, 0])
    torch.testing.assert_close(ours_guided, pipe._unpack_latents(guided[0], 32, 32, scale)[:, :, 0])
    other = backbone.encode_prompts(["make it red"], torch.cat([_pixels(_source(9))] * sources)[None])
    assert (other.embeds - cond.embeds).abs().max() > 1e-4


def test_edit_rows_carry_their_sources_and_their_ids(tmp_path: Path):
    """A pair read with data.source_columns holds its source pixels and their content hashes; a missing source
    column is named at the start; an undecodable source is a bad row like an undecodable image."""
    table = pickapic_parquet(tmp_path / "edits.parquet", 4, sources=("source",))
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"data.path={table}", "data.resolution=32",
                                                              "data.source_columns=[source]"])
    dataset = open_dataset(config.data, "pairs")
    example = dataset.read(0)
    assert example.sources.shape == (1, 3, 32, 32) and len(example.source_ids) == 1
    assert dataset.read(0, decode=False).source_ids == example.source_ids
    assert dataset.read(1).source_ids != example.source_ids
    missing = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"data.path={table}", "data.source_columns=[before]"])
    with pytest.raises(UserError, match="no column 'before'"):
        open_dataset(missing.data, "pairs")


def _edit_run(tmp_path: Path, model: str, recipe: str, data: Path, *extra: str) -> Path:
    train(load_config(CONFIGS / recipe, [
        f"model.path={MODELS / model}", "model.random_init=true", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=0",
        "validation.every=0", "data.source_columns=[source]", *extra]))
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux-kontext", "tiny-flux2-klein", "tiny-qwenimage-edit-plus"])
@pytest.mark.parametrize("recipe, layout", [("toy_diffusion_dpo.yaml", "pairs"), ("toy_rank_dpo.yaml", "ranked")])
def test_edit_preferences_train_and_their_sources_are_cached(model, recipe, layout, tmp_path: Path):
    """Two steps on edit pairs and ranked edit lists; with data.cache_dir the sources' latents are cached beside
    the images' (one entry per source, more entries than a run without sources)."""
    write = pickapic_parquet if layout == "pairs" else ranked_parquet
    data = write(tmp_path / f"{layout}.parquet", 4, sources=("source",))
    run = _edit_run(tmp_path, model, recipe, data, f"data.cache_dir={tmp_path / 'cache'}")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(loss) for loss in losses)
    cache = TensorCache(tmp_path / "cache")
    examples = 2 * 2  # two steps of two
    assert len(cache) == examples * (2 if layout == "pairs" else 3) + examples + examples  # items, sources, prompts


@pytest.mark.slow
def test_a_text_to_image_model_given_sources_stops_at_start(tmp_path: Path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, sources=("source",))
    with pytest.raises(UserError, match="text-to-image model and reads none"):
        _edit_run(tmp_path, "tiny-flux", "toy_diffusion_dpo.yaml", data)
    with pytest.raises(UserError, match="random_flip"):
        _edit_run(tmp_path, "tiny-flux-kontext", "toy_diffusion_dpo.yaml", data, "data.random_flip=true")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux-kontext", "tiny-flux2-klein"])
@pytest.mark.parametrize("objective", ["grpo", "nft", "d3po"])
def test_online_rounds_edit_each_rows_sources(model, objective, tmp_path: Path):
    """Edit GRPO, NFT and D3PO: online.prompts is a table of instructions with a source image each; every group is
    sampled as edits of its row's source (saved beside the samples), and trained with the source's latents, which
    the round keeps; a row whose source cannot be decoded is skipped as the run starts."""
    table = pickapic_parquet(tmp_path / "prompts.parquet", 4, sources=("source",))
    rows = pq.read_table(table).to_pydict()
    rows["source"][1] = b"not an image"
    pq.write_table(pa.table(rows), table)
    config = load_config(CONFIGS / f"toy_{objective}.yaml", [
        f"model.path={MODELS / model}", "model.random_init=true", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=2", "validation.every=0",
        f"online.prompts={table}", "data.source_columns=[source]", "online.groups_per_round=2",
        "online.sample_batch_size=2", "online.steps_per_round=2", "objective.sample_steps=2",
        *(["online.group_size=2", "online.reward=jpeg_incompressibility"] if objective != "d3po" else
          ["online.reward=jpeg_incompressibility"])])
    summary = train(config)
    assert summary["steps"] == 2
    round_dir = next((tmp_path / "run").glob("rounds/round*"))
    record = json.loads((round_dir / "groups.json").read_text())
    assert record["prompts"] == ["a picture number 0", "a picture number 2"]  # row 1's source is no image
    assert sorted(p.name for p in (round_dir / "images").glob("*source*")) == ["group0000-source0.png",
                                                                                  "group0001-source0.png"]
    reference = load_file(str(round_dir / "trajectories.safetensors"))["reference"]
    assert reference.shape[:2] == (2, 1)


@pytest.mark.slow
def test_guided_edit_rounds_train_on_the_conditioning_they_sampled_with(tmp_path: Path):
    """Qwen-Image-Edit GRPO with true CFG (Flow-GRPO's guidance 4): the empty prompt of each group is read with its
    source, in sampling and again when the step is re-scored for training, so the first step's policy ratio,
    before any update, is 1 for every unit."""
    table = pickapic_parquet(tmp_path / "prompts.parquet", 4, sources=("source",))
    config = load_config(CONFIGS / "toy_grpo.yaml", [
        f"model.path={MODELS / 'tiny-qwenimage-edit'}", "model.random_init=true", f"output_dir={tmp_path / 'run'}",
        "data.resolution=32", "train.batch_size=2", "train.max_steps=1", "validation.every=0",
        f"online.prompts={table}", "data.source_columns=[source]", "online.groups_per_round=2",
        "online.sample_batch_size=2", "online.steps_per_round=1", "objective.sample_steps=2",
        "objective.sample_guidance_scale=4.0", "online.group_size=2", "online.reward=jpeg_incompressibility"])
    train(config)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_a_model_that_only_edits_needs_sources_and_no_text_only_validation(tmp_path: Path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, sources=("source",))
    with pytest.raises(UserError, match="cannot sample from text alone"):
        _edit_run(tmp_path, "tiny-qwenimage-edit", "toy_diffusion_dpo.yaml", data, "data.source_columns=[]")
    with pytest.raises(UserError, match="validation.every=0"):
        _edit_run(tmp_path, "tiny-qwenimage-edit", "toy_diffusion_dpo.yaml", data, "validation.every=1")


@pytest.mark.slow
def test_edit_rounds_score_each_sample_against_its_source(tmp_path: Path):
    """Flow-GRPO's edit reward: image_similarity compares each sample with its group's source (a cosine, at most 1),
    weighed with another reward; a run that samples from text alone is refused it at the start."""
    clip = tiny_clip_folder(tmp_path / "clip")
    table = pickapic_parquet(tmp_path / "prompts.parquet", 4, sources=("source",))
    overrides = [f"model.path={MODELS / 'tiny-qwenimage-edit-plus'}", "model.random_init=true",
                 f"output_dir={tmp_path / 'run'}", "data.resolution=32", "train.batch_size=2", "train.max_steps=1",
                 "validation.every=0", f"online.prompts={table}", "online.groups_per_round=2",
                 "online.sample_batch_size=2", "online.steps_per_round=1", "objective.sample_steps=2",
                 "online.group_size=2", f"online.reward=[image_similarity:{clip}, jpeg_incompressibility]",
                 "online.reward_weights=[0.2, 0.8]"]
    train(load_config(CONFIGS / "toy_grpo.yaml", [*overrides, "data.source_columns=[source]"]))
    record = json.loads(next((tmp_path / "run").glob("rounds/round*/groups.json")).read_text())
    similarity = torch.tensor(record["reward_parts"]["image_similarity"])
    assert similarity.shape == (2, 2) and (similarity <= 1 + 1e-5).all() and (similarity > 0).all()
    text_only = [o.replace("tiny-qwenimage-edit-plus", "tiny-flux") for o in overrides if "online.prompts" not in o]
    with pytest.raises(UserError, match="compares each edit with its source"):
        train(load_config(CONFIGS / "toy_grpo.yaml", [*text_only, f"output_dir={tmp_path / 'run2'}"]))


@pytest.mark.slow
def test_eval_compares_edits_of_each_rows_sources_and_the_report_shows_them(tmp_path: Path, capsys):
    """`diffalign eval --sources`: every image edits its row's source through the pipeline's own ``image``
    argument (an image the same seed draws without the source differs), image_similarity scores it against that
    source, and the report shows each row's source first; two rows of one instruction stay two rows."""
    from diffalign.cli import main
    from diffalign.diffusion.sampling import generate

    model = tmp_path / "klein"
    pipe = load_pipeline(MODELS / "tiny-flux2-klein", random_init=True)
    pipe.save_pretrained(model)
    table = pickapic_parquet(tmp_path / "edits.parquet", 2, sources=("source",))
    rows = pq.read_table(table).to_pydict()
    rows["caption"] = ["make it red", "make it red"]
    pq.write_table(pa.table(rows), table)
    clip = tiny_clip_folder(tmp_path / "clip")
    assert main(["eval", "--base", str(model), "--prompts", str(table), "--sources", "source", "--rewards",
                 f"jpeg_incompressibility,image_similarity:{clip}", "--seeds", "2", "--steps", "2",
                 "--resolution", "64", "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0 < metrics["base"]["image_similarity"] <= 1
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count("alt='source 1'") == 2 and report.count("<h3>make it red</h3>") == 2
    source = Image.open(io.BytesIO(rows["source"][0])).convert("RGB").resize((64, 64))
    edited = generate(pipe, ["make it red"], [0], steps=2, resolution=64, sources=[[source]])
    plain = generate(pipe, ["make it red"], [0], steps=2, resolution=64)
    assert (edited - plain).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("model, pipeline", [("tiny-flux-kontext", "FluxKontextPipeline"),
                                             ("tiny-qwenimage-edit-plus", "QwenImageEditPlusPipeline")])
def test_an_edit_runs_lora_loads_in_its_pipeline_and_edits_as_the_merged_export(model, pipeline, tmp_path: Path,
                                                                                 monkeypatch):
    """A LoRA trained on edit pairs loads in the edit pipeline (load_lora_weights), changes the edit of a source
    it draws, and draws what the merged diffusers export draws."""
    import diffusers
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    from diffalign.train.export import export_run

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 32 * 32)  # a CPU's size, as above
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", 32 * 32)
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4, sources=("source",))
    _edit_run(tmp_path, model, "toy_diffusion_dpo.yaml", data, "train.learning_rate=1e-2")
    lora = export_run(tmp_path / "run", "lora", tmp_path / "lora", dtype="fp32")
    merged = export_run(tmp_path / "run", "diffusers", tmp_path / "merged", dtype="fp32")
    extra = {"_auto_resize": False, "max_area": 32 * 32} if "kontext" in model else {}

    def edit(pipe):
        return pipe(prompt="make it red", image=_source(0), height=32, width=32, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **extra).images

    pipe = load_pipeline(MODELS / model, random_init=True)
    before = edit(pipe)
    pipe.load_lora_weights(lora.parent)
    with_lora = edit(pipe)
    assert (with_lora - before).abs().max() > 1e-3
    torch.testing.assert_close(edit(getattr(diffusers, pipeline).from_pretrained(merged)), with_lora,
                               atol=1e-5, rtol=1e-5)
