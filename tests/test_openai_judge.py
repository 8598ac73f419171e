"""The judge at an OpenAI-compatible endpoint: each template's reading by hand, specs with a URL, and the whole reward
against a real server, ``transformers serve`` over a tiny LLaVA started by the test (its head rigged to answer
"Final Score: 4" whatever it is shown, so the score it must give is known)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from test_vlm_judge import tiny_llava

from diffalign.cli import main
from diffalign.errors import RewardServerDown, UserError
from diffalign.paths import TOY_BASE
from diffalign.rewards import RewardSpec, load_reward
from diffalign.rewards.openai_judge import TEMPLATES, OpenAIJudge

ANSWER = "Final Score: 4"  # token 0 of the rigged judge: what an all-zero head answers, greedily, every time


def test_each_template_reads_its_score_by_hand():
    unified, yes_no, ten = TEMPLATES["unifiedreward"], TEMPLATES["yes_no"], TEMPLATES["score_10"]
    assert unified.read("The caption matches well.\nFinal Score: 4.5") == pytest.approx(0.9)  # Flow-GRPO: N / 5
    assert unified.read("final score: 2") == pytest.approx(0.4)
    assert unified.read("Final Score: 7") is None and unified.read("no score") is None  # 1 to 5 only
    assert yes_no.read("Yes, it does.") == 1.0 and yes_no.read(" no.") == 0.0 and yes_no.read("Maybe") is None
    assert ten.read("It is a fair match. Score: 7") == pytest.approx(0.7) and ten.read("Score: 10") == 1.0
    assert "[a red circle]" in unified.question.replace("{prompt}", "a red circle")


def test_a_url_path_keeps_its_colons_and_options_follow_it():
    assert RewardSpec.parse("openai_judge:http://gpu2:8000/v1:template=yes_no:max_tokens=4") == RewardSpec(
        "openai_judge", "http://gpu2:8000/v1", {"template": "yes_no", "max_tokens": "4"})
    assert RewardSpec.parse("openai_judge:https://judge.example/v1").path == "https://judge.example/v1"
    assert RewardSpec.parse("pickscore:/models/p:processor=/models/c") == RewardSpec(
        "pickscore", "/models/p", {"processor": "/models/c"})


def test_a_judge_of_one_s_own_needs_a_question_with_the_prompt_and_a_pattern():
    with pytest.raises(UserError, match="needs both question="):
        OpenAIJudge("http://127.0.0.1:9/v1", question="Is {prompt} shown?", model="m")
    with pytest.raises(UserError, match="must hold \\{prompt\\}"):
        OpenAIJudge("http://127.0.0.1:9/v1", question="Is it good?", pattern=r"(\d)", model="m")
    with pytest.raises(UserError, match="template 'pairwise' is not one of unifiedreward, yes_no, score_10"):
        OpenAIJudge("http://127.0.0.1:9/v1", template="pairwise", model="m")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """``transformers serve`` on a free local port, serving the rigged tiny LLaVA on the CPU; its /v1 URL."""
    from transformers import LlavaForConditionalGeneration

    folder = tiny_llava(tmp_path_factory.mktemp("judge") / "llava",
                        [ANSWER, "<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Yes", "No"])
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0 at every step
    model.save_pretrained(folder)
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--port",
                               str(port), "--device", "cpu", "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://localhost:{port}"
    for _ in range(240):  # until it answers (imports and start-up take seconds)
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            break
        except OSError:
            assert server.poll() is None, f"transformers serve exited: {server.stderr.read()[-2000:]}"
            time.sleep(0.5)  # polling a starting process, not waiting out a race
    else:
        server.kill()
        pytest.fail("transformers serve did not answer /health in 120 s")
    yield f"{url}/v1"
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_the_judge_scores_through_a_real_server_and_names_it_when_an_answer_has_no_score(judge_server):
    judge = load_reward(f"openai_judge:{judge_server}:max_tokens=6")  # UnifiedReward's template, the served model
    assert judge.name == "openai_judge" and judge.model.endswith("llava")  # found with GET /v1/models
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert judge(images, ["a red circle", "a blue square", "a cat"]).tolist() == pytest.approx([0.8] * 3)  # 4 / 5
    yes_no = load_reward(f"openai_judge:{judge_server}:template=yes_no:max_tokens=2")
    with pytest.raises(UserError, match=rf"at {judge_server} answered 'Final Score: 4.*' for the prompt 'a cat'; "
                                        "the yes_no template reads its score with"):
        yes_no(images[:1], ["a cat"])
    with pytest.raises(UserError, match="refused POST /chat/completions: 4"):  # a model it does not serve
        load_reward(f"openai_judge:{judge_server}:model=no/such-model:max_tokens=2")(images[:1], ["a cat"])


@pytest.mark.slow
def test_eval_scores_with_a_served_judge(judge_server, tmp_path, capsys):
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "toy_heldout", "--seeds", "1", "--steps", "2",
                 "--rewards", f"openai_judge:{judge_server}:max_tokens=6", "--out", str(tmp_path)]) == 0
    assert "| base | 0.800 [0.800, 0.800] |" in capsys.readouterr().out


def test_an_endpoint_that_does_not_answer_stops_after_its_retries():
    port = _free_port()  # nothing listens there
    with pytest.raises(RewardServerDown, match=rf"the judge endpoint at http://127.0.0.1:{port}/v1 did not answer "
                                              "GET /models after 2 tries"):
        OpenAIJudge(f"http://127.0.0.1:{port}/v1", retries=1, retry_wait=0)


@pytest.mark.slow
def test_the_pairwise_judge_sends_both_images_and_names_an_answer_with_no_verdict(judge_server):
    """Two images and the question go to the real server in one request; its rigged answer holds no verdict, which
    is an error naming the answer (Pref-GRPO would count it a tie)."""
    judge = load_reward(f"pairwise_judge:{judge_server}:max_tokens=6")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"pairwise judge .* answered 'Final Score: 4.*' for the prompt 'a cat'; the "
                                        r"pairwise template reads its verdict \(1 or 2\)"):
        judge.compare(images[:1], images[1:], ["a cat"])
