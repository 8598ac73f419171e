"""The ``diffalign`` command line: one subcommand per user task (DESIGN.md, "User-facing contract")."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from diffalign.data.layouts import LAYOUTS
from diffalign.errors import Interrupted, UserError
from diffalign.losses.registry import KINDS

if TYPE_CHECKING:  # torch is imported by the commands that need it, so --help stays fast
    import torch


def _cmd_methods(args: argparse.Namespace) -> int:
    from diffalign.objectives import OBJECTIVES
    from diffalign.objectives.catalog import method_page, methods_table

    if args.name is None:
        print(methods_table())
        return 0
    if args.name not in OBJECTIVES:
        import difflib

        close = difflib.get_close_matches(args.name, OBJECTIVES, n=1)
        raise UserError(f"no method {args.name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + " `diffalign methods` lists them")
    print(method_page(args.name))
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from diffalign import losses

    rows = [s for s in losses.specs() if args.kind is None or s.kind == args.kind]
    width = max(len(s.name) for s in rows)
    kind = None
    for s in rows:
        if s.kind != kind:
            kind = s.kind
            print(f"\n[{kind}]")
        print(f"  {s.name:<{width}}  {s.summary}")
        print(f"  {'':<{width}}  paper: {s.paper}")
        if s.options:
            shown = (f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in s.options.items())
            print(f"  {'':<{width}}  options: {', '.join(shown)}")
        if s.inputs:
            print(f"  {'':<{width}}  per-pair inputs: {', '.join(s.inputs)}")
    if args.kind is None:
        from diffalign.lm.logprobs import SCORE_OPTIONS

        print("\n[text-LM score options, in diffalign.lm.preference_loss(..., OPTION), with any pairwise loss]")
        for option, summary, paper in SCORE_OPTIONS:
            print(f"  {option}  {summary}\n  {'':<{len(option)}}  paper: {paper}")
    print(f"\n{len(rows)} losses. Use a pairwise, unpaired, reference-free, listwise or soft-label one as "
          "objective.loss=NAME in a config, its options as objective.loss_options.OPTION=VALUE; the token-level one "
          "with objective.name=lm_sparse_po. The distillation and classification losses are functions of logits, "
          "diffalign.losses.get(NAME)(student, teacher, mask).")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from diffalign.train import load_config, train

    if args.plan:
        from diffalign.recipes.plan import plan_lines

        print("\n".join(plan_lines(args.config, args.overrides)))
        return 0
    overrides = list(args.overrides)
    if args.smoke:
        overrides += _smoke_overrides(args.config)
    config = load_config(args.config, overrides)
    try:
        summary = train(config)
    finally:
        # under torchrun: an undestroyed gloo/NCCL group can abort the interpreter's exit ("terminate called
        # without an active exception", exit -6) after a run that succeeded
        PartialState().destroy_process_group()
    if summary["interrupted"]:  # 128 + the signal, as a shell reports it: a script sees the run did not finish
        raise Interrupted(f"{summary['steps']} steps done; the checkpoint is in {config.output_dir}. Continue with "
                          f"the same command and train.resume=latest", summary["signal"] or signal.SIGINT)
    if PartialState().is_main_process:  # once, not once per process
        print(f"done: {summary['steps']} steps, run directory {config.output_dir}")
        if args.smoke:
            print(f"smoke run passed: {args.config} starts, reads its data layout, trains, checkpoints and writes "
                  "its weights. On the real model: the same command without --smoke.")
    return 0


def _smoke_overrides(config: str) -> list[str]:
    """``train --smoke``: the keys a CPU run of the recipe changes, said one by one; a fresh smoke folder."""
    import shutil

    from diffalign.recipes.smoke import smoke_folder, smoke_overrides

    work = smoke_folder(config)
    shutil.rmtree(work / "run", ignore_errors=True)  # the last smoke run's, never a real run's
    keys = smoke_overrides(config, work)
    print(f"smoke run of {config} on a CPU; changed from the recipe:")
    for key in keys:
        print(f"  {key}  ({key.why})")
    return [str(key) for key in keys]


LAYOUT_NAMES = tuple(LAYOUTS)
# the demos' durations, measured on 2 CPU cores (README and docs/quickstart.md state the same; a test keeps them so)
DEMO_TIME = "about two and a half minutes on 2 CPU cores"
DEMO_LM_TIME = "about half a minute on 2 CPU cores"


def _train_description() -> str:
    from diffalign.paths import CONFIGS

    recipes = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.endswith("generate_ranked.yaml"))
    listed = textwrap.fill(", ".join(recipes), width=100, initial_indent="  ", subsequent_indent="  ")
    return f"""Train with a YAML config: a recipe of configs/ or your own. Any key is overridden on the command line
