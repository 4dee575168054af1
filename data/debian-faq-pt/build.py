"""Build forja's demo evaluation and fine-tuning sets from the Portuguese Debian FAQ.

    apt-get download debian-faq-pt && dpkg -x debian-faq-pt_*.deb pkg
    python data/debian-faq-pt/build.py pkg/usr/share/doc/debian/FAQ/debian-faq.pt.txt.gz

The FAQ (Copyright Software in the Public Interest; licence in COPYRIGHT beside this file)
is split into question/answer pairs. Every fifth question is held out for evaluation;
the rest are the fine-tuning set. Written here, committed, and read by configs/demo.yaml:

  qa-test.jsonl      generation: {"prompt", "reference"} (BLEU, chrF, token F1), the
                     question in a plain-text prompt (for the pretrained model)
  qa-chat-test.jsonl the same, the bare question (a user message in the chat template)
  mc-test.jsonl      multiple choice: which answer belongs to the question
  chapter-test.jsonl classification: which chapter of the FAQ a question comes from
  text-test.jsonl    held-out text: the held-out answers (perplexity, bits per byte)
  train.jsonl        fine-tuning pairs: {"prompt", "response"}
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

HEAD = re.compile(r"^(\d+)\.(\d+)\. (.+)$")
CHAPTER = re.compile(r"^Capítulo (\d+)\. (.+)$")
MAX_ANSWER = 400  # characters: the first paragraph(s), cut at a sentence end


def pairs(text: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if CHAPTER.match(x))
    chapters, out, cur = {}, [], None
    i = start
    while i < len(lines):
        line, i = lines[i], i + 1
        title = CHAPTER.match(line) or HEAD.match(line)
        if title:
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(" "):  # a wrapped title
                line, i = line + " " + lines[i].strip(), i + 1
        if m := CHAPTER.match(line):
            chapters[int(m[1])] = m[2].strip()
        elif (m := HEAD.match(line)) and int(m[1]) in chapters:
            cur = {"chapter": chapters[int(m[1])], "question": m[3].strip(), "body": []}
            out.append(cur)
        elif cur is not None:
            cur["body"].append(line.strip())
    result = []
    for p in out:
        answer = re.sub(r"\s+", " ", " ".join(p["body"])).strip()
        if len(answer) > MAX_ANSWER:
            cut = answer[:MAX_ANSWER]
            answer = cut[: cut.rfind(". ") + 1] or cut
        if len(answer) >= 40 and not p["question"].startswith(("Secção", "Section")):
            result.append({"chapter": p["chapter"], "question": p["question"], "answer": answer})
    return result


def prompt(question: str) -> str:
    return f"Pergunta: {question}\nResposta:"


def main(src: str, out: Path) -> None:
    items = pairs(gzip.open(src, "rt", encoding="utf-8").read())
    rng = random.Random(0)
    test, train = items[::5], [x for i, x in enumerate(items) if i % 5]
    write = lambda name, rows: (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write("qa-test.jsonl", [{"prompt": prompt(x["question"]), "reference": x["answer"]} for x in test])
    write("qa-chat-test.jsonl", [{"prompt": x["question"], "reference": x["answer"]} for x in test])
    write("text-test.jsonl", [{"text": x["answer"]} for x in test])
    write("train.jsonl", [{"prompt": x["question"], "response": x["answer"]} for x in train])
    mc = []
    for i, x in enumerate(test):
        others = rng.sample([y["answer"] for j, y in enumerate(items) if y["question"] != x["question"]], 3)
        choices = others + [x["answer"]]
        rng.shuffle(choices)
        mc.append({"question": prompt(x["question"]), "choices": choices, "answer": choices.index(x["answer"])})
    write("mc-test.jsonl", mc)
    labels = sorted({x["chapter"] for x in items})
    write("chapter-test.jsonl", [{"text": x["question"], "label": x["chapter"]} for x in test])
    (out / "labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(items)} pairs: {len(test)} held out, {len(train)} for fine-tuning; {len(labels)} chapters")


if __name__ == "__main__":
    main(sys.argv[1], Path(__file__).resolve().parent)
