"""`diffalign label`: the labels log loses nothing, the server refuses bad requests without touching a file,
a killed server loses no label and resumes at the first unlabelled item, and a person labels pairs, ranked
lists and a D3PO round in a real browser (headless Chromium), by keyboard and by click."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from fixtures import pickapic_parquet, ranked_parquet

from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.label import LabelLog, LabelServer, open_source
from diffalign.paths import CONFIGS


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the log ---------------------------------------------------------------------------------
def test_the_log_keeps_every_line_and_the_last_one_per_labeller_counts(tmp_path):
    log = LabelLog(tmp_path / "labels.jsonl")
    log.append("row-0", 0, "ann")
    log.append("row-0", 1, "bob")
    log.append("row-1", "tie", "ann")
    log.append("row-1", None, "ann")  # undone
    log.append("row-2", "skip", "ann")
    assert log.choices("ann") == {"row-0": 0, "row-2": "skip"}
    assert log.labels() == {"row-0": {"ann": 0, "bob": 1}}
    assert log.agreement() == {"items": 1, "agreeing": 0, "share": 0.0}
    assert log.last_label_of("ann") == "row-2" and log.last_label_of("carl") is None
    again = LabelLog(tmp_path / "labels.jsonl")  # read back: the same state
    assert again.current == log.current and len(_lines(tmp_path / "labels.jsonl")) == 5


def test_a_line_cut_short_by_a_crash_is_ignored_named_and_cut_off_by_the_next_label(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"item": "row-0", "choice": 0, "labeller": "ann"}) + '\n{"item": "row-1", "cho')
    log = LabelLog(path)
    assert log.torn == f"{path}:2" and log.choices("ann") == {"row-0": 0}
    log.append("row-1", 1, "ann")
    assert LabelLog(path).choices("ann") == {"row-0": 0, "row-1": 1} and len(_lines(path)) == 2
    path.write_text('{"item": "row-0", "cho\n' + json.dumps({"item": "row-1", "choice": 0, "labeller": "ann"}) + "\n")
    with pytest.raises(ValueError, match="labels.jsonl:1 is not a label line"):
        LabelLog(path)


# --- the server over HTTP ------------------------------------------------------------------------
class Running:
    """A LabelServer on a free port, serving in a thread."""

    def __init__(self, source, token: str | None = None, request_timeout_s: float = 30) -> None:
        self.app = LabelServer(source, port=0, token=token, request_timeout_s=request_timeout_s)
        self.thread = threading.Thread(target=self.app.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.app.httpd.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.app.httpd.shutdown()
        self.app.httpd.server_close()


def _request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_malformed_request_gets_a_4xx_and_changes_no_file(tmp_path):
    source = open_source(pickapic_parquet(tmp_path / "pairs.parquet", 3), tmp_path / "out")
    with Running(source) as server:
        assert _request(f"{server.base}/api/label", b'{"index": 0, "choice": 1, "labeller": "ann"}')[0] == 200
        before = (tmp_path / "out" / "labels.jsonl").read_bytes(), (tmp_path / "out" / "pairs.jsonl").read_bytes()
        for body, message in ((b"not json", "not JSON"), (b"[1, 2]", "JSON object"),
                              (b'{"index": 9, "choice": 0, "labeller": "ann"}', "index must be"),
                              (b'{"index": 1, "choice": 5, "labeller": "ann"}', "choice must be 0 or 1"),
                              (b'{"index": 1, "choice": true, "labeller": "ann"}', "choice must be"),
                              (b'{"index": 1, "labeller": "ann"}', "needs a choice"),
                              (b'{"index": 1, "choice": 0, "labeller": "<script>"}', "labeller must be")):
            status, answer = _request(f"{server.base}/api/label", body)
            assert status == 400 and message in answer["error"], (body, answer)
        assert _request(f"{server.base}/api/undo", b'{"labeller": "bob"}') == (400, {"error": "bob has no label to undo"})
        assert _request(f"{server.base}/api/nothing", b"{}")[0] == 404
        assert _request(f"{server.base}/image/7/0")[0] == 404
        after = (tmp_path / "out" / "labels.jsonl").read_bytes(), (tmp_path / "out" / "pairs.jsonl").read_bytes()
        assert after == before


def test_another_host_needs_a_token_and_every_request_must_carry_it(tmp_path):
    source = open_source(pickapic_parquet(tmp_path / "pairs.parquet", 3), tmp_path / "out")
    with pytest.raises(UserError, match="give --token"):
        LabelServer(source, host="0.0.0.0", port=0)
    with Running(source, token="s3cret") as server:
        assert _request(f"{server.base}/api/state?labeller=ann")[0] == 403
        assert _request(f"{server.base}/api/state?labeller=ann&token=wrong")[0] == 403
        assert _request(f"{server.base}/api/state?labeller=ann&token=s3cret")[0] == 200


def _raw(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict]:
    """Send ``request`` byte for byte (headers a client library would not send) and read the status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(port: int, body: bytes, *, host: str | None = None, origin: str | None = None,
          content_type: str = "application/json", length: str | None = None) -> bytes:
    headers = [f"POST /api/label HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", f"Content-Type: {content_type}",
               f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    if origin:
        headers.append(f"Origin: {origin}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def test_without_a_token_other_sites_and_other_host_names_are_refused_and_nothing_is_written(tmp_path):
    """Issue 40's probes: a cross-site form POST (text/plain, Origin evil.example) and a DNS-rebinding read (Host
    evil.example) are refused; the page's own requests pass."""
    source = open_source(pickapic_parquet(tmp_path / "pairs.parquet", 3), tmp_path / "out")
    label = b'{"index": 0, "choice": 1, "labeller": "ann"}'
    with Running(source) as server:
        port = server.app.httpd.server_address[1]
        for request, message in (
                (_post(port, label, origin="http://evil.example", content_type="text/plain"), "other sites"),
                (_post(port, label, origin="http://evil.example"), "other sites"),
                (_post(port, label, content_type="text/plain"), "application/json"),
                (_post(port, label, host="evil.example:80"), "Host header"),
                (f"GET /api/item/0 HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n".encode(),
                 "Host header")):
            status, answer = _raw(port, request)
            assert status == 403 and message in answer["error"], (request, answer)
        assert not (tmp_path / "out" / "labels.jsonl").exists() or not _lines(tmp_path / "out" / "labels.jsonl")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):  # the page's own, by either name
            assert _raw(port, _post(port, label, host=host, origin=f"http://{host}"))[0] == 200
        assert len(_lines(tmp_path / "out" / "labels.jsonl")) == 2


def test_every_malformed_request_gets_a_4xx_reply_and_a_stalled_one_times_out(tmp_path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 3, corrupt_rows=(1,))
    source = open_source(data, tmp_path / "out")
    with Running(source, request_timeout_s=0.5) as server:
        port = server.app.httpd.server_address[1]
        status, answer = _raw(port, _post(port, b"{}", length="abc"))
        assert status == 400 and "Content-Length" in answer["error"]
        status, answer = _raw(port, _post(port, b'{"index": 0', length="200"))  # 11 bytes of 200, then nothing
        assert status == 408 and "did not arrive" in answer["error"]
        status, answer = _raw(port, f"GET /image/1/1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                    f"Connection: close\r\n\r\n".encode())
        assert status == 422 and "cannot be shown" in answer["error"]
        assert _request(f"{server.base}/api/state?labeller=ann")[0] == 200  # the server still answers


def _start(source: Path, out: Path) -> tuple[subprocess.Popen, str]:
    """The page in a process of its own, with Ctrl-C acting as in a terminal even when the suite itself runs in
    the background (a shell's background jobs ignore SIGINT, and their children inherit that)."""
    process = subprocess.Popen([sys.executable, "-m", "diffalign", "label", str(source), "--out", str(out),
                                "--port", "0"], stdout=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.readline()
    return process, re.search(r"(http://\S+?)/", first)[1]


@pytest.mark.slow
def test_a_killed_server_loses_no_label_and_resumes_at_the_first_unlabelled_item(tmp_path):
    pairs = pickapic_parquet(tmp_path / "pairs.parquet", 5)
    process, base = _start(pairs, tmp_path / "out")
    try:
        for index, choice in ((0, 0), (1, "tie"), (2, 1)):
            body = json.dumps({"index": index, "choice": choice, "labeller": "ann"}).encode()
            assert _request(f"{base}/api/label", body)[0] == 200
    finally:
        process.send_signal(signal.SIGKILL)  # no chance to save anything on the way out
        process.wait(timeout=30)
    process, base = _start(pairs, tmp_path / "out")
    try:
        status, state = _request(f"{base}/api/state?labeller=ann")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0  # Ctrl-C stops the page cleanly
    assert status == 200 and state["start"] == 3 and state["counts"] == {"labelled": 3, "skipped": 0}
    rows = _lines(tmp_path / "out" / "pairs.jsonl")
    assert [(r["source_row"], r["label_0"]) for r in rows] == [(0, 1.0), (1, 0.5), (2, 0.0)]
    assert all((tmp_path / "out" / r["jpg_0"]).is_file() for r in rows)


# --- in a browser --------------------------------------------------------------------------------
@pytest.fixture
def browser():
    from browser import chromium

    driver = chromium()
    yield driver
    driver.quit()


def _wait(driver, condition: str, timeout: float = 20.0):
    """Until the JavaScript expression ``condition`` is true on the page (the page answers asynchronously)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(f"return {condition}"))


def _on_item(driver, number: int) -> None:
    _wait(driver, f"document.getElementById('progress').textContent.startsWith('item {number} ')"
                  " && document.querySelectorAll('figure img').length > 0"
                  " && [...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)")


def _press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_a_person_labels_pairs_by_keyboard_and_click_with_a_tie_an_undo_and_a_skip(tmp_path, browser):
    source = open_source(pickapic_parquet(tmp_path / "pairs.parquet", 6), tmp_path / "out")
    with Running(source) as server:
        browser.get(f"{server.base}/?labeller=ann")
        _on_item(browser, 1)
        assert browser.execute_script("return getComputedStyle(document.querySelector('.scores')).display") == "none"
        assert browser.find_element("id", "prompt").text == "a picture number 0"
        assert min(browser.execute_script(
            "return [...document.querySelectorAll('figure img')].map(i => i.getBoundingClientRect().width)")) >= 128
        _press(browser, "1")  # item 1: the first image
        _on_item(browser, 2)
        browser.find_elements("css selector", "figure")[1].click()  # item 2: a click on the second
        _on_item(browser, 3)
        _press(browser, "0")  # item 3: a tie ...
        _on_item(browser, 4)
        _press(browser, "u")  # ... undone: back at item 3
        _on_item(browser, 3)
        _press(browser, "2")
        _on_item(browser, 4)
        _press(browser, "s")  # item 4 skipped
        _on_item(browser, 5)
        _press(browser, "r")  # reward scores on demand
        assert browser.execute_script("return getComputedStyle(document.querySelector('.scores')).display") == "block"
        assert "3 labelled" in browser.find_element("id", "progress").text
    log = _lines(tmp_path / "out" / "labels.jsonl")
    assert [(r["item"], r["choice"]) for r in log] == [("row-0", 0), ("row-1", 1), ("row-2", "tie"), ("row-2", None),
                                                       ("row-2", 1), ("row-3", "skip")]
    assert all(r["labeller"] == "ann" for r in log)
    rows = _lines(tmp_path / "out" / "pairs.jsonl")
    assert [(r["source_row"], r["label_0"]) for r in rows] == [(0, 1.0), (1, 0.0), (2, 0.0)]
    from diffalign.data import PairDataset

    trained_on = PairDataset(tmp_path / "out" / "pairs.jsonl", resolution=16)  # what the trainer reads
    assert len(trained_on) == 3


def test_a_person_ranks_a_list_by_picking_the_best_then_the_next(tmp_path, browser):
    source = open_source(ranked_parquet(tmp_path / "ranked.parquet", n=2, k=3), tmp_path / "out")
    with Running(source) as server:
        browser.get(f"{server.base}/?labeller=bob")
        _on_item(browser, 1)
        _press(browser, "3")
        browser.find_elements("css selector", "figure")[0].click()  # the last one follows by itself
        _on_item(browser, 2)
    assert [r["choice"] for r in _lines(tmp_path / "out" / "labels.jsonl")] == [[2, 0, 1]]
    (row,) = _lines(tmp_path / "out" / "ranked.jsonl")
    assert row["scores"] == [1.0, 0.0, 2.0] and row["labeller"] == "bob"
    from diffalign.data import RankedListDataset

    assert len(RankedListDataset(tmp_path / "out" / "ranked.jsonl", resolution=16)) == 1


def test_a_person_labels_edit_pairs_with_the_source_shown_and_the_dataset_keeps_it(tmp_path, browser):
    """Edits: each pair's source image is shown before the two edits (not a candidate: a click on it picks
    nothing), and the labelled dataset keeps the source column, so it trains edits as it came."""
    table = pickapic_parquet(tmp_path / "edits.parquet", 3, sources=("source",))
    source = open_source(table, tmp_path / "out", ["source"])
    with Running(source) as server:
        browser.get(f"{server.base}/?labeller=ann")
        _on_item(browser, 1)
        shown = browser.execute_script(
            "return [...document.querySelectorAll('figure')].map(f => [f.className, f.querySelector('img').alt])")
        assert shown == [["source", "source 1"], ["", "image 1"], ["", "image 2"]]
        browser.find_element("css selector", "figure.source").click()  # not a candidate: still item 1
        _press(browser, "2")
        _on_item(browser, 2)
    (row,) = _lines(tmp_path / "out" / "pairs.jsonl")
    assert row["label_0"] == 0.0 and (tmp_path / "out" / row["source"]).is_file()
    from diffalign.data.open import open_dataset
    from diffalign.train import load_config

    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"data.path={tmp_path / 'out' / 'pairs.jsonl'}",
                                                              "data.resolution=16", "data.source_columns=[source]"])
    assert len(open_dataset(config.data, "pairs").read(0).source_ids) == 1  # what an edit run reads
    with pytest.raises(UserError, match="no column before"):
        open_source(table, tmp_path / "out2", ["before"])


def test_an_edit_round_waiting_for_labels_shows_its_sources(tmp_path):
    """A D3PO edit round's to_label.jsonl names each pair's sources; the page gets them."""
    folder = tmp_path / "run" / "rounds" / "round-000000"
    (folder / "images").mkdir(parents=True)
    for name in ("group0000-0.png", "group0000-1.png", "group0000-source0.png"):
        Image.new("RGB", (8, 8), "red").save(folder / "images" / name)
    (folder / "to_label.jsonl").write_text(json.dumps({
        "round": 0, "pair": 0, "prompt": "make it blue", "winner": None,
        "images": ["images/group0000-0.png", "images/group0000-1.png"],
        "sources": ["images/group0000-source0.png"]}) + "\n")
    (tmp_path / "run" / "config.yaml").write_text("online: {labels: labels.jsonl}\n")
    source = open_source(tmp_path / "run")
    assert source.item(0).sources == 1
    assert source.source_image(0, 0) == (folder / "images" / "group0000-source0.png").read_bytes()


def test_the_d3po_human_feedback_loop_end_to_end_as_readme_gives_it(tmp_path, browser, monkeypatch, capsys):
    """The docs' three commands (docs/online.md): train stops for labels; `diffalign label RUN` serves the round; a
    person labels it in the browser; train.resume=latest continues. Run from a folder like a fresh clone's root,
    with only the toy config's size changed (run_configs.toy_size_overrides)."""
    from doc_commands import all_commands
    from run_configs import toy_size_overrides

    stop, label, resume = [c.split() for _, c in all_commands()
                           if "online.labels=" in c or c.startswith("diffalign label runs/")]
    assert stop[:3] == resume[:3] == ["diffalign", "train", "configs/toy_d3po.yaml"] and resume[-1] == "train.resume=latest"
    for name in ("assets", "configs"):
        (tmp_path / name).symlink_to(Path(CONFIGS).parent / name)
    monkeypatch.chdir(tmp_path)
    smaller = toy_size_overrides("toy_d3po.yaml")
    assert main([*stop[1:], *smaller]) == 2
    assert "round 0 waits for 2 human labels" in capsys.readouterr().err
    with Running(open_source(label[2])) as server:
        assert server.app.log.path == Path("labels.jsonl")  # the run's online.labels file
        browser.get(f"{server.base}/?labeller=ann")
        _on_item(browser, 1)
        assert not browser.find_element("id", "tie-key").is_displayed()  # D3PO needs a winner per pair
        _press(browser, "2")
        _on_item(browser, 2)
        browser.find_elements("css selector", "figure")[0].click()
        _wait(browser, "document.getElementById('prompt').textContent === 'All items are labelled.'")
    assert [(r["round"], r["pair"], r["winner"]) for r in _lines(tmp_path / "labels.jsonl")] == [(0, 0, 1), (0, 1, 0)]
    assert main([*resume[1:], *smaller]) == 0
    assert json.loads((tmp_path / "runs" / "toy_d3po" / "metrics.json").read_text())["steps"] == 2


def test_an_unknown_source_says_what_it_takes(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"caption": "a", "image": "x.png"}\n')
    with pytest.raises(UserError, match="neither a D3PO run waiting for labels"):
        open_source(tmp_path / "t.jsonl")


def test_two_labellers_are_kept_apart_and_their_agreement_is_counted(tmp_path):
    source = open_source(pickapic_parquet(tmp_path / "pairs.parquet", 3), tmp_path / "out")
    with Running(source) as server:
        for labeller, choices in (("ann", [0, 1]), ("bob", [0, 0])):
            for index, choice in enumerate(choices):
                body = json.dumps({"index": index, "choice": choice, "labeller": labeller}).encode()
                assert _request(f"{server.base}/api/label", body)[0] == 200
        status, state = _request(f"{server.base}/api/state?labeller=bob")
    assert state["agreement"] == {"items": 2, "agreeing": 1, "share": 0.5} and state["start"] == 2
    rows = _lines(tmp_path / "out" / "pairs.jsonl")
    assert [(r["source_row"], r["labeller"], r["label_0"]) for r in rows] == [
        (0, "ann", 1.0), (0, "bob", 1.0), (1, "ann", 0.0), (1, "bob", 1.0)]


def test_the_page_gets_large_images_shrunk_and_small_ones_as_they_are():
    import io

    from PIL import Image

    from diffalign.label.sources import PAGE_PX, page_image

    def encoded(size: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (size, size // 2), "red").save(buffer, format="PNG")
        return buffer.getvalue()

    body, kind = page_image(encoded(2048))
    assert kind == "image/jpeg" and Image.open(io.BytesIO(body)).size == (PAGE_PX, PAGE_PX // 2)
    body, kind = page_image(encoded(32))
    assert kind == "image/png" and Image.open(io.BytesIO(body)).size == (32, 16)


def test_a_person_labels_pairs_of_videos_played_in_a_loop_and_the_dataset_keeps_the_videos(tmp_path, browser):
    """Pairs of clips (MPEG-4 files beside a .jsonl index, which Chromium cannot play as they are): the page plays
    each as a looping muted video (VP9 WebM, its 5 frames at 8 fps), a key labels the pair, and the labelled dataset
    copies the videos under their own suffix, so a video run reads it (data.frames)."""
    from diffalign.data import PairDataset
    from diffalign.data.video import VideoClips
    from diffalign.recipes.samples import write_example

    index = write_example("pairs", tmp_path / "clips" / "pairs.jsonl", frames=5)
    source = open_source(index, tmp_path / "out")
    with Running(source) as server:
        browser.get(f"{server.base}/?labeller=ann")
        _wait(browser, "document.querySelectorAll('figure video').length === 2 && [...document.querySelectorAll("
                       "'figure video')].every(v => v.readyState >= 1)")
        videos = browser.execute_script("return [...document.querySelectorAll('figure video')].map(v => "
                                        "[v.duration, v.videoWidth, v.loop, v.muted, v.title])")
        assert [title for *_, title in videos] == ["video 1", "video 2"]
        assert all(abs(duration - 5 / 8) < 0.05 and width == 32 and loop and muted
                   for duration, width, loop, muted, _ in videos), videos
        _press(browser, "2")
        _wait(browser, "document.getElementById('progress').textContent.startsWith('item 2 ')")
    (row,) = _lines(tmp_path / "out" / "pairs.jsonl")
    assert row["label_0"] == 0.0 and row["jpg_0"].endswith(".mp4") and row["jpg_1"].endswith(".mp4")
    labelled = PairDataset(tmp_path / "out" / "pairs.jsonl", resolution=32, video=VideoClips(5))
    assert labelled.example(0).pixels.shape == (2, 3, 5, 32, 32)