as key=value (objective.beta=5000 train.max_steps=500); docs/reference/config.md lists every key.

Before renting a GPU: --smoke runs the recipe for two steps on its tiny random counterpart on this CPU, and
--plan says what the run reads, does, writes and needs (memory per GPU, estimated).

An interrupted run (Ctrl-C, a lost machine) keeps its last checkpoint; the same command with
train.resume=latest continues it exactly. Several GPUs: accelerate launch -m diffalign train CONFIG.

The recipes in configs/ (toy_* and tiny_* run on a CPU as shipped):
{listed}"""


def _cmd_data_check(args: argparse.Namespace) -> int:
    from diffalign.config.schema import DataConfig, read_config
    from diffalign.data.check import check_dataset

    tokenizer, layout = None, args.layout
    paths = [item for item in args.items if "=" not in item]
    args.overrides = [item for item in args.items if "=" in item]
    if len(paths) > 1:
        raise UserError(f"one dataset at a time: {', '.join(paths)}")
    args.path = paths[0] if paths else None
    if args.config:
        from diffalign.objectives import OBJECTIVES
        from diffalign.objectives.base import data_layout
        from diffalign.train import load_config

        config = load_config(args.config, [*args.overrides, *([f"data.path={args.path}"] if args.path else [])])
        data, objective = config.data, OBJECTIVES[config.objective.name]
        if data_layout(objective) is None:
            raise UserError(f"{args.config} trains {config.objective.name}, an online method: it reads prompts "
                            f"({config.online.prompts or 'online.prompts'}), not a dataset")
        layout = layout or data_layout(objective)
        if layout.startswith("text_"):
            from diffalign.recipes.plan import local_tokenizer

            tokenizer = local_tokenizer(config.model.path)
    else:
        if not args.path:
            raise UserError("give the dataset's PATH, or --config CONFIG to check the config's data.path")
        unknown = [o for o in args.overrides if not o.startswith("data.")]
        if unknown:
            raise UserError(f"{', '.join(unknown)}: only data.* settings apply to a data check without --config")
        data = read_config(None, [f"path={args.path}", *(o.removeprefix("data.") for o in args.overrides)],
                           schema=DataConfig)
    report = check_dataset(data, layout, tokenizer=tokenizer, limit=args.rows)
    print("\n".join(report.lines()))
    if layout and layout.startswith("text_") and tokenizer is None:
        print("(texts checked, not tokenized: give --config with a model on this machine to check token lengths)")
    if report.usable == 0:
        raise UserError(f"{data.path}: no usable row among the {report.read:,} read")
    return 0


def _cmd_data_example(args: argparse.Namespace) -> int:
    from diffalign.recipes.samples import write_example

    if args.sources and args.layout.startswith("text_"):
        raise UserError(f"--sources makes rows of images edits; {args.layout} holds text")
    if args.frames and args.layout.startswith("text_"):
        raise UserError(f"--frames makes the items videos; {args.layout} holds text")
    path = write_example(args.layout, Path(args.path), tuple(args.sources), args.frames)
    keys = f' "data.source_columns=[{",".join(args.sources)}]"' if args.sources else ""
    keys += f" data.frames={args.frames}" if args.frames else ""
    print(f"wrote a {args.layout} example to {path}; read it with: diffalign data check {path}{keys}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from diffalign.train.export import export_run

    written = export_run(args.run_dir, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {written}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import datetime

    out = args.out or f"runs/demo{'-lm' if args.lm else ''}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if args.lm:
        from diffalign.demo.text import run_text_demo as run_demo
    else:
        from diffalign.demo.image import run_demo
    try:
        run_demo(out, overrides=args.overrides)
    except (Interrupted, KeyboardInterrupt) as stopped:
        again = f"diffalign demo{' --lm' if args.lm else ''} --out {out}"
        raise Interrupted(f"the demo stopped ({stopped or 'Ctrl-C'}); run `{again}` to continue "
                          "where it stopped", getattr(stopped, "signum", signal.SIGINT)) from None
    return 0


def _negative_guided_loader(args: argparse.Namespace, dtype: torch.dtype) -> Callable[[], Any]:
    """``--negative``: the base pipeline sampling with the negative model in guidance's unconditional branch."""
    from diffalign.diffusion import load_pipeline
    from diffalign.diffusion.finetuned import finetuned_loader
    from diffalign.diffusion.negative_guidance import with_negative_guidance

    load_negative = finetuned_loader(args.negative, base=args.base, torch_dtype=dtype, base_variant=args.variant)

    def load() -> Any:
        negative = load_negative()
        denoiser = negative.unet if getattr(negative, "unet", None) is not None else negative.transformer
        base = load_pipeline(args.base, torch_dtype=dtype, variant=args.variant)
        return with_negative_guidance(base, denoiser, mix=args.negative_mix)
    return load


