"""``diffalign serve-reward``: a reward in a second process, scored over HTTP by an online run; a server that drops
mid-run stops the run with a checkpoint, and the run resumed once it is back ends with the very weights of a run that
scored in-process."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import RewardServerDown, UserError
from diffalign.rewards import RemoteReward, ToyPreference, load_reward
from diffalign.rewards.remote import RewardServer
from diffalign.toy import random_scene, render
from diffalign.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
# serves the toy preference on a free port; with an argument N, the process dies on its N+1-th scoring call
SERVER = """
import os, sys
from diffalign.rewards import ToyPreference
from diffalign.rewards.remote import RewardServer

class DiesAfter(ToyPreference):
    calls = 0
    def __call__(self, images, prompts):
        if len(sys.argv) > 2 and DiesAfter.calls == int(sys.argv[2]):
            os._exit(1)
        DiesAfter.calls += 1
        return super().__call__(images, prompts)

server = RewardServer(DiesAfter(), port=int(sys.argv[1]))
print(server.url, flush=True)
server.serve()
"""


def start(port: int = 0, dies_after: int | None = None) -> tuple[subprocess.Popen, str]:
    """A server process and its URL (read from its first line: no waiting on a clock)."""
    argv = [sys.executable, "-c", SERVER, str(port), *([] if dies_after is None else [str(dies_after)])]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return process, process.stdout.readline().strip()


def toy_images(count: int) -> tuple[torch.Tensor, list[str]]:
    """Rendered toy scenes (8-bit already, so PNG carries them exactly) and their captions."""
    scenes = [random_scene(random.Random(i)) for i in range(count)]
    images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return images, [s.caption for s in scenes]


def test_the_cli_serves_a_reward_that_scores_as_it_does_in_process():
    process = subprocess.Popen([sys.executable, "-m", "diffalign", "serve-reward", "toy_preference", "--port", "0"],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        remote = load_reward(url)
        assert isinstance(remote, RemoteReward) and remote.name == "toy_preference" and "larger" in remote.description
        images, prompts = toy_images(6)
        torch.testing.assert_close(remote(images, prompts), ToyPreference()(images, prompts), rtol=0, atol=1e-6)
    finally:
        process.terminate()
        process.wait()


def test_a_token_is_needed_beyond_this_machine_and_a_wrong_one_is_refused(monkeypatch):
    with pytest.raises(UserError, match="--host 0.0.0.0 lets other machines reach the reward: give --token"):
        RewardServer(ToyPreference(), host="0.0.0.0", port=0)
    server = RewardServer(ToyPreference(), port=0, token="s3cret")
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("DIFFALIGN_REWARD_TOKEN", raising=False)
        with pytest.raises(UserError, match=r"refused GET /info: 401.*DIFFALIGN_REWARD_TOKEN"):
            load_reward(server.url)
        monkeypatch.setenv("DIFFALIGN_REWARD_TOKEN", "s3cret")
        remote = load_reward(server.url)
        images, prompts = toy_images(2)
        assert remote(images, prompts).shape == (2,)
        server.reward = load_reward("ocr")  # its own refusal (the toy prompts quote no text) reaches the client
        with pytest.raises(UserError, match=r"refused POST /score: 422.*quotes no text"):
            remote(images, prompts)
    finally:
        server.httpd.shutdown()


def test_a_server_that_is_gone_fails_loudly_after_its_retries():
    process, url = start()
    remote = load_reward({"name": "remote", "path": url, "retries": 2, "retry_wait": 0})
    process.terminate()
    process.wait()
    images, prompts = toy_images(2)
    with pytest.raises(RewardServerDown, match=rf"reward server at {url} did not answer POST /score after 3 tries"):
        remote(images, prompts)


_D3PO = ["online.groups_per_round=4", "online.steps_per_round=2", "objective.sample_steps=4", "train.batch_size=2",
         "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "validation.every=0",
         "validation.prompt_file=null"]


def _d3po(out: Path, reward: str | dict, *extra: str):
    config = load_config(ROOT / "configs/toy_d3po.yaml", [f"output_dir={out}", *_D3PO, *extra])
    config.online.reward = reward
    return config


@pytest.mark.slow
def test_a_server_dropping_mid_run_stops_it_with_a_checkpoint_and_the_resumed_run_loses_nothing(tmp_path):
    in_process = train(_d3po(tmp_path / "local", "toy_preference"))
    process, url = start(dies_after=1)  # scores round 0, dies on round 1
    port = int(url.rsplit(":", 1)[1])
    reward = {"name": "remote", "path": url, "retries": 1, "retry_wait": 0}
    try:
        with pytest.raises(UserError, match=rf"{url} did not answer POST /score.*checkpointed at step 2.*resume=latest"):
            train(_d3po(tmp_path / "served", reward))
    finally:
        process.wait()
    assert (tmp_path / "served/checkpoints/step-0000002/trainer_state.json").is_file()
    process, _ = start(port)  # back, on the same address
    try:
        resumed = train(_d3po(tmp_path / "served", reward, "train.resume=latest"))
    finally:
        process.terminate()
        process.wait()
    assert resumed["steps"] == in_process["steps"] == 4
    a = load_file(str(tmp_path / "local/final/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "served/final/pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
