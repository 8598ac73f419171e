"""Evaluation at scale: batch by batch, a bounded set of report images, bounded grid tiles."""

import pytest
import torch
from PIL import Image

from diffalign.diffusion import load_pipeline
from diffalign.errors import UserError
from diffalign.diffusion.sampling import generate
from diffalign.eval import evaluate_models
from diffalign.eval.report import image_grid, write_evaluation_report
from diffalign.paths import TOY_BASE
from diffalign.rewards import ToyPreference

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def test_evaluation_scores_every_image_but_keeps_only_the_report_images(tmp_path):
    pipe = load_pipeline(TOY_BASE)
    reward = ToyPreference()
    evaluation = evaluate_models({"base": pipe}, PROMPTS, [reward], seeds_per_prompt=2, seed=7, batch_size=4,
                                 keep_images=4, images_dir=tmp_path / "images", steps=4)
    expanded = [p for p in PROMPTS for _ in range(2)]
    everything = generate(pipe, expanded, list(range(7, 13)), steps=4)  # all six at once, as before
    as_saved = (everything.clamp(0, 1) * 255).round() / 255  # with images_dir, images are scored as saved (8-bit)
    torch.testing.assert_close(evaluation.scores["base"]["toy_preference"], reward(as_saved, expanded))
    torch.testing.assert_close(evaluation.images["base"], as_saved[:4])  # 32 px: kept at full size
    saved = sorted((tmp_path / "images" / "base").glob("*.png"))
    assert [p.name for p in saved] == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(saved[5]).size == (32, 32)

    write_evaluation_report(evaluation, tmp_path / "report", title="t")
    assert len(list((tmp_path / "report" / "grids").glob("*.png"))) == 2  # the two prompts kept whole
    assert "the first 2 of 3 prompts" in (tmp_path / "report" / "report.html").read_text()


def test_grids_enlarge_small_images_and_bound_large_ones():
    small, large = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 1024, 768)
    assert image_grid({"a": small}, label_width=0).size == (2 * (96 + 2), 96 + 2)
    assert image_grid({"a": large}, label_width=0).size == (2 * (192 + 2), 256 + 2)


def test_prompt_sets_are_read_from_the_files_benchmarks_publish(tmp_path, monkeypatch):
    import json

    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest
    from fixtures import hub_cache_with

    from diffalign.errors import UserError
    from diffalign.eval.prompts import read_prompts

    parti = tmp_path / "PartiPrompts.tsv"  # PartiPrompts' layout: a header, the prompt in the first column
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nA red apple\tFood\tColors\t\n"
                     "\"a sign that says \"\"hi\"\"\"\tArts\tWriting\tquoted\n")
    assert read_prompts(parti) == ["A red apple", 'a sign that says "hi"']
    (tmp_path / "anime.json").write_text(json.dumps(["a cat, anime style", {"prompt": "a dog"}]))  # HPSv2 benchmark
    assert read_prompts(tmp_path / "anime.json") == ["a cat, anime style", "a dog"]
    (tmp_path / "p.csv").write_text("id,Caption\n1,a fox\n2,\n")
    assert read_prompts(tmp_path / "p.csv") == ["a fox"]
    (tmp_path / "bad.tsv").write_text("id\tscore\n1\t2\n")
    with pytest.raises(UserError, match="no prompt/prompts/caption/text column; it has id, score"):
        read_prompts(tmp_path / "bad.tsv")

    repo = tmp_path / "repo" / "data"  # a pairs dataset as on the Hub: a caption per pair, repeated
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"caption": ["x", "y", "x", "z"]}), repo / "validation_unique-00000-of-00001-a.parquet")
    pq.write_table(pa.table({"caption": ["t"]}), repo / "train-00000-of-00001-a.parquet")
    assert read_prompts(f"{tmp_path / 'repo'}:validation_unique") == ["x", "y", "z"]
    assert read_prompts(tmp_path / "repo") == ["t"]  # the train split
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache_with(tmp_path / "hub", "someone/pairs", tmp_path / "repo", repo_type="dataset")
    assert read_prompts("someone/pairs:validation_unique") == ["x", "y", "z"]
    with pytest.raises(UserError, match="prompt source someone/other:test does not exist"):
        read_prompts("someone/other:test")


