"""Judges behind one interface, and the two benchmarks' scoring on top of them.

A judge has one verb, ``ask(images, prompt) -> str`` (images first, then the text, as the benchmarks' own
clients send them), and an ``identity`` (backend, model, endpoint) that is logged with every score. Backends:

* :class:`OpenAIJudge`: any OpenAI-compatible ``/chat/completions`` endpoint (images as base64 PNG data URLs),
  retried with exponential back-off on 429, 5xx, timeouts and refused connections; other 4xx fail at once.
* :class:`QwenVLJudge`: Qwen2.5-VL-Instruct generating on this library's own ``models.qwen2_5_vl`` (greedy,
  KV cache), with Qwen's chat template and image preprocessing (``models.qwen_processor``).
* :class:`ScriptedJudge`: a Python function of (images, prompt), for tests and CI.

:func:`cached` wraps any judge with an on-disk answer cache keyed by the images' PNG bytes, the prompt and
the judge's identity, so rescoring a run is free and reproducible.

Scoring. GEdit-Bench uses VIEScore's "tie" task (the prompt texts are VIEScore's ``_context_no_delimit``,
``_prompts_0shot_two_image_edit_rule``, ``_prompts_0shot_tie_rule_SC`` and ``_prompts_0shot_rule_PQ`` as the
GEdit-Bench code in github.com/stepfun-ai/Step1X-Edit vendors them, joined by newlines): SC from [source,
edited] + instruction, PQ from [edited]; each answer holds a JSON object whose "score" is a list of 0-10
numbers, and SC = min(list), PQ = min(list), O = sqrt(SC x PQ). ImgEdit-Bench's single-turn suite
(github.com/PKU-YuanGroup/ImgEdit, ``Benchmark/Basic/prompts.json``, shipped here as ``imgedit_prompts.json``)
sends [source, edited] and the edit type's rubric with the instruction in place of ``<edit_prompt>``; the
answer names three 1-5 criteria and the item's score is their mean. Where the official scripts guess a
random score for an unparsable answer, we mark the answer malformed (with the reason) and the tables count
it and leave it out.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from specedit.toy import atomic

GEDIT_CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""  # noqa: E501
GEDIT_TWO_IMAGE_RULE = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.
"""  # noqa: E501
GEDIT_SC_RULE = """
From scale 0 to 10: 
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""  # noqa: E501, W291
GEDIT_PQ_RULE = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 0 to 10: 
A score from 0 to 10 will be given based on image naturalness. 
(
    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 0 to 10 will rate the image artifacts. 
(
    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]
"""  # noqa: E501, W291
GEDIT_SC_PROMPT = "\n".join([GEDIT_CONTEXT, GEDIT_TWO_IMAGE_RULE, GEDIT_SC_RULE])
GEDIT_PQ_PROMPT = "\n".join([GEDIT_CONTEXT, GEDIT_PQ_RULE])
IMGEDIT_PROMPTS: dict[str, str] = json.loads((Path(__file__).parent / "imgedit_prompts.json").read_text())


# ----------------------------------------------------------------------------------------------- judges
def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ScriptedJudge:
    """Answers with ``fn(images, prompt)``: deterministic, for tests and CI."""

    fn: Callable[[Sequence[Image.Image], str], str]
    name: str = "scripted"

    @property
    def identity(self) -> str:
        return f"scripted:{self.name}"

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        return self.fn(images, prompt)


