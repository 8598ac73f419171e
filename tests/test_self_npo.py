"""Self-NPO: truncated diffusion fine-tuning against the authors' loop written out by hand, the EMA
teacher, captioned-image data and the trainer wiring (resume included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import images_parquet, toy_policy_and_reference
from safetensors.torch import load_file

from diffalign.data import CaptionedImageDataset
from diffalign.diffusion.shadow import ShadowWeights
from diffalign.errors import UserError
from diffalign.objectives import SelfNPO
from diffalign.objectives.self_npo import truncation_grid
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig
from diffalign.train.run_state import read_state

ROOT = Path(__file__).resolve().parent.parent


def test_the_grid_is_the_authors_ddim_solver_grid():
    assert truncation_grid(1000, 25).tolist() == [40 * i - 1 for i in range(1, 26)]


def _authors_loop(unet, scheduler, x0, embeds, uncond, start, noise, renoise, level, *, moves=5, w=-1.0, c=0.001):
    """Self-NPO/train.py's step written out as the authors do it (masked solver, cond + w (cond - uncond))."""
    a = scheduler.alphas_cumprod.float()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    grid = truncation_grid(1000, 25)
    a_prev = torch.cat([a[:1], a[grid[:-1]]])
    view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    index, t = start.clone(), grid[start]
    x = view(alpha[t]) * x0 + view(sigma[t]) * noise
    mask = torch.ones(len(start))
    for i in range(moves + 1):
        cond_out = unet(x, t, encoder_hidden_states=embeds).sample
        uncond_out = unet(x, t, encoder_hidden_states=uncond).sample
        x0_c = (x - view(sigma[t]) * cond_out) / view(alpha[t])
        x0_u = (x - view(sigma[t]) * uncond_out) / view(alpha[t])
        pred_x0 = x0_c + w * (x0_c - x0_u)
        if i >= moves:
            break
        pred_eps = cond_out + w * (cond_out - uncond_out)
        step = view(a_prev[index]).sqrt() * pred_x0 + view(1 - a_prev[index]).sqrt() * pred_eps
        x = step * view(mask) + x * view(1 - mask)
        index = index - 1
        mask = torch.where(index < 0, 0.0, mask)
        index = index.clamp(min=0)
        t = (t - 40).clamp(min=0)
    span = 999 - t
    s = t + 1 + (level * span).long()
    nsr = view(sigma[t] / alpha[t])
    nsr_s = view(sigma[s] / alpha[s])
    x_s = (x / view(alpha[t]) + (nsr_s**2 - nsr**2).sqrt() * renoise) * view(alpha[s])
    out = unet(x_s, s, encoder_hidden_states=embeds).sample
    prediction = (x_s - view(sigma[s]) * out) / view(alpha[s])
    return torch.mean(torch.sqrt((prediction - pred_x0) ** 2 + c**2)) - c


def test_loss_equals_the_authors_truncated_loop_by_hand():
    backbone, teacher_unet = toy_policy_and_reference()  # student nudged; the teacher is the base
    objective = SelfNPO(ObjectiveConfig(name="self_npo", loss="huber"), backbone)
    objective.attach(backbone.denoiser)
    objective.teacher.tensors.update({n: p.detach().clone() for n, p in teacher_unet.named_parameters()
                                      if n in objective.teacher.tensors})
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    # start 2: only 3 moves before the grid runs out (lands on t = 0); 10 and 24: 5 moves each
    randomness = {"start": torch.tensor([2, 10, 24]), "noise": torch.randn(3, 4, 16, 16, generator=g),
                  "renoise": torch.randn(3, 4, 16, 16, generator=g), "level": torch.tensor([0.3, 0.0, 0.99])}
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    loss, metrics = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, None)
    uncond = backbone.encode_prompts([""] * 3).embeds
    with torch.no_grad():
        teacher_x = lambda *a, **k: teacher_unet(*a, **k)  # noqa: E731
        expected = _authors_loop(_Split(teacher_x, backbone.denoiser), backbone.scheduler, x0, cond.embeds, uncond,
                                 randomness["start"], randomness["noise"], randomness["renoise"], randomness["level"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["teacher_t"].item() == pytest.approx((0 + 239 + 799) / 3)  # t = 0, grid[5], grid[19]


class _Split:
    """The teacher for the rollout, the student for the last call (as the authors' two UNets)."""

    def __init__(self, teacher, student) -> None:
        self.teacher, self.student, self.calls = teacher, student, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        # rollout: (moves + 1) x (cond, uncond) teacher calls, then one student call
        return (self.teacher if self.calls <= 12 else self.student)(x, t, **kwargs)


def test_one_step_moves_the_student_towards_the_teachers_prediction():
    backbone, _ = toy_policy_and_reference()
    objective = SelfNPO(ObjectiveConfig(name="self_npo", loss="huber"), backbone)
    objective.attach(backbone.denoiser)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 4, 16, 16, generator=g)
    randomness = objective.draw(4, (4, 16, 16), g)
    cond = backbone.encode_prompts(["a red circle"] * 4)
    before, _ = objective(backbone, x0, cond, randomness, backbone.denoiser, None)
    before.backward()
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            p -= 1e-3 * p.grad
    after, _ = objective(backbone, x0, cond, randomness, backbone.denoiser, None)
    assert after.item() < before.item()


def test_the_ema_teacher_follows_the_student_and_runs_without_copying_the_model():
    backbone, _ = toy_policy_and_reference()
    unet = backbone.denoiser
    shadow = ShadowWeights(unet)
    original = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    shadow.update(0.999)
    name = shadow.names[0]
    torch.testing.assert_close(shadow.tensors[name], original[name] + 0.001)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    embeds = backbone.encode_prompts(["a red circle"]).embeds
    shadow.update(0.0)  # a snapshot: the shadowed module now equals the live one
    torch.testing.assert_close(shadow.denoiser()(x, t, encoder_hidden_states=embeds).sample,
                               unet(x, t, encoder_hidden_states=embeds).sample)
    restored = ShadowWeights(unet)
    restored.load_state_dict({n: v + 1 for n, v in shadow.state_dict().items()})
    assert torch.equal(restored.tensors[name], shadow.tensors[name].cpu() + 1)


def test_captioned_images_skip_or_raise_on_bad_rows(tmp_path):
    data = images_parquet(tmp_path / "images.parquet", n=4, bad_rows=(1,))
    dataset = CaptionedImageDataset(data, resolution=16)
    assert dataset.example(0).pixels.shape == (1, 3, 16, 16)
    assert dataset.example(1) is None and dataset.skipped == {"image": 1}
    with pytest.raises(UserError, match="row 1, column 'image'"):
        CaptionedImageDataset(data, resolution=16, on_error="raise").example(1)
    with pytest.raises(UserError, match="no column 'img'"):
        CaptionedImageDataset(data, resolution=16, image_column="img")


def _image_folder(folder: Path, table: Path) -> Path:
    """The rows of a captioned-images parquet as image files with caption files beside them, in nested folders."""
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(table).to_pylist()):
        image = folder / f"part-{i // 3}" / f"image-{i:02d}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(row["image"])
        image.with_suffix(".txt" if i % 2 else ".caption").write_text(row["caption"] + "\n")
    return folder