def test_models_given_as_loaders_are_loaded_in_turn_and_freed_before_the_next(tmp_path):
    import weakref

    reward, events, alive = ToyPreference(), [], []

    def loader(name):
        def load():
            events.append((name, [ref() is not None for ref in alive]))  # is any earlier pipeline still held?
            pipe = load_pipeline(TOY_BASE)
            alive.append(weakref.ref(pipe))
            return pipe
        return load

    lazy = evaluate_models({"a": loader("a"), "b": loader("b"), "c": loader("c")}, PROMPTS[:2], [reward],
                           seeds_per_prompt=1, steps=2)
    assert events == [("a", []), ("b", [False]), ("c", [False, False])]
    eager = evaluate_models({"a": load_pipeline(TOY_BASE)}, PROMPTS[:2], [reward], seeds_per_prompt=1, steps=2)
    torch.testing.assert_close(lazy.scores["c"]["toy_preference"], eager.scores["a"]["toy_preference"])


def test_eval_names_a_missing_model_before_generating_with_any(tmp_path, monkeypatch, capsys):
    import diffalign.eval.compare
    from diffalign.cli import main

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before every model was checked")

    monkeypatch.setattr(diffalign.eval.compare, "generate", no_generation)
    empty = tmp_path / "lora"
    empty.mkdir()
    for aligned, error in ((tmp_path / "missing", "does not exist"),
                           (empty, "holds neither pytorch_lora_weights.safetensors nor a unet/")):
        assert main(["eval", "--base", str(TOY_BASE), "--aligned", f"ok={TOY_BASE}", f"bad={aligned}",
                     "--prompts", "toy_heldout", "--out", str(tmp_path / "report")]) == 2
        assert error in " ".join(capsys.readouterr().err.split())


def test_eval_refuses_prompt_tokens_for_a_model_whose_text_length_is_fixed(tmp_path, capsys):
    """--prompt-tokens N goes to the pipeline as max_sequence_length (what a run with model.prompt_tokens trained on);
    a CLIP-only model (the toy base, SD1.5's layout) cannot take it and says so, exit 2, before any image."""
    from diffalign.cli import main

    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "toy_heldout", "--prompt-tokens", "128", "--seeds", "1",
                 "--steps", "1", "--out", str(tmp_path / "report")]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "read a fixed number of tokens: its prompts cannot be encoded to 128 (leave --prompt-tokens out)" in said