@dataclass(frozen=True)
class OpenAIJudge:
    """An OpenAI-compatible chat endpoint. ``url`` is the API base (``https://api.openai.com/v1``) or the full
    ``.../chat/completions`` address; the key is read from ``api_key_env`` (None: no key, for local servers).
    Retries ``retries`` times with ``backoff`` x 2^k seconds between tries (``sleep`` is injectable)."""

    url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 2.0
    temperature: float = 0.0
    max_tokens: int = 1024
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {self.url!r}")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError(f"need retries >= 0, timeout > 0, backoff >= 0; got {self.retries}, {self.timeout}, "
                             f"{self.backoff}")  # fmt: skip
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"the judge's API key variable {self.api_key_env} is not set (export it, or pass "
                             "--api-key-env '' for a server without keys)")  # fmt: skip

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    @property
    def identity(self) -> str:
        return f"openai:{self.model}@{self.endpoint}"

    def body(self, images: Sequence[Image.Image], prompt: str) -> bytes:
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                      + base64.b64encode(png_bytes(im)).decode()}}
                 for im in images]  # fmt: skip
        parts.append({"type": "text", "text": prompt})
        message = {"role": "user", "content": parts}
        return json.dumps({"model": self.model, "messages": [message], "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()  # fmt: skip

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read())
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            got = str(reply)[:200]
            raise ValueError(f"{self.endpoint} answered without choices[0].message.content: {got}") from None

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        data, last = self.body(images, prompt), None
        for attempt in range(self.retries + 1):
            try:
                return self._post(data)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    why = f"HTTP {e.code} {e.reason}"
                    raise ConnectionError(f"judge {self.endpoint} refused the request: {why}") from None
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt < self.retries:
                self.sleep(self.backoff * 2**attempt)
        raise ConnectionError(
            f"judge {self.endpoint} unreachable after {self.retries + 1} tries (last: {last})"
        )


SYSTEM = "You are a helpful assistant."
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def instruct_files(path_or_id: str) -> Path | str:
    """A Qwen2.5-VL-Instruct repo's tokenizer and preprocessor files: a local folder as is; a hub id has its
    root ``*.json`` and ``*.txt`` downloaded (an Instruct repo keeps them at the root, not in ``processor/``)."""
    from models.loading import download, is_repo_id

    return download(path_or_id, ["*.json", "*.txt"]) if is_repo_id(str(path_or_id)) else path_or_id


@dataclass
class QwenVLJudge:
    """Qwen2.5-VL-Instruct on ``models.qwen2_5_vl`` with greedy decoding. ``model`` has ``generate``
    (new token ids); ``processor`` is a ``models.qwen_processor.QwenProcessor`` (chat tokens, images)."""

    model: object
    processor: object
    name: str = "qwen2.5-vl"
    max_new_tokens: int = 512

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, *, device=None, dtype=None, max_new_tokens: int = 512
    ) -> QwenVLJudge:
        import torch

        from models.qwen2_5_vl import load_qwen2_5_vl
        from models.qwen_processor import load_qwen_processor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        processor = load_qwen_processor(instruct_files(path_or_id))
        model = load_qwen2_5_vl(path_or_id, lm_head=True, device=device, dtype=dtype)
        return cls(model, processor, name=str(path_or_id), max_new_tokens=max_new_tokens)

    @property
    def identity(self) -> str:
        return f"qwen-vl:{self.name}"

    def chat(self, n_images: int, prompt: str) -> str:
        user = VISION * n_images + prompt
        return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        import torch

        tok = self.processor.tokenizer
        inputs = self.processor([self.chat(len(images), prompt)], list(images))
        param = next(self.model.parameters())
        inputs = {
            k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()
        }
        eos = [tok.token_id("<|im_end|>"), tok.pad_id]
        with torch.no_grad():
            new = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, eos_token_id=eos)[
                0
            ].tolist()
        return tok.decode(new[: next((i for i, t in enumerate(new) if t in eos), len(new))])


@dataclass(frozen=True)
class CachedJudge:
    """``judge`` with its answers kept in ``folder`` (one JSON file per question, written atomically)."""

    judge: object
    folder: Path

    @property
    def identity(self) -> str:
        return self.judge.identity

    def key(self, images: Sequence[Image.Image], prompt: str) -> str:
        h = hashlib.sha256(self.identity.encode() + b"\0" + prompt.encode())
        for im in images:
            h.update(b"\0" + hashlib.sha256(png_bytes(im)).digest())
        return h.hexdigest()

    def ask(self, images: Sequence[Image.Image], prompt: str) -> str:
        path = self.folder / f"{self.key(images, prompt)}.json"
        if path.is_file():
            return json.loads(path.read_text())["answer"]
        answer = self.judge.ask(images, prompt)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"judge": self.identity, "prompt": prompt, "answer": answer})
        return answer


def cached(judge, folder: str | os.PathLike) -> CachedJudge:
    """``judge`` answering through the on-disk cache in ``folder``."""
    return CachedJudge(judge, Path(folder))