def test_a_folder_of_images_with_caption_files_is_read_like_the_same_table(tmp_path):
    table = images_parquet(tmp_path / "images.parquet", n=6)
    folder = _image_folder(tmp_path / "folder", table)
    (folder / "notes.json").write_text("{}")  # not an image: ignored
    from_table, from_folder = (CaptionedImageDataset(p, resolution=16) for p in (table, folder))
    assert len(from_folder) == 6
    for i in range(6):
        a, b = from_table.example(i), from_folder.example(i)
        assert (a.caption, a.image_ids) == (b.caption, b.image_ids)
        torch.testing.assert_close(a.pixels, b.pixels, rtol=0, atol=0)

    (folder / "part-0" / "image-01.txt").unlink()  # an image without a caption
    (folder / "part-9").mkdir()
    (folder / "part-9" / "broken.jpg").write_bytes(b"not an image")
    (folder / "part-9" / "broken.txt").write_text("a broken picture")
    dataset = CaptionedImageDataset(folder, resolution=16)
    assert len(dataset) == 7 and dataset.example(1) is None and dataset.example(6) is None
    assert dataset.skipped == {"caption": 1, "image": 1}
    with pytest.raises(UserError, match="row 1, column 'caption'"):
        CaptionedImageDataset(folder, resolution=16, on_error="raise").example(1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .parquet files, datasets folder, .jsonl index, images .* or videos"):
        CaptionedImageDataset(tmp_path / "empty", resolution=16)
    with pytest.raises(UserError, match="no column 'label'; it has caption, image"):
        CaptionedImageDataset(folder, resolution=16, label_column="label")


def test_training_on_an_image_folder_equals_training_on_the_same_table(tmp_path):
    table = images_parquet(tmp_path / "images.parquet", n=6)
    folder = _image_folder(tmp_path / "folder", table)
    for name, data in (("table", table), ("folder", folder)):
        train(_tiny(data, tmp_path / name, "train.max_steps=2", "train.checkpoint_every=0"))
    a = load_file(str(tmp_path / "table" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "folder" / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_config_takes_a_regression_loss():
    with pytest.raises(UserError, match="choose one of huber, l2"):
        load_config(ROOT / "configs/toy_self_npo.yaml", ["objective.loss=dpo"])
    with pytest.raises(UserError, match="teacher_ema"):
        load_config(ROOT / "configs/toy_self_npo.yaml", ["objective.options.teacher_ema=1.5"])


def _tiny(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [
        f"data.path={data}", f"output_dir={out}", "objective.name=self_npo", "objective.loss=huber",
        "train.checkpoint_every=2", *overrides])


@pytest.mark.slow
def test_trains_on_tiny_sdxl_from_the_cli_and_resumes_exactly_with_its_teacher(tmp_path):
    from diffalign.cli import main

    data = images_parquet(tmp_path / "images.parquet", n=6)
    straight = tmp_path / "straight"
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}", f"output_dir={straight}",
                 "objective.name=self_npo", "objective.loss=huber", "train.checkpoint_every=2",
                 "train.max_steps=4", "objective.options.teacher_ema=0.5"]) == 0
    split = tmp_path / "split"
    train(_tiny(data, split, "train.max_steps=2", "objective.options.teacher_ema=0.5"))
    teacher = read_state(split / "checkpoints" / "step-0000002")["objective_0"]  # safetensors, no pickle
    assert teacher and all("lora" in name for name in teacher)  # only the trained (LoRA) tensors are shadowed
    train(_tiny(data, split, "train.max_steps=4", "objective.options.teacher_ema=0.5", "train.resume=latest"))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_full_finetune_keeps_no_frozen_reference(tmp_path):
    from diffalign.train.trainer import PreferenceTrainer

    data = images_parquet(tmp_path / "images.parquet", n=4)
    trainer = PreferenceTrainer(_tiny(data, tmp_path / "run", "train.lora_rank=0", "train.max_steps=1"))
    assert trainer.reference is None and trainer.objective.teacher is not None