def _true_cfg_options(args: argparse.Namespace) -> dict[str, Any]:
    """FluxPipeline's true-CFG arguments for ``--true-cfg``; a FLUX base with ``--negative`` and without it is refused,
    since the negative model would never be called (:mod:`diffalign.diffusion.negative_guidance`)."""
    from diffalign.paths import resolve_model_path

    base = resolve_model_path(args.base, what="--base")
    index = base / "model_index.json" if base.is_dir() else None
    flux = index is not None and index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"
    if args.true_cfg is None:
        if flux and args.negative:
            raise UserError("--negative on a FLUX pipeline needs --true-cfg SCALE (e.g. 4): FLUX.1-dev is "
                            "guidance-distilled and computes no unconditional branch for the negative model to join "
                            "unless diffusers' true classifier-free guidance is on")
        return {}
    if not flux:
        raise UserError("--true-cfg is FluxPipeline's true classifier-free guidance; other pipelines guide with "
                        "--guidance alone")
    return {"true_cfg_scale": args.true_cfg, "negative_prompt": ""}


def _cmd_eval_lm(args: argparse.Namespace) -> int:
    """``diffalign eval`` when --base is a causal language model: sample completions, score them with text rewards."""
    from diffalign.eval.naming import model_names
    from diffalign.eval.prompts import read_prompts
    from diffalign.eval.report import markdown_table
    from diffalign.eval.text import evaluate_language_models, read_text_pairs, write_text_report
    from diffalign.lm.loading import load_trained_lm
    from diffalign.diffusion import process_state
    from diffalign.rewards.text import is_preference_table_reward, load_text_reward

    if process_state().num_processes > 1:
        raise UserError("diffalign eval on language models runs in one process (it samples every model itself); "
                        "run it without torchrun or accelerate launch")
    prompts = read_prompts(args.prompts)
    specs = (args.rewards or "toy_text_preference,toy_text_judge").split(",")
    for spec in filter(is_preference_table_reward, specs):
        raise UserError(f"--rewards {spec}: a general preference model compares completions and gives no score of one; "
                        "diffalign eval reports per-completion rewards (a classifier:PATH or the toy ones)")
    rewards = [load_text_reward(spec) for spec in specs]
    models = {"base": lambda: load_trained_lm(args.base)}
    for name, source in model_names(args.aligned).items():
        models[name] = lambda source=source: load_trained_lm(source)
    pairs = read_text_pairs(args.pairs) if args.pairs is not None else None  # before any model samples
    evaluation = evaluate_language_models(models, prompts, rewards, samples_per_prompt=args.seeds, seed=args.seed,
                                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          batch_size=args.batch_size, pairs=pairs)
    summary = write_text_report(evaluation, Path(args.out), title=f"diffalign eval: {args.prompts}")
    columns = [k for r in rewards for k in (r.name, f"{r.name}_win_rate")] + (["ranking_acc"] if pairs else [])
    print(markdown_table(summary, columns))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _eval_prompts(args: argparse.Namespace) -> tuple[list[str], Any]:
    """``--prompts`` as prompts, and with ``--sources`` as edits: the instructions and each row's (S, 3, H, W) source
    pixels in [0, 1] (at ``--resolution``, else 1024), rows whose sources do not decode skipped and counted."""
    from diffalign.eval.prompts import read_prompts

    if not args.sources:
        return read_prompts(args.prompts), None
    import torch

    from diffalign.data.edit_prompts import EditPrompts

    edits = EditPrompts(args.prompts, resolution=args.resolution or 1024, caption_column=args.caption_column,
                        source_columns=args.sources)
    return list(edits.captions), torch.stack([edits.read(i).sources for i in range(len(edits.captions))]).add(1).div(2)


