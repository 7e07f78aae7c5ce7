"""A clean corpus with planted junk: each junk class must be removed by the step meant for it, and
the clean documents kept.

Clean documents: real English docstrings of the standard library (varied prose), stdlib source
files (code), and hand-written technical prose, a LaTeX paper and Markdown with code blocks.
"""

import itertools
import json
import random
from pathlib import Path

import pytest

from data_pipeline.clean import CleanConfig, run_clean
from data_pipeline.corpus import iter_stdlib_documents

TECH_PROSE = """\
Gradient checkpointing trades compute for memory. Instead of keeping every intermediate
activation of the forward pass, the training loop stores only the inputs of selected blocks
and recomputes the rest during the backward pass. For a transformer with L layers this cuts
activation memory from O(L) to O(sqrt(L)) at the cost of roughly one extra forward pass.

In practice, the savings depend on where the boundaries are placed. Attention blocks with long
sequences dominate the footprint, so they are the first candidates; the embedding and the final
projection are usually cheap enough to keep. When the model is also sharded with ZeRO stage 3,
the parameters must be gathered again for the recomputation, which adds communication that the
scheduler should overlap with the backward computation of the previous block.
"""

LEGAL_PROSE = """\
1. Definitions. For the purposes of this Agreement, "Licensed Material" means the dataset, the
accompanying documentation, and any derivative works created by the Licensee, whether in source
or compiled form (see Section 4(b)).

2. Grant of rights. Subject to the terms and conditions of this Agreement, the Licensor hereby
grants to the Licensee a worldwide, non-exclusive, non-transferable licence to use, reproduce and
modify the Licensed Material solely for internal research purposes; commercial use requires a
separate written agreement.

3. Warranty. The Licensed Material is provided "as is", without warranty of any kind, express or
implied, including but not limited to the warranties of merchantability and fitness for a
particular purpose.
"""

LATEX_PAPER = r"""\documentclass{article}
\usepackage{amsmath}
\title{Linear Attention with Exponential Decay}
\begin{document}
\maketitle
\begin{abstract}
We study a linear attention mechanism in which the contribution of past tokens decays
exponentially with their distance. The resulting recurrence has a constant-size state and can be
evaluated in parallel during training and sequentially during inference.
\end{abstract}
\section{Introduction}
Softmax attention costs $O(n^2)$ time in the sequence length $n$. Linear attention replaces the
softmax with a kernel feature map $\phi$, so that the output can be written as
\begin{equation}
  o_t = \frac{\sum_{s \le t} \lambda^{t-s} \phi(q_t)^\top \phi(k_s) v_s}{\sum_{s \le t} \lambda^{t-s} \phi(q_t)^\top \phi(k_s)},
\end{equation}
where $\lambda \in (0, 1)$ is the decay rate. We show that the decay stabilises training and
that a block-wise algorithm reaches the speed of the recurrent form on modern accelerators.
\section{Method}
The state $S_t = \lambda S_{t-1} + k_t v_t^\top$ is a $d \times d$ matrix. Within a block of
$B$ tokens the intra-block part is computed with a masked matrix product, and the inter-block
part with the state carried from the previous block.
\end{document}
"""

MARKDOWN_DOC = """\
# Installing the toolkit

The toolkit needs Python 3.10 or newer. Create a virtual environment first, then install the
package with its development extras:

```bash
python -m venv .venv
.venv/bin/pip install -e ".[dev]"
```

## Configuration

Settings live in a YAML file. Every key can be overridden from the command line, which is
convenient when a sweep changes only the learning rate:

```yaml
train:
  lr: 3.0e-4
  warmup_steps: 2000
```

- Use `--set train.lr=1e-4` to override a single value.
- Unknown keys are rejected with a suggestion of the closest valid name.

See the reference section for the full list of options and their defaults.
"""