# ----------------------------------------------------------------------------------------------- scoring
def parse_vie(answer: str) -> tuple[list[float] | None, str]:
    """The 0-10 "score" list of a VIEScore answer (the JSON object between the first "{" and the last "}",
    or a bare list), and "" or the reason it is malformed."""
    start, end = answer.find("{"), answer.rfind("}") + 1
    try:
        if start != -1 and end > start:
            scores = json.loads(answer[start:end].replace("\n", ""))["score"]
        else:
            start, end = answer.find("["), answer.rfind("]") + 1
            if start == -1 or end <= start:
                return None, "no JSON object or list"
            scores = json.loads(answer[start:end])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return None, f"unparsable JSON ({type(e).__name__})"
    scores = scores if isinstance(scores, list) else [scores]
    if not scores or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        return None, f"score is not a list of numbers: {scores!r}"[:120]
    if not all(0 <= s <= 10 for s in scores):
        return None, f"score out of 0-10: {scores}"
    return [float(s) for s in scores], ""


def gedit_score(judge, source: Image.Image, edited: Image.Image, instruction: str) -> dict:
    """VIEScore SC, PQ and O of one edit (None where an answer is malformed), the raw answers and why."""
    sc_answer = judge.ask([source, edited], GEDIT_SC_PROMPT.replace("<instruction>", instruction))
    pq_answer = judge.ask([edited], GEDIT_PQ_PROMPT)
    sc, sc_why = parse_vie(sc_answer)
    pq, pq_why = parse_vie(pq_answer)
    reasons = [f"{n}: {w}" for n, w in (("SC", sc_why), ("PQ", pq_why)) if w]
    SC, PQ = (min(sc) if sc else None), (min(pq) if pq else None)
    O = math.sqrt(SC * PQ) if SC is not None and PQ is not None else None
    return {"SC": SC, "PQ": PQ, "O": O, "malformed": bool(reasons), "reason": "; ".join(reasons),
            "answers": {"SC": sc_answer, "PQ": pq_answer}}  # fmt: skip


def rubric_criteria(rubric: str) -> list[str]:
    """The three criterion names of an ImgEdit rubric (its "Name: A number from 1 to 5." lines)."""
    return re.findall(r"^(.+?): A number from 1 to 5\.$", rubric, flags=re.M)


def parse_rubric(answer: str, criteria: Sequence[str]) -> tuple[list[float] | None, str]:
    """The 1-5 score after each criterion name in the answer, and "" or the reason it is malformed."""
    scores = []
    for name in criteria:
        m = re.search(re.escape(name) + r"\W*?:?\**\s*:?\s*\**\s*(\d+(?:\.\d+)?)", answer)
        if m is None:
            return None, f"no score for {name!r}"
        value = float(m.group(1))
        if not 1 <= value <= 5:
            return None, f"{name} score {value:g} out of 1-5"
        scores.append(value)
    return scores, ""


def imgedit_score(judge, source: Image.Image, edited: Image.Image, instruction: str, edit_type: str) -> dict:
    """ImgEdit's 1-5 score of one edit (the mean of its rubric's three criteria; None if malformed)."""
    if edit_type not in IMGEDIT_PROMPTS:
        raise ValueError(f"unknown ImgEdit edit type {edit_type!r}; choose from {', '.join(IMGEDIT_PROMPTS)}")
    rubric = IMGEDIT_PROMPTS[edit_type]
    answer = judge.ask([source, edited], rubric.replace("<edit_prompt>", instruction))
    scores, why = parse_rubric(answer, rubric_criteria(rubric))
    return {"score": sum(scores) / len(scores) if scores else None, "criteria": scores, "malformed": bool(why),
            "reason": why, "answers": {"score": answer}}  # fmt: skip


def demo_script(images: Sequence[Image.Image], prompt: str) -> str:
    """A deterministic stand-in judge for CI: scores from image statistics in each benchmark's answer format
    (SC from how much the edit changed the source, PQ from the image's contrast, ImgEdit from both)."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) / 255 for im in images]
    change = float(np.abs(arrays[-1] - arrays[0]).mean()) if len(arrays) > 1 else 0.0
    contrast = float(arrays[-1].std())
    if "A number from 1 to 5" in prompt:
        a = 1 + round(min(4.0, 40 * change))
        b = 1 + round(min(4.0, 12 * contrast))
        names = rubric_criteria(prompt)
        return "Brief reasoning: scripted.\n" + "\n".join(
            f"{n}: {s}" for n, s in zip(names, (a, b, min(a, b)))
        )
    if len(arrays) > 1:
        scores = [round(min(10.0, 100 * change), 1), round(10 * (1 - min(1.0, 4 * change)), 1)]
    else:
        scores = [round(min(10.0, 30 * contrast), 1), round(min(10.0, 25 * contrast), 1)]
    return json.dumps({"score": scores, "reasoning": "scripted"})