def _benchmark_args(args: argparse.Namespace):
    """The benchmark ``--benchmark`` names (None without one), its prompts and rewards filled into ``args`` where
    they were not given; without a benchmark, ``--prompts`` is required."""
    if not args.benchmark:
        if not args.prompts:
            raise UserError("diffalign eval needs --prompts (a prompt file or shipped set), or --benchmark NAME")
        return None
    from diffalign.eval.benchmarks import benchmark

    bench = benchmark(args.benchmark)
    if args.sources:
        raise UserError(f"--benchmark {bench.name} draws from prompts, not edits: drop --sources")
    if not (args.prompts or bench.prompts):
        raise UserError(f"--benchmark {bench.name} needs --prompts: {bench.needs_prompts}")
    args.prompts = args.prompts or bench.prompts
    args.rewards = ",".join(bench.spec(args.rewards.split(",") if args.rewards else None))
    return bench


def _cmd_eval(args: argparse.Namespace) -> int:
    from diffalign.diffusion import default_device, load_pipeline, process_state, resolve_dtype
    from diffalign.diffusion.finetuned import finetuned_loader
    from diffalign.eval import evaluate_models
    from diffalign.eval.naming import model_names
    from diffalign.eval.report import markdown_table, write_evaluation_report
    from diffalign.lm.loading import is_causal_lm_folder
    from diffalign.paths import resolve_model_path
    from diffalign.rewards import load_reward
    from diffalign.rewards.toy import TOY_REWARDS, TOY_VIDEO_REWARDS, check_toy_prompts

    bench = _benchmark_args(args)
    # checked now, before any model is loaded; a causal-LM base compares language models
    if is_causal_lm_folder(resolve_model_path(args.base, what="--base")):
        if bench is not None:
            raise UserError(f"--benchmark {bench.name} scores images; {args.base} is a language model")
        if args.prompt_tokens is not None:
            raise UserError(f"--prompt-tokens sets a diffusion model's text length; {args.base} is a language model")
        return _cmd_eval_lm(args)
    if args.pairs is not None:
        raise UserError(f"--pairs ranks text pairs by a language model's likelihood; {args.base} is a diffusion model")
    state = process_state()  # under accelerate launch / torchrun: each process on its own GPU, a share of the batches
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    prompts, sources = _eval_prompts(args)
    if args.rewards is None:  # the toy world's own judges fit its prompts, and nothing else
        check_toy_prompts(prompts, "--rewards is not given, and its default, toy_preference and toy_adherence,")
    specs = (args.rewards or ",".join(TOY_REWARDS)).split(",")
    toy = set(specs) & set(TOY_REWARDS + TOY_VIDEO_REWARDS)
    if toy:  # before any image is made
        check_toy_prompts(prompts, " and ".join(sorted(toy)))
    rewards = [load_reward(name) for name in specs]
    # every model is checked now and loaded in its turn, so only one is in memory at a time
    models, made_by = {"base": lambda: load_pipeline(args.base, torch_dtype=dtype, variant=args.variant)}, {}
    for name, source in model_names(args.aligned, taken=["base", "base+negative"]).items():
        models[name], made_by[name] = finetuned_loader(source, base=args.base, torch_dtype=dtype,
                                                       base_variant=args.variant), source
    if args.negative:
        models["base+negative"] = _negative_guided_loader(args, dtype)
        made_by["base+negative"] = f"{args.negative} (mix {args.negative_mix})"
    models = {name: (lambda load=load: load().to(device)) for name, load in models.items()}
    extra = {**_true_cfg_options(args), **({"frames": args.frames} if args.frames else {}),
             **({} if args.width is None else {"width": args.width}),
             **({} if args.prompt_tokens is None else {"max_sequence_length": args.prompt_tokens})}
    # recorded beside each model's saved images (--save-images): a rerun with another model there is refused
    settings = {name: {"model": made_by.get(name, args.base), "base": args.base, "variant": args.variant,
                       "dtype": str(dtype).removeprefix("torch.")} for name in models}
    try:
        evaluation = evaluate_models(models, prompts, rewards, seeds_per_prompt=args.seeds, seed=args.seed,
                                     steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution,
                                     batch_size=args.batch_size, progress=True, **extra,
                                     keep_images=args.report_prompts * args.seeds,
                                     images_dir=Path(args.out) / "images" if args.save_images else None,
                                     model_settings=settings, sources=sources)
    finally:
        state.destroy_process_group()  # as after train
    if not state.is_main_process:
        return 0
    tables, printed = [], ""
    if bench is not None:
        from diffalign.eval.benchmarks import html_table, markdown, score_table

        table, title = score_table(bench, evaluation, args.prompts, prompts)
        tables, printed = [html_table(table, title)], markdown(table, title)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "benchmark.json").write_text(json.dumps(table, indent=2) + "\n")
    summary = write_evaluation_report(evaluation, Path(args.out), title=f"diffalign eval: {args.prompts}",
                                      tables=tables)
    keys = [k for r in rewards for k in (r.name, f"{r.name}_win_rate")]
    print(markdown_table(summary, keys))
    if printed:
        print(f"\n{printed}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _cmd_generate_ranked(args: argparse.Namespace) -> int:
    from diffalign.diffusion import process_state
    from diffalign.synth import GenerateConfig, generate_ranked
    from diffalign.synth.ranked import summary_table
    from diffalign.train import load_config

    config = load_config(args.config, args.overrides, schema=GenerateConfig)
    state = process_state()
    try:
        summary = generate_ranked(config)
    finally:
        state.destroy_process_group()  # as after train
    if state.is_main_process:
        print(f"\n{summary['prompts']} ranked lists in {config.output_dir} "
              f"({summary['images_generated_now']} images generated in this run)\n")
        print(summary_table(summary))
    return 0


def _cmd_pairs_to_labels(args: argparse.Namespace) -> int:
    from diffalign.data.labels import pairs_to_labelled_images

    summary = pairs_to_labelled_images(args.pairs, args.out, mixed=args.mixed, caption_column=args.caption_column,
                                       image_columns=tuple(args.image_columns), label_column=args.label_column,
                                       rows_per_shard=args.rows_per_shard, split=args.split, verify=args.verify)
    skipped = sum(summary["bad_rows"].values())
    print(f"{summary['pairs_used']} pairs ({skipped} bad rows skipped) -> {summary['images']} images: "
          f"{summary['liked']} liked, {summary['not_liked']} not; {summary['won_and_lost']} both won and lost "
          f"(mixed={summary['mixed']})")
    print(f"train Diffusion-KTO on it: data.path={args.out} data.label_column=label")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from diffalign.label import open_source, serve

    try:
        serve(open_source(args.source, args.out, args.sources), host=args.host, port=args.port, token=args.token)
    except KeyboardInterrupt:  # every label given is on disk already: stopping the page is not a failure
        print("stopped; every label is kept. Run the same command to go on labelling.", file=sys.stderr)
    return 0


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from diffalign.rewards.remote import serve_reward

    try:
        serve_reward(args.reward, host=args.host, port=args.port, token=args.token)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Preference alignment for diffusion models (SD1.5, SDXL, SD3/SD3.5, FLUX.1, FLUX.2, "
                    "Z-Image, Qwen-Image, PixArt; Wan2.1/2.2 video) and text "
                    "language models: offline (Diffusion-DPO and its family, KTO, RankDPO, ...) and online (D3PO, "
                    "Flow-GRPO, DiffusionNFT, ...) methods, on your data or on a toy world that runs on a CPU. "
                    "Start with `diffalign demo`; the manual is in docs/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help=f"align the toy image world's base model on CPU and show the result ({DEMO_TIME}; "
                                    "--lm: the toy text world's language model)")
    p.add_argument("--lm", action="store_true", help=f"align the toy text world's causal LM instead ({DEMO_LM_TIME})")
    p.add_argument("--out", help="run directory (default: a new one under ./runs)")
    p.add_argument("overrides", nargs="*", help="overrides of configs/toy_diffusion_dpo.yaml (with --lm, of "
                                                "configs/toy_lm_dpo.yaml), e.g. train.max_steps=50")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("train", help="train with a YAML config: diffalign train CONFIG [key=value ...]",
                       description=_train_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML config: a recipe under configs/ or your own")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as objective.beta=5000 "
                                                "(every key: docs/reference/config.md)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--smoke", action="store_true", help="run the recipe for two steps on its tiny random "
                      "counterpart on this CPU (no weights, sample data), saying what it changed; writes "
                      "runs/smoke/NAME")
    when.add_argument("--plan", action="store_true", help="start nothing: say what the run will read (rows, bad "
                      "rows), do (steps, epochs), write and need (peak memory per GPU, estimated), and the resolved "
                      "config")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("eval", help="generate with base and aligned models on prompts and report rewards")
    p.add_argument("--base", required=True,
                   help="the base model: a local diffusers folder, or the Hub id of one in the local "
                        "Hugging Face cache; a transformers causal-LM folder compares language models")
    p.add_argument("--variant", help="weights variant of --base, e.g. fp16 (when only *.fp16.safetensors are there)")
    p.add_argument("--aligned", nargs="*", default=[], metavar="[NAME=]SOURCE",
                   help="run directories or their checkpoints (run/checkpoints/step-N), LoRA files/folders "
                        "(applied to --base) or diffusers folders")
    p.add_argument("--prompts",
                   help="a .txt/.jsonl/.json/.tsv/.csv prompt file (PartiPrompts.tsv, HPSv2's benchmark .json), a "
                        "table or cached Hub dataset with :split (yuvalkirstain/pickapic_v2:validation_unique), "
                        "or a shipped set (general, toy_heldout, geneval, ocr_test, ...); a --benchmark's own by "
                        "default")
    p.add_argument("--benchmark", metavar="NAME",
                   help="score a benchmark as the papers print it: geneval (GenEval's 553 prompts, per task; needs "
                        "--rewards geneval:DIR:clip=FILE), ocr (Flow-GRPO's 1018 OCR test prompts), signs (the "
                        "sign world's held-out words) or drawbench (your DrawBench file as --prompts, a column per "
                        "reward of --rewards); the table is printed and in the report")
    p.add_argument("--rewards", help="comma-separated reward specs: name or name:path[:key=value...], e.g. "
                   "pickscore:yuvalkirstain/PickScore_v1 (a local folder or the local Hugging Face cache), "
                   "hps_v2.1:FILE, image_reward:FILE:tokenizer=DIR, aesthetic:FILE:clip=FILE, clip_score:FILE; "
                   "default for toy-world prompts: toy_preference,toy_adherence")
    p.add_argument("--seeds", type=int, default=4,
                   help="images (or completions) per prompt, the same seeds for every model "
                                                         "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="image size (default: the model's)")
    p.add_argument("--width", type=int, help="with --resolution: images (or clips) that wide and --resolution high, as a "
                   "run with data.width trained (default: square)")
    p.add_argument("--prompt-tokens", type=int, metavar="N",
                   help="encode every model's prompts to N text tokens, as a run with model.prompt_tokens trained "
                        "(Flow-GRPO's SD3 recipes: 128; default: each pipeline's own length)")
    p.add_argument("--frames", type=int, default=0, metavar="N",
                   help="a video model (Wan): clips of N frames (4k + 1), scored frame by frame by image rewards and "
                        "played in the report (default: images)")
    p.add_argument("--sources", nargs="+", metavar="COLUMN",
                   help="edits: --prompts is a table of instructions (--caption-column) with their source images in "
                        "these columns; every image edits its row's sources, which the report shows beside them")
    p.add_argument("--caption-column", default="caption",
                   help="with --sources: the instructions' column (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="weights dtype (default auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--negative", help="a negative model (run, LoRA or folder): adds a 'base+negative' row whose "
                   "guidance uses it in the unconditional branch (Diffusion-NPO / Self-NPO)")
    p.add_argument("--negative-mix", type=float, default=1.0,
                   help="weight of the negative model in the unconditional branch (1 = replace it) "
                        "(default: %(default)s)")
    p.add_argument("--true-cfg", type=float, metavar="SCALE",
                   help="FLUX.1: diffusers' true classifier-free guidance at SCALE with an empty negative prompt "
                        "(FLUX.1-dev is guidance-distilled, has no unconditional branch otherwise, and takes "
                        "--guidance as its guidance embedding); --negative on FLUX needs it")
    p.add_argument("--report-prompts", type=int, default=32,
                   help="prompts shown as image grids in the report (the first ones); the scores cover all "
                        "(default: %(default)s)")
    p.add_argument("--save-images", action="store_true",
                   help="also write every image, full size, to OUT/images/; the same command run again after a stop "
                        "then resumes, generating only what is missing")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="language models (a causal-LM --base): tokens sampled per completion (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="language models: the sampling temperature (default: %(default)s)")
    p.add_argument("--pairs", metavar="TABLE",
                   help="language models: a pairs table (prompt, chosen, rejected); each model's ranking accuracy on "
                        "it, the share of pairs whose chosen completion it gives the higher log-likelihood (Chen et "
                        "al. 2024), is reported beside the rewards")
    p.add_argument("--out", required=True, help="report folder (metrics.json, grids/, report.html)")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("generate-ranked", help="build a synthetic ranked dataset with reward models",
                       description="Build a Syn-Pic-style dataset: each prompt's images from several generators and "
                                   "seeds, scored by reward models, ranked per prompt; writes the ranked lists "
                                   "(RankDPO's data.path) and pairs.jsonl (the DPO family's). Resumable: run the "
                                   "same command again after a stop. docs/rewards.md has the details.")
    p.add_argument("config", help="a YAML config, e.g. configs/toy_generate_ranked.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as seeds_per_generator=4")
    p.set_defaults(run=_cmd_generate_ranked)

    p = sub.add_parser("pairs-to-labels", help="per-image liked/not-liked labels from a pairs dataset "
                       "(Diffusion-KTO's data from Pick-a-Pic)")
    p.add_argument("pairs", help="a pairs dataset: parquet file/folder, datasets folder, .jsonl index, "
                   "or the id of a dataset in the local Hugging Face cache")
    p.add_argument("out", help="a new folder for the labelled images "
                   "(parquet shards, or images.jsonl for a .jsonl index)")
    p.add_argument("--mixed", default="liked", choices=("liked", "disliked", "drop"),
                   help="label of an image that both won and lost (default liked, the authors' gt_label_wi_l)")
    p.add_argument("--caption-column", default="caption", help="the prompt's column (default: %(default)s)")
    p.add_argument("--image-columns", nargs=2, default=["jpg_0", "jpg_1"], metavar=("FIRST", "SECOND"),
                   help="the pair's two image columns (default: jpg_0 jpg_1)")
    p.add_argument("--label-column", default="label_0",
                   help="P(first image preferred): 1, 0, 0.5 for a tie (default: %(default)s)")
    p.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per parquet shard (default: %(default)s)")
    p.add_argument("--split", default="train", help="the split to read where shards sit in sub-folders "
                   "(data/train-*.parquet, as on the Hub) (default: %(default)s)")
    p.add_argument("--verify", action="store_true",
                   help="decode every image and skip pairs whose images do not decode (slower: images are "
                        "otherwise only hashed, and a corrupt one is skipped when training reads it)")
    p.set_defaults(run=_cmd_pairs_to_labels)

    p = sub.add_parser("data", help="check a dataset as a run reads it, or write an example of a layout")
    data = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data.add_parser("check", help="read a dataset as a run would: rows, layout, bad rows, an example",
                        description="Read a dataset as a run would and report its layout, rows, the bad rows a run "
                                    "would skip (and why) and one example as read. The layouts and their columns: "
                                    "docs/data.md.")
    q.add_argument("items", nargs="*", metavar="PATH [data.KEY=VALUE ...]",
                   help="a parquet file or folder, a datasets folder, a .jsonl index, a folder of captioned images or "
                        "a dataset in the local Hugging Face cache (default: the --config's data.path); then data "
                        "settings such as data.caption_column=prompt")
    q.add_argument("--config", help="read it as this config's run would: its data.* columns, its objective's "
                   "layout, its model's tokenizer")
    q.add_argument("--layout", choices=LAYOUT_NAMES, help="the layout (default: the --config objective's, else "
                   "guessed from the columns)")
    q.add_argument("--rows", type=int, help="read only the first ROWS rows (default: every row)")
    q.set_defaults(run=_cmd_data_check)
    q = data.add_parser("example", help="write a small example dataset of a layout, to copy its columns")
    q.add_argument("layout", choices=LAYOUT_NAMES)
    q.add_argument("path", help="a .parquet table, or a .jsonl index (its images written beside it in images/)")
    q.add_argument("--sources", nargs="+", default=[], metavar="COLUMN",
                   help="make the rows edits: a source image in each COLUMN (read with data.source_columns=[COLUMN]; "
                        "image layouts only)")
    q.add_argument("--frames", type=int, default=0, metavar="N",
                   help="make the items MPEG-4 videos of N frames, for a video model (read with data.frames=N; image "
                        "layouts only)")
    q.set_defaults(run=_cmd_data_example)

    p = sub.add_parser("export", help="export a run as a LoRA, a merged diffusers folder, or one .safetensors file")
    p.add_argument("run_dir", help="a finished run directory (config.yaml and final/ inside), or one of its "
                                   "checkpoints (RUN/checkpoints/step-N; with an EMA, its raw weights, as eval reads them)")
    p.add_argument("--format", required=True, choices=("lora", "kohya", "diffusers", "single-file"),
                   help="lora: for pipe.load_lora_weights; kohya: one LoRA .safetensors for A1111/Forge/ComfyUI; "
                        "diffusers: merged pipeline folder; "
                        "single-file: original SD 1.x/2.x, SDXL or SD3 layout for ComfyUI/A1111; the transformer "
                        "alone of FLUX.1, Z-Image or Qwen-Image, as their releases ship it")
    p.add_argument("--out", required=True,
                   help="output folder (lora, diffusers) or .safetensors file (kohya, single-file)")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"), help="weights dtype (default fp16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or a folder holding an earlier export (refused otherwise)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("label", help="a local web page to pick preferred images: a D3PO round waiting for labels, "
                       "a pairs dataset or ranked lists")
    p.add_argument("source", help="a D3PO run stopped for labels (its run directory), a pairs dataset (caption, jpg_0, "
                   "jpg_1: parquet, datasets folder or .jsonl index such as generate-ranked's pairs.jsonl), or "
                   "ranked lists (generate-ranked's output folder)")
    p.add_argument("--out", help="where the labels go: for a D3PO run its online.labels file (the default); for a "
                   "dataset a folder (default: SOURCE-labelled beside it) holding labels.jsonl and the pairs.jsonl "
                   "or ranked.jsonl dataset they make")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (another than this machine's needs --token) (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token", help="a secret every request must carry (?token=); needed for a non-local --host")
    p.add_argument("--sources", nargs="+", default=[], metavar="COLUMN",
                   help="edits: the columns of each row's source images (as data.source_columns), shown beside the "
                        "candidates and kept in the labelled dataset; an edit round of D3PO shows its own")
    p.set_defaults(run=_cmd_label)

    p = sub.add_parser("serve-reward", help="serve a reward model over HTTP, for runs in another environment or on "
                       "another GPU (online.reward: http://HOST:PORT)")
    p.add_argument("reward", help="a reward spec, as online.reward takes it: ocr, pickscore:/models/PickScore_v1, ...")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (another than this machine's needs --token) (default: %(default)s)")
    p.add_argument("--port", type=int, default=8400, help="port (default 8400; 0 picks a free one)")
    p.add_argument("--token", help="a secret every request must carry (clients read it from $DIFFALIGN_REWARD_TOKEN); "
                   "needed for a non-local --host")
    p.set_defaults(run=_cmd_serve_reward)

    p = sub.add_parser("methods", help="list every method (objective.name) with its family, paper and backbones; "
                                       "with a NAME, its options")
    p.add_argument("name", nargs="?", help="a method, e.g. grpo: its options (objective.options.*), defaults and ranges")
    p.set_defaults(run=_cmd_methods)

    p = sub.add_parser("losses", help="list every preference loss with its paper")
    p.add_argument("--kind", choices=KINDS, help="only losses of this kind")
    p.set_defaults(run=_cmd_losses)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words after an option (train CONFIG --smoke train.max_steps=3) belong to the command's trailing list
    trailing = "overrides" if isinstance(getattr(args, "overrides", None), list) else "items"
    if extra and isinstance(getattr(args, trailing, None), list) and not any(w.startswith("-") for w in extra):
        getattr(args, trailing).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except UserError as err:
        # under torchrun / accelerate launch every process that meets the mistake says so: name which
        world = int(os.environ.get("WORLD_SIZE", "1"))
        who = f" (process {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
        # wrapped between words only: a path in the message stays whole, to copy
        print(textwrap.fill(f"error{who}: {err}", width=100, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        return 2
    except Interrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:  # unwrapped: the command in it stays whole, to copy
            print(f"interrupted: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:  # Ctrl-C outside a loop that saves its work: nothing half-written to report
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # the reader closed early (`diffalign losses | head`): not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again (the recipe of the Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
