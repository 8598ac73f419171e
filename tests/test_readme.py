"""Every command and snippet of README.md and of every page of the docs site runs as written, read from the pages
themselves: a line that does not run fails this test.

The commands are the lines of their ``bash`` blocks and the ``diffalign ...`` / ``python scripts/...``
commands quoted in their text; the snippets are their ``python`` blocks (:mod:`doc_commands`). Each runs in one
scratch folder holding links to the repository's assets/, configs/ and scripts/ (the pages' relative paths), in
the order of README and then the site's navigation, so a later line finds what an earlier one made
(``runs/toy_ranked``, ``runs/sdxl_dpo``). The reference pages are generated; a test checks they are current.

What a CPU cannot do is changed, and only that, in one place each:

- recipes (``configs/sdxl_*.yaml`` ...): :func:`diffalign.recipes.smoke.cpu_overrides` (tiny random architecture,
  tiny data, size, CUDA-only 8-bit AdamW), appended after the README's own keys; a recipe's second line
  gets an output_dir of its own (the README lists alternatives, not a sequence), and the sdxl_dpo run
  checkpoints every 2 steps (its 200 of 2000, scaled) so that its checkpoint can be exported;
- toy configs: :func:`test_toy_configs.toy_size_overrides`, on the session's small toy datasets;
- ``diffalign eval``: ``--seeds 1 --steps 2`` (the size); the export of ``step-0002000`` exports step 2;
- scripts that train for minutes: the step count in :data:`SCRIPT_STEPS`, appended to the page's own flags;
- placeholders (RUN, NPO_RUN, DDO_RUN, PAIRS, OUT, FOLDER, CONFIG) and the demo's ``runs/demo-*/run``:
  runs and data the test makes first, named in :func:`scratch`;
- what cannot run here at all is in :data:`NOT_RUN` with the reason (downloads, real SDXL/SD3 weights,
  several GPUs, and what another test runs already); a command only mentioned in the text (a subcommand
  and its flags) must name flags that subcommand has.
"""

from __future__ import annotations

import argparse
import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import all_commands, doc_pages, page_snippets
from fixtures import pickapic_parquet
from run_configs import cpu_overrides, is_toy, recipe_data, toy_size_overrides

from diffalign.cli import build_parser, main
from diffalign.paths import ROOT

# (pattern, why the test does not run it): every command of README.md that matches one
NOT_RUN = [
    (r"^pip install .* && diffalign demo$|^diffalign demo$",
     "tests/test_demo.py runs `diffalign demo --out DIR`, its figures checked"),
    (r"^pip install ", "installs into the environment the suite already runs in"),
    (r"^diffalign demo --lm( |$)", "tests/test_demo_lm.py runs `diffalign demo --lm --out DIR`, its figures checked"),
    (r"^pip install .* && python -m pytest -q$", "the suite itself: .ci/run runs exactly this"),
    (r"^hf download ", "downloads from the Hub"),
    (r"^diffalign train configs/(?!toy_|tiny_)\S+ --smoke$", "tests/test_recipes.py runs every recipe's smoke command "
     "as written"),
    (r"^tensorboard ", "serves a page until stopped; tests/test_tracking.py reads the event files it shows"),
    (r"^accelerate launch ", "needs several GPUs; tests/test_train.py runs two processes with torchrun on CPU, "
     "tests/test_fsdp2.py two under FSDP2 with the environment configs/accelerate/fsdp2.yaml gives, "
     "tests/test_context_parallel.py two splitting each clip (train.context_parallel=2)"),
    (r"^diffalign label |online\.labels=", "the human-feedback loop and its page: tests/test_label.py runs these "
     "commands as README gives them, with a person's labels given in Chromium"),
    (r"^python scripts/train_toy_(base|lm|video_base)\.py( |$)", "retrains a shipped base model (20-30 minutes on 2 "
     "cores); tests/test_sign_world.py, tests/test_toy_video.py and the toy tests check the shipped weights"),
    (r"^python scripts/check_floors\.py$", "builds a venv of the oldest supported versions and runs the suite in it"),
    (r"^python scripts/bench_(alignment|train|lm|reward_time)\.py( |$)", "a benchmark of minutes to hours on a CPU; "
     "tests/test_bench_lm.py and tests/test_bench_reward_time.py run bench_lm.py and bench_reward_time.py small"),
    (r"^python scripts/bench_(online|noisy_labels)\.py( |$)", "a benchmark of minutes on a CPU (or a GPU's); "
     "tests/test_bench_online.py runs bench_online.py small, tests/test_bench_noisy_labels.py its label flips"),
    (r"^diffalign serve-reward |online\.reward=http", "serves until stopped (and the run it feeds); "
     "tests/test_reward_server.py serves a reward in a second process and trains against it"),
    (r"online\.reward=pairwise_judge:http", "needs a served judge and SD3.5 weights; tests/test_pairwise_judge.py "
     "trains a round on a judge's verdicts, tests/test_openai_judge.py sends a pair to a real server"),
    (r"^(vllm|transformers) serve ", "serves a judge model until stopped; tests/test_openai_judge.py starts "
     "transformers serve over a tiny VLM and scores through it"),
    (r"^python scripts/bench_signs\.py( |$)", "a benchmark of an hour on 2 CPU cores; tests/test_toy_configs.py runs "
     "its configs, tests/test_sign_world.py its base and pairs"),
    (r"^python scripts/bench_memory\.py ", "tests/test_bench_memory.py runs the script on the tiny models"),
    (r"stabilityai/|black-forest-labs/|mhdang/|sdxl_generate_ranked\.yaml",
     "needs real SDXL, SD3, FLUX or PixArt weights and reward models"),
]
# scripts the pages run that train for their own number of steps: the count here, appended (the last flag wins)
SCRIPT_STEPS = {"scripts/train_gpm.py": ["--steps", "20"]}  # 300 steps, 20 s on 2 cores
NESTED = ("data",)  # subcommands whose first word is an action (diffalign data check PATH)
PLACEHOLDERS = ("RUN", "NPO_RUN", "DDO_RUN", "PAIRS", "OUT", "FOLDER", "CONFIG")
# the checkpoint at step 2000 of 2000, as the 2-step run here has it: at step 2 of 2
SCALED = {"checkpoints/step-0002000": "checkpoints/step-0000002"}