HANDWRITTEN = {
    "tech-prose": TECH_PROSE,
    "legal-prose": LEGAL_PROSE,
    "latex-paper": LATEX_PAPER,
    "markdown-code": MARKDOWN_DOC,
}

GERMAN = [
    "Die Bundesregierung hat am Mittwoch einen Gesetzentwurf beschlossen, der die Förderung "
    "erneuerbarer Energien neu regeln soll. Nach Angaben des Ministeriums sollen Betreiber "
    "kleiner Solaranlagen künftig weniger Formulare ausfüllen müssen, und die Netzbetreiber "
    "werden verpflichtet, Anschlüsse innerhalb von vier Wochen herzustellen.",
    "Der Zug nach München fährt heute wegen Bauarbeiten von Gleis sieben ab. Reisende werden "
    "gebeten, die geänderten Abfahrtszeiten zu beachten und für Anschlussverbindungen "
    "zusätzliche Zeit einzuplanen, da es auf der Strecke zu Verspätungen kommen kann.",
]
CHINESE = [
    "北京时间昨天晚上，国家统计局发布了最新的经济数据。数据显示，今年前三个季度国内生产总值同比增长，"
    "消费和投资保持稳定，出口增速有所放缓。专家认为，明年经济将继续保持平稳运行的态势。",
    "这座城市的图书馆每天早上九点开门，晚上九点关门。周末的时候，很多家长会带着孩子来这里看书，"
    "阅览室里总是坐满了安静学习的学生和读者。",
]
FRENCH = [
    "Le conseil municipal a adopté mardi soir le nouveau plan de circulation du centre-ville. "
    "Les voitures ne pourront plus traverser la place principale, et de nouvelles pistes "
    "cyclables seront aménagées le long des quais avant la fin de l'année prochaine.",
]

COOKIE = (
    "We use cookies to improve your experience. Accept all cookies?\n"
    "Accept | Reject | Manage preferences\n"
    "Privacy policy | Terms of use | Contact\n"
)


def _stdlib(n_prose: int, n_code: int) -> tuple[list[dict], list[dict]]:
    prose, code = [], []
    for r in iter_stdlib_documents():
        if r["source"].endswith("docstring") and len(r["text"]) >= 300 and len(prose) < n_prose:
            prose.append(r)
        elif r["source"].endswith("code") and 500 <= len(r["text"]) <= 20_000 and len(code) < n_code:
            code.append(r)
        if len(prose) >= n_prose and len(code) >= n_code:
            break
    return prose, code


def _boilerplate(rng: random.Random, words: list[str]) -> str:
    """A page whose navigation/cookie lines repeat around a little content."""
    body = " ".join(rng.choice(words) for _ in range(25)) + "."
    return (COOKIE * 4) + body + "\n" + (COOKIE * 3)


def _garbled(rng: random.Random) -> str:
    symbols = "#$%^&*@~!+=<>|{}[]\\/0123456789"
    return "\n".join(
        " ".join("".join(rng.choice(symbols) for _ in range(rng.randint(3, 9))) for _ in range(12))
        for _ in range(8)
    )


