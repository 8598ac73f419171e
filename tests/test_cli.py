"""The command line: help, the losses listing, and clean errors without tracebacks."""

import os
import subprocess
import sys

import pytest

from diffalign import losses
from diffalign.cli import main


def test_help_lists_every_subcommand(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "eval", "generate-ranked", "pairs-to-labels", "export", "losses"):
        assert command in out


def test_losses_lists_every_registered_loss_with_paper(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in losses.names():
        assert f"  {name} " in out
    assert out.count("paper:") == len(losses.names()) + 2  # and the two LM score options
    assert "ld_alpha=ALPHA  LD-DPO" in out and "arXiv 2409.06411" in out
    assert "options: lambda_dpop=50.0" in out and "options: divergence=reverse_kl, alpha=0.5" in out
    assert out.count("options:") == sum(bool(s.options) for s in losses.specs())
    assert "METHODS.md" not in out  # papers are cited, not files a user does not have


@pytest.mark.slow
def test_a_bad_generate_ranked_config_exits_nonzero_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "diffalign", "generate-ranked", "configs/toy_generate_ranked.yaml", "generators=[]"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "generators is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_under_a_launcher_an_error_names_the_process_that_met_it(capsys, monkeypatch):
    """Under torchrun every process that meets a mistake prints it; each says which process it is."""
    bad = ["train", "configs/tiny_sdxl_dpo.yaml", "train.max_stpes=3"]
    assert main(bad) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'train.max_stpes'")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == 2
    assert capsys.readouterr().err.startswith("error (process 1 of 2): unknown config key 'train.max_stpes'")


@pytest.mark.slow
def test_a_reader_that_closes_early_is_not_an_error():
    """`diffalign losses | head`: the pipe's reader is gone before the listing is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "diffalign", "losses"], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, check=False)
    os.close(write_end)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_the_demos_durations_are_stated_alike_in_the_readme_the_quickstart_and_the_help(capsys):
    from diffalign.cli import DEMO_LM_TIME, DEMO_TIME
    from diffalign.paths import ROOT

    for page in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        text = " ".join(page.read_text().split())
        assert DEMO_TIME in text and DEMO_LM_TIME in text, page
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert DEMO_LM_TIME in help_text


def test_every_command_and_every_option_of_it_says_what_it_does(capsys):
    """No subcommand without a line of help, no option without one; options with a default name it."""
    from diffalign.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    parsers = dict(commands.choices)
    for name, sub in list(parsers.items()):
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        parsers.update({f"{name} {action}": p for n in nested for action, p in n.choices.items()})
    for name, sub in parsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"diffalign {name} {action.option_strings[0]} has no help"
                if action.default not in (None, False, [], ()) and not action.choices:  # choices list their own
                    assert "default" in action.help, f"diffalign {name} {action.option_strings[0]} does not say " \
                                                     f"its default ({action.default!r})"
    helps = {a.dest: a.help for a in commands._choices_actions}
    assert all(helps.values()), helps