def test_eval_samples_at_a_width_beside_its_resolution_and_refuses_a_width_alone(tmp_path, capsys):
    """--width W with --resolution H: every model's images W wide and H high, as a run with data.width trained (the
    saved images are the generated ones); a width without its height is refused before any image."""
    from PIL import Image

    from diffalign.cli import main

    out = tmp_path / "report"
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "toy_heldout", "--seeds", "1", "--steps", "1",
                 "--resolution", "32", "--width", "48", "--save-images", "--out", str(out)]) == 0
    saved = sorted((out / "images" / "base").glob("*.png"))
    assert saved and {Image.open(path).size for path in saved} == {(48, 32)}
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "toy_heldout", "--width", "48",
                 "--out", str(tmp_path / "again")]) == 2
    assert "a width of 48 px needs the height too" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_a_stopped_evaluation_with_saved_images_resumes_to_the_same_scores(tmp_path, monkeypatch, capsys):
    import json

    import diffalign.diffusion
    import diffalign.eval.compare
    from diffalign.cli import main

    generated, base_loads = [], []
    real_generate, real_load = diffalign.eval.compare.generate, diffalign.diffusion.load_pipeline

    def counted_generate(pipe, prompts, seeds, **kw):
        generated.append(seeds)
        return real_generate(pipe, prompts, seeds, **kw)

    def counted_load(*args, **kw):
        base_loads.append(args)
        return real_load(*args, **kw)

    monkeypatch.setattr(diffalign.eval.compare, "generate", counted_generate)
    monkeypatch.setattr(diffalign.diffusion, "load_pipeline", counted_load)
    prompts, out = tmp_path / "prompts.txt", tmp_path / "report"
    prompts.write_text("a red circle\na blue square\n")

    def evaluate(*extra: str) -> int:
        return main(["eval", "--base", str(TOY_BASE), "--prompts", str(prompts), "--seeds", "2", "--steps", "2",
                     "--batch-size", "2", "--save-images", "--out", str(out), *extra])

    assert evaluate("--aligned", f"dpo={TOY_BASE}") == 0
    whole = json.loads((out / "metrics.json").read_text())
    assert len(generated) == 4 and len(base_loads) == 1  # 2 batches per model
    (out / "images" / "dpo" / "000003.png").unlink()  # stopped while writing dpo's second batch
    generated.clear(), base_loads.clear()
    assert evaluate("--aligned", f"dpo={TOY_BASE}") == 0
    assert generated == [[2, 3]] and base_loads == []  # only that batch made again; the base not even loaded
    assert json.loads((out / "metrics.json").read_text()) == whole

    generated.clear()
    assert evaluate("--aligned", f"dpo={TOY_BASE}", f"more={TOY_BASE}") == 0  # a model added: it alone generates
    assert generated == [[0, 1], [2, 3]]
    assert evaluate("--aligned", f"dpo={TOY_BASE}", "--steps", "3") == 2
    assert "different config (changed: steps)" in capsys.readouterr().err
    real_load(TOY_BASE).save_pretrained(tmp_path / "other")
    assert evaluate("--aligned", f"dpo={tmp_path / 'other'}") == 2  # another model under the same name
    assert "images of dpo made with a different config (changed: model)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_two_processes_evaluate_as_one_does(tmp_path):
    """Under torchrun each process makes and scores every other batch; the report's figures, the saved
    images and the kept report images are those of one process (one thread each, so every batch is
    computed alike), and the report is written once."""
    import json
    import os
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    command = ["-m", "diffalign", "eval", "--base", str(TOY_BASE), "--aligned", f"again={TOY_BASE}", "--prompts",
               str(prompts), "--rewards", "toy_preference,toy_adherence", "--seeds", "2", "--steps", "3",
               "--batch-size", "2", "--save-images"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from fixtures import run_together

    launches = {name: [*launch, *command, "--out", str(tmp_path / name)] for name, launch in
                {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2"]}.items()}
    printed = {}
    for name, done in run_together(launches, env=env).items():
        assert done.returncode == 0, done.stderr[-3000:]
        printed[name] = done.stdout
    assert printed["two"].count("report: ") == 1
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert one == two and set(one) == {"base", "again"}
    for run in ("one", "two"):  # 3 batches of 2: process 0 made the first and last, process 1 the middle one
        assert len(list((tmp_path / run / "images" / "again").glob("*.png"))) == 6
    assert [(tmp_path / "one" / "images" / "again" / f"{i:06d}.png").read_bytes() for i in range(6)] == \
        [(tmp_path / "two" / "images" / "again" / f"{i:06d}.png").read_bytes() for i in range(6)]
    grids = {run: {g.name: g.read_bytes() for g in (tmp_path / run / "grids").iterdir()} for run in ("one", "two")}
    assert grids["one"] and grids["one"] == grids["two"]  # the kept report images, gathered in order


def test_generation_decodes_one_image_at_a_time():
    """A batch of 1024 px SDXL images decoded at once wants 3.8 GiB each in fp32: the VAE decodes them one by
    one (diffusers' sliced decoding), whatever the generation batch."""

    pipe = load_pipeline(TOY_BASE)
    decoded = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    images = generate(pipe, ["a red circle"] * 3, [0, 1, 2], steps=2, batch_size=3)
    assert images.shape[0] == 3 and decoded == [1, 1, 1]
    assert not pipe.vae.use_slicing  # put back: it slices encoding too, which a trainer sharing the VAE does


def test_a_language_model_run_given_as_a_diffusion_model_is_named_as_such(tmp_path, capsys):
    """A glob such as runs/demo-*/run also matches the LM demo's run: eval says what it found and what to do."""
    from diffalign.cli import main

    run = tmp_path / "demo-lm-1" / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("objective:\n  name: lm_dpo\nmodel:\n  path: assets/models/toy-lm\n")
    code = main(["eval", "--base", str(TOY_BASE), "--aligned", str(run), "--prompts", "toy_heldout",
                 "--out", str(tmp_path / "report")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and f"{run} is a language-model run (lm_dpo), not a diffusion model" in err
    assert "a causal-LM --base" in err and not (tmp_path / "report").exists()


SUMMARY = {"base": {"pref": 0.10, "pref_low": 0.05, "pref_high": 0.15, "adherence": 0.80, "adherence_low": 0.75,
                    "adherence_high": 0.85},
           "aligned": {"pref": 0.20, "pref_low": 0.15, "pref_high": 0.25, "pref_win_rate": 0.70, "pref_win_low": 0.60,
                       "pref_win_high": 0.78, "adherence": 0.76, "adherence_low": 0.70, "adherence_high": 0.82},
           "worse": {"pref": 0.0, "pref_low": -0.05, "pref_high": 0.05, "pref_win_rate": 0.30, "pref_win_low": 0.22,
                     "pref_win_high": 0.40, "adherence": 0.70, "adherence_low": 0.65, "adherence_high": 0.75}}


def test_the_verdict_states_the_first_rewards_win_rate_and_whether_the_others_held():
    from diffalign.eval.report import verdict

    aligned, worse = verdict(SUMMARY)
    # adherence 0.76 is within reach of the base's interval (>= 0.75): held; 0.70 is below it: dropped
    assert aligned == ("aligned beats base on pref: it wins 70.0% of same-seed comparisons (95% interval "
                       "60.0%-78.0%); adherence held (0.800 -> 0.760).")
    assert worse.startswith("worse loses to base on pref: it wins 30.0%") and "adherence dropped (0.800 -> 0.700)" in worse
    even = {"base": SUMMARY["base"], "same": {**SUMMARY["aligned"], "pref_win_low": 0.45}}
    assert verdict(even)[0].startswith("same is not told apart from base on pref")


def test_the_printed_table_gives_each_figure_its_interval_and_the_report_orders_the_trained_reward_first():
    from diffalign.eval.report import _columns, markdown_table

    table = markdown_table(SUMMARY, ["pref", "pref_win_rate"])
    assert "| aligned | 0.200 [0.150, 0.250] | 0.700 [0.600, 0.780] |" in table
    assert "| base | 0.100 [0.050, 0.150] | - |" in table
    assert _columns(SUMMARY) == ["pref", "pref_win_rate", "adherence"]  # as scored, not alphabetical


def test_a_run_folder_called_run_is_named_with_its_parent():
    from diffalign.eval.naming import model_names

    assert model_names(["runs/demo-20261205-120000/run"]) == {"demo-20261205-120000/run": "runs/demo-20261205-120000/run"}
    assert list(model_names(["runs/sdxl_dpo"])) == ["sdxl_dpo"]
    assert list(model_names(["a/run", "b/run"])) == ["a/run", "b/run"]


def test_the_generation_bar_says_what_it_generates(capsys):
    pipe = load_pipeline(TOY_BASE)
    generate(pipe, ["a red circle"], [0], steps=2, progress="eval: 1 image of base")
    assert "eval: 1 image of base" in capsys.readouterr().err


def test_models_joined_by_commas_in_one_aligned_item_are_refused():
    """``--aligned a=X,b=Y`` once became one model named ``a=X,b`` at Y; it is refused with the spaced form."""
    from diffalign.eval.naming import model_names

    with pytest.raises(UserError, match="separated by spaces"):
        model_names(["rso=runs/rso,gpo=runs/gpo"])
    assert model_names(["rso=runs/rso", "gpo=runs/gpo"]) == {"rso": "runs/rso", "gpo": "runs/gpo"}
