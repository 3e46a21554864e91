"""Judges: the OpenAI-compatible backend end to end against a fake server on 127.0.0.1 (good and malformed
answers, a 500 then success, a timeout, an unreachable port, a missing key), the answer cache, VIEScore and
ImgEdit parsing, and the local Qwen2.5-VL judge against transformers' greedy generation."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from specedit.evals import judges

RED, BLUE = Image.new("RGB", (16, 12), (220, 20, 20)), Image.new("RGB", (16, 12), (20, 20, 220))


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions on a free port; ``plan`` is a list of (status, answer text or
    None, delay seconds) served in order (the last one repeats); ``requests`` collects the bodies."""

    def __init__(self, plan):
        self.plan, self.requests = list(plan), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                status, text, delay = server.plan.pop(0) if len(server.plan) > 1 else server.plan[0]
                time.sleep(delay)
                data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # the client gave up (the timeout test)
                    self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge(url, **kw):
    return judges.OpenAIJudge(url, "gpt-test", api_key_env="JUDGE_KEY", sleep=lambda s: None, **kw)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")


def test_good_answers_end_to_end():
    answers = [(200, '{"score": [7, 9], "reasoning": "ok"}', 0), (200, 'sure: {"score" : [8, 6]}', 0)]
    with FakeServer(answers) as server:
        s = judges.gedit_score(judge(server.url), RED, BLUE, "make it blue")
    assert (s["SC"], s["PQ"], s["malformed"]) == (7.0, 6.0, False)
    assert s["O"] == pytest.approx((7 * 6) ** 0.5)
    sc, pq = server.requests
    assert sc["path"] == "/v1/chat/completions" and sc["auth"] == "Bearer sk-test"
    assert sc["body"]["model"] == "gpt-test"
    parts = sc["body"]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    png = base64.b64decode(parts[1]["image_url"]["url"].removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (20, 20, 220)
    assert parts[2]["text"] == judges.GEDIT_SC_PROMPT.replace("<instruction>", "make it blue")
    assert [p["type"] for p in pq["body"]["messages"][0]["content"]] == ["image_url", "text"]


def test_malformed_answers_are_flagged_not_dropped():
    with FakeServer([(200, "I refuse to score this.", 0), (200, '{"score": [11, 3]}', 0)]) as server:
        s = judges.gedit_score(judge(server.url), RED, BLUE, "x")
    assert s["malformed"] and s["SC"] is None and s["O"] is None and s["PQ"] is None
    assert "SC: no JSON object or list" in s["reason"] and "PQ: score out of 0-10: [11, 3]" in s["reason"]


def test_500_is_retried_then_succeeds():
    sleeps = []
    plan = [(500, None, 0), (503, None, 0), (200, '{"score": [5, 5]}', 0)]
    with FakeServer(plan) as server:
        j = judges.OpenAIJudge(server.url, "m", api_key_env="JUDGE_KEY", sleep=sleeps.append, backoff=1.0)
        assert j.ask([RED], "q") == '{"score": [5, 5]}'
    assert sleeps == [1.0, 2.0] and len(server.requests) == 3


def test_400_fails_at_once():
    with (
        FakeServer([(400, None, 0)]) as server,
        pytest.raises(ConnectionError, match="refused the request: HTTP 400"),
    ):
        judge(server.url).ask([RED], "q")
    assert len(server.requests) == 1


def test_timeout_and_unreachable_fail_in_one_line():
    with FakeServer([(200, "late", 1.0)]) as server, pytest.raises(ConnectionError) as e:
        judge(server.url, timeout=0.2, retries=1).ask([RED], "q")
    assert "unreachable after 2 tries (last: " in str(e.value) and "\n" not in str(e.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        ConnectionError, match=rf"judge http://127.0.0.1:{port}/v1/chat/completions unreachable"
    ):
        judge(f"http://127.0.0.1:{port}/v1", retries=0).ask([RED], "q")


def test_bad_settings(monkeypatch):
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ValueError, match="API key variable JUDGE_KEY is not set"):
        judge("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="must start with http"):
        judges.OpenAIJudge("ftp://x", "m", api_key_env=None)
    assert judges.OpenAIJudge("http://h/v1/chat/completions", "m", api_key_env=None).endpoint.endswith(
        "/v1/chat/completions"
    )


def test_cache_answers_without_asking_again(tmp_path):
    with FakeServer([(200, '{"score": [4, 6]}', 0)]) as server:
        j = judges.cached(judge(server.url), tmp_path)
        assert j.ask([RED, BLUE], "q") == j.ask([RED, BLUE], "q") == '{"score": [4, 6]}'
        assert len(server.requests) == 1
        j.ask([BLUE, RED], "q")  # other images: a new question
        assert len(server.requests) == 2
    again = judges.cached(
        judge(server.url, retries=0), tmp_path
    )  # the server is gone: only the cache answers
    assert again.ask([RED, BLUE], "q") == '{"score": [4, 6]}' and len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize(
    "answer, scores",
    [('{"score": [3, 8], "reasoning": "a"}', [3, 8]), ('```json\n{\n"score" : [6.5, 7],\n"reasoning" : "b"\n}\n```',
     [6.5, 7]), ("[2, 9]", [2, 9]), ('{"score": 4}', [4]), ('{"reasoning": "no score"}', None),
     ('{"score": ["high", 3]}', None), ("", None)],
)  # fmt: skip
def test_vie_parsing(answer, scores):
    got, why = judges.parse_vie(answer)
    assert got == scores and (why == "") == (scores is not None)


def test_imgedit_rubrics_and_parsing():
    assert sorted(judges.IMGEDIT_PROMPTS) == sorted(
        ["replace", "add", "adjust", "remove", "style", "action", "extract", "background", "compose"]
    )
    for rubric in judges.IMGEDIT_PROMPTS.values():
        assert len(judges.rubric_criteria(rubric)) == 3 and "<edit_prompt>" in rubric
    names = judges.rubric_criteria(judges.IMGEDIT_PROMPTS["remove"])
    assert names == ["Prompt Compliance", "Visual Naturalness", "Physical & Detail Integrity"]
    answer = "Brief reasoning: fine.\nPrompt Compliance: 5\n**Visual Naturalness:** 4\nPhysical & Detail Integrity: 3"
    assert judges.parse_rubric(answer, names) == ([5.0, 4.0, 3.0], "")
    assert judges.parse_rubric("Prompt Compliance: 5", names)[1] == "no score for 'Visual Naturalness'"
    assert "out of 1-5" in judges.parse_rubric(answer.replace(": 5", ": 7"), names)[1]
    j = judges.ScriptedJudge(lambda ims, p: answer, "fixed")
    s = judges.imgedit_score(j, RED, BLUE, "remove the cat", "remove")
    assert s["score"] == pytest.approx(4.0) and not s["malformed"]
    with pytest.raises(ValueError, match="unknown ImgEdit edit type 'alter'"):
        judges.imgedit_score(j, RED, BLUE, "x", "alter")


def test_demo_script_is_deterministic_and_well_formed():
    j = judges.ScriptedJudge(judges.demo_script)
    a, b = judges.gedit_score(j, RED, BLUE, "x"), judges.gedit_score(j, RED, BLUE, "x")
    assert a == b and not a["malformed"]
    assert not judges.imgedit_score(j, RED, BLUE, "x", "add")["malformed"]


def test_qwen_vl_judge_generates_like_transformers(tmp_path):
    pytest.importorskip("transformers")
    from refs_vl import build_tokenizer_files, random_image, tiny_vl_reference

    from models.qwen2_5_vl import load_qwen2_5_vl
    from models.qwen_processor import load_qwen_processor

    ids = build_tokenizer_files(tmp_path)
    ref = tiny_vl_reference(seed=3, ids=ids)
    ref.save_pretrained(tmp_path / "model")
    processor = load_qwen_processor(tmp_path)
    j = judges.QwenVLJudge(load_qwen2_5_vl(tmp_path / "model", lm_head=True), processor, name="tiny",
                           max_new_tokens=12)  # fmt: skip
    image = random_image(56, 84, seed=2)
    text = j.ask([image], "Rate it.")
    inputs = processor([j.chat(1, "Rate it.")], [image])
    mm = (inputs["input_ids"] == ref.config.image_token_id).int()
    eos = [processor.tokenizer.token_id("<|im_end|>"), processor.tokenizer.pad_id]
    with torch.no_grad():
        want = ref.generate(
            **inputs, mm_token_type_ids=mm, do_sample=False, max_new_tokens=12, eos_token_id=eos
        )
    new = want[0, inputs["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    assert text == processor.tokenizer.decode(new) and j.identity == "qwen-vl:tiny"


def test_instruct_hub_id_fetches_the_root_tokenizer_files(monkeypatch, tmp_path):
    import models.loading

    calls = []
    monkeypatch.setattr(
        models.loading, "download", lambda repo, patterns: calls.append((repo, patterns)) or tmp_path
    )
    assert judges.instruct_files("Qwen/Qwen2.5-VL-7B-Instruct") == tmp_path
    assert calls == [("Qwen/Qwen2.5-VL-7B-Instruct", ["*.json", "*.txt"])]
    assert judges.instruct_files(str(tmp_path)) == str(tmp_path)  # a local folder as is