def why_not_run(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def is_mention(words: list[str]) -> bool:
    """A subcommand named in the text with one of its flags, not a command to run (``diffalign eval
    --negative RUN``, ``diffalign generate-ranked``): no argument of its own and at most one flag."""
    after = words[3:] if words[1] in NESTED else words[2:]
    flags = [w for w in after if w.startswith("--")]
    own = [w for i, w in enumerate(after) if not w.startswith("--") and not (i and after[i - 1].startswith("--"))]
    return words[0] == "diffalign" and words[1] != "losses" and not own and len(flags) <= 1


def check_flags(words: list[str]) -> None:
    """Every ``--flag`` of a mentioned ``diffalign`` subcommand is one it has."""
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[words[1]]
    if words[1] in NESTED:  # diffalign data check: the action's own parser
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[words[2]]
    flags = {option for action in sub._actions for option in action.option_strings}
    for word in words[2:]:
        if word.startswith("--"):
            assert word in flags, f"`{shlex.join(words)}`: diffalign {words[1]} has no {word}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, small_toy_datasets):
    """A folder like a fresh clone's root (links to assets/, configs/, scripts/), where the runs and data
    the README's placeholders stand for are made first: a toy Diffusion-DPO run as a demo's run (the demo
    itself takes minutes), toy Self-NPO and DDO runs, a pairs table."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("assets", "configs", "scripts"):
        (root / name).symlink_to(ROOT / name)
    made = {"PAIRS": str(pickapic_parquet(root / "data" / "pairs.parquet", 4)), "OUT": "runs/labelled",
            "FOLDER": "export/folder", "CONFIG": "configs/toy_generate_ranked.yaml"}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for placeholder, config, out in (("RUN", "toy_diffusion_dpo.yaml", "runs/demo-20261205-120000/run"),
                                         ("NPO_RUN", "toy_self_npo.yaml", "runs/toy_self_npo"),
                                         ("DDO_RUN", "toy_ddo.yaml", "runs/toy_ddo")):
            assert main(["train", f"configs/{config}", f"output_dir={out}", *toy_size_overrides(config)]) == 0
            made[placeholder] = out
        # the language-model demo's run beside the image demo's, as both demos leave them: the docs' glob for the
        # image demos' runs must not pick it up (diffalign eval would refuse an LM run given with an image --base)
        assert main(["train", "configs/toy_lm_dpo.yaml", "output_dir=runs/demo-lm-20261205-120500/run",
                     *toy_size_overrides("toy_lm_dpo.yaml")]) == 0
        yield root, made


def _filled(words: list[str], made: dict[str, str]) -> list[str]:
    """Placeholders replaced (also inside NAME=RUN), shell globs expanded as a shell would."""
    out = []
    for word in words:
        for written, here in SCALED.items():
            word = word.replace(written, here)
        word = re.sub(r"\b(" + "|".join(sorted(PLACEHOLDERS, key=len, reverse=True)) + r")\b",
                      lambda m: made[m[1]], word)
        out += sorted(glob.glob(word)) if "*" in word else [word]
    return out


def _train_argv(words: list[str], seen: set[str], data: dict[str, Path], line: int) -> list[str]:
    """A README training command with the CPU's changes (see the module docstring)."""
    config = Path(words[2]).name
    if "--smoke" in words or "--plan" in words:  # a CPU's check of the recipe, as a user runs it
        return words[1:]
    if is_toy(config):
        return [*words[1:], *toy_size_overrides(config)]
    extra = cpu_overrides(config, data)
    if config in seen or any(w.startswith("train.resume=") for w in words):
        extra.append(f"output_dir=runs/readme-line-{line}")
    elif config == "sdxl_dpo.yaml":
        extra.append("train.checkpoint_every=2")
    seen.add(config)
    return [*words[1:], *extra]


@pytest.mark.slow
def test_every_command_of_the_readme_and_the_docs_runs_as_written(scratch, capsys):
    root, made = scratch
    pages = all_commands()
    commands = [command for _, command in pages]
    assert len(commands) > 30 and any(c.startswith("diffalign train configs/sdxl_dpo.yaml") for c in commands)
    seen: set[str] = set()
    data = recipe_data(root / "data")  # what the recipes' real datasets stand in for
    ran, skipped = [], []
    for line, (page, command) in enumerate(pages):
        words = shlex.split(command)
        if (why := why_not_run(command)) is not None:
            skipped.append((command, why))
            if words[0] == "diffalign":
                check_flags(words)
            continue
        if is_mention(words):
            check_flags(words)
            continue
        words = _filled(words, made)
        if words[0] == "python":  # a script, in its own process as a user runs it
            done = subprocess.run([sys.executable, *words[1:], *SCRIPT_STEPS.get(words[1], [])], cwd=root,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{page.name}: `{command}` failed:\n{done.stderr[-3000:]}"
        else:
            argv = _train_argv(words, seen, data, line) if words[1] == "train" else words[1:]
            if words[1] == "eval":
                argv += ["--seeds", "1", "--steps", "2"]
            if any(w.startswith("train.resume=") for w in argv):  # first the run it continues, stopped at step 1
                first = [a for a in argv if not a.startswith("train.resume=")]
                assert main([*first, "train.max_steps=1", "train.checkpoint_every=1"]) == 0
            code = main(argv)
            assert code == 0, f"{page.name}: `{command}` exited {code}:\n{capsys.readouterr().err[-3000:]}"
        ran.append(command)
    print(f"ran {len(ran)} commands of the README and the docs; not run: " + "; ".join(f"`{c}` ({w})" for c, w in skipped))
    assert len(ran) >= 20


SNIPPETS = [(page, number) for page in doc_pages() for number in range(len(page_snippets(page.read_text())))]


@pytest.fixture
def registries():
    """The registries a snippet may add to (a loss, an objective, a backbone, a reward), as they were before it."""
    from diffalign.diffusion.backbones import BACKBONES
    from diffalign.losses import registry
    from diffalign.objectives import OBJECTIVES
    from diffalign.rewards import REWARDS

    kept = [(table, dict(table)) for table in (registry._REGISTRY, OBJECTIVES, BACKBONES, REWARDS)]
    yield
    for table, before in kept:
        table.clear()
        table.update(before)


@pytest.mark.parametrize("page, number", SNIPPETS, ids=[f"{p.name}-{n}" for p, n in SNIPPETS])
def test_every_python_snippet_runs_as_written(page, number, scratch, registries, monkeypatch):
    root, _ = scratch
    monkeypatch.chdir(root)
    exec(compile(page_snippets(page.read_text())[number], f"{page.name} python block {number}", "exec"), {})


@pytest.mark.slow
def test_every_docs_page_is_in_the_site_and_the_reference_pages_are_current():
    listed = {p.resolve() for p in doc_pages()}
    assert {p.resolve() for p in (ROOT / "docs").rglob("*.md")} <= listed, "a docs page is missing from mkdocs.yml's nav"
    done = subprocess.run([sys.executable, "scripts/gen_reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def config_comment_commands(text: str) -> list[list[str]]:
    """The ``diffalign ...`` commands a config's comments give: backticked, or a comment line of its own."""
    comments = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
    quoted = re.findall(r"`(diffalign [^`]+)`", comments)
    own_lines = [line for line in comments.splitlines() if line.startswith("diffalign ")]
    return [shlex.split(command.split("...")[0]) for command in quoted + own_lines]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_command_a_config_comment_gives_has_flags_and_keys_that_exist(config):
    """A config's comments tell users what to run with it (a tiny backbone's overrides, the eval that reads the
    run); each such command's flags are its subcommand's and a ``diffalign train`` line's overrides load. Two
    configs once said ``--set key=value``, which ``diffalign train`` refuses."""
    from diffalign.train import load_config

    for words in config_comment_commands((ROOT / "configs" / config).read_text()):
        check_flags(words)
        if words[1] == "train" and len(words) > 2:
            load_config(ROOT / words[2], [w for w in words[3:] if "=" in w])