def _near_dup(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for _ in range(2):
        words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma"])
    return " ".join(words)


def build_corpus(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write the corpus to ``path``; returns ``(clean texts by id, junk class by id)``."""
    rng = random.Random(0)
    prose, code = _stdlib(110, 12)
    clean: dict[str, str] = {r["id"]: r["text"] for r in prose + code}
    clean |= HANDWRITTEN
    # long documents (several docstrings of one module) to plant near-duplicates of
    long_docs = {
        f"long-{i}": "\n\n".join(r["text"] for r in prose[i * 4 : i * 4 + 4]).replace("\n", " ")
        for i in range(5)
    }
    clean |= long_docs
    words = [w for r in prose for w in r["text"].split() if w.isalpha()]
    junk: dict[str, str] = {}
    records: list[tuple[str, str]] = list(clean.items())
    for i, (doc_id, text) in enumerate(itertools.islice(clean.items(), 0, 60, 6)):
        records.append((f"exact-{i}", text + "\n"))
        junk[f"exact-{i}"] = "exact_duplicate"
        PAIRS[f"exact-{i}"] = doc_id
    for i, (doc_id, text) in enumerate(long_docs.items()):
        records.append((f"near-{i}", _near_dup(text, rng)))
        junk[f"near-{i}"] = "near_duplicate"
        PAIRS[f"near-{i}"] = doc_id
    for i in range(6):
        records.append((f"boiler-{i}", _boilerplate(rng, words)))
        junk[f"boiler-{i}"] = "boilerplate"
    for i in range(5):
        records.append((f"garbled-{i}", _garbled(rng)))
        junk[f"garbled-{i}"] = "garbled"
    records.append(("garbled-fffd", "Th\ufffd\ufffd q\ufffdck br\ufffd\ufffdn f\ufffdx " * 20))
    junk["garbled-fffd"] = "garbled"
    for i, text in enumerate(GERMAN + CHINESE + FRENCH):
        records.append((f"foreign-{i}", text))
        junk[f"foreign-{i}"] = "foreign"
    rng.shuffle(records)
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in records:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return clean, junk


#: A planted duplicate -> its original; deduplication keeps one of the two, either may go.
PAIRS: dict[str, str] = {}

#: The steps allowed to remove each junk class.
EXPECTED = {
    "exact_duplicate": {"exact_dedup"},
    "near_duplicate": {"near_dedup"},
    "boilerplate": {"gopher_repetition"},
    "garbled": {"garbled_filter", "non_printable"},
    "foreign": {"language_filter"},
}


def _dropped_by(out: Path) -> dict[str, str]:
    dropped = {}
    for step_dir in (out / "dropped").iterdir():
        for file in step_dir.glob("*.jsonl"):
            for line in file.read_text(encoding="utf-8").splitlines():
                dropped[json.loads(line)["id"]] = step_dir.name
    return dropped


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict, dict, Path]:
    tmp = tmp_path_factory.mktemp("planted")
    clean, junk = build_corpus(tmp / "corpus.jsonl")
    stats = run_clean([tmp / "corpus.jsonl"], tmp / "out", CleanConfig(tasks=2))
    return clean, junk, stats, _dropped_by(tmp / "out"), tmp / "out"


def test_each_junk_class_removed_by_its_filter(planted_run: tuple) -> None:
    _, junk, _, dropped, _ = planted_run
    wrong = {}
    for doc_id, cls in junk.items():
        if doc_id in PAIRS:  # exactly one of the pair removed, by the deduplication step
            removed = [dropped.get(d) for d in (doc_id, PAIRS[doc_id]) if d in dropped]
            if removed != [next(iter(EXPECTED[cls]))]:
                wrong[doc_id] = (cls, removed)
        elif dropped.get(doc_id) not in EXPECTED[cls]:
            wrong[doc_id] = (cls, dropped.get(doc_id))
    assert not wrong, wrong


def test_clean_documents_kept(planted_run: tuple) -> None:
    clean, _, stats, dropped, out = planted_run
    kept_ids = {
        json.loads(line)["id"]
        for f in (out / "output").glob("*.jsonl")
        for line in f.read_text().splitlines()
    }
    duplicated = set(PAIRS.values())  # either copy of a duplicate may be the one kept
    lost = {
        doc_id: dropped.get(doc_id) for doc_id in clean if doc_id not in kept_ids and doc_id not in duplicated
    }
    assert len(lost) <= 0.05 * len(clean), lost
    assert all(doc_id in kept_ids for doc_id in HANDWRITTEN), lost
    for name, s in [*stats["stages"].items(), ("totals", stats["totals"])]:
        assert s["in"] == s["kept"] + s["dropped"] + s["quarantined"], name
    assert stats["stages"]["near_dedup"]["dropped"] == 5
    assert stats["stages"]["exact_dedup"]["dropped"] == 10
