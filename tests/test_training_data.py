"""nvembed.training.data (JSONL examples, batches, groups) and nvembed.training.stdlib_split (the stdlib train/test
set, split by package). No model is needed here."""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from nvembed import retrieval
from nvembed.training import stdlib_split
from nvembed.training.data import (TASK_TYPES, Batch, DataError, Example, check_group_size, iterate_batches,
                                   make_batches, read_jsonl, select_group, write_jsonl)

GOOD = {"query": "what removes a directory tree", "pos": ["shutil.rmtree Recursively delete a directory tree."],
        "neg": ["os.remove Remove a file."]}


def _write_lines(path, *lines):
    path.write_bytes(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines) + b"\n")
    return str(path)


# ------------------------------------------------------------------------------------------------- read_jsonl
def test_read_jsonl_fields_defaults_and_extra_keys(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl",
                        "\ufeff" + json.dumps(GOOD), "", "   ",
                        json.dumps({"query": "q2", "pos": ["a", "b"], "instruction": "Instruct: x\nQuery: ",
                                    "task_type": "sts", "score": 0.5, "prompt": "ignored", "id": 7}))
    ex = read_jsonl(path)
    assert ex == [Example(GOOD["query"], tuple(GOOD["pos"]), tuple(GOOD["neg"])),
                  Example("q2", ("a", "b"), (), "Instruct: x\nQuery: ", "sts")]
    assert ex[0].instruction == "" and ex[0].task_type == "retrieval"
    assert isinstance(ex[1].pos, tuple)


BAD_LINES = [
    ('{"query": "q", "pos": ["a"]', "invalid JSON"),
    ('["q", ["a"]]', "expected a JSON object, got list"),
    ('{"pos": ["a"]}', "missing field 'query'"),
    ('{"query": "q"}', "missing field 'pos'"),
    ('{"query": 3, "pos": ["a"]}', "field 'query' is int"),
    ('{"query": "  ", "pos": ["a"]}', "field 'query' is empty"),
    ('{"query": "q", "pos": "a"}', "field 'pos' is str, expected a list"),
    ('{"query": "q", "pos": []}', "field 'pos' is empty"),
    ('{"query": "q", "pos": ["a", null]}', "pos[1] is NoneType"),
    ('{"query": "q", "pos": ["a"], "neg": ["b", ""]}', "neg[1] is empty"),
    ('{"query": "q", "pos": ["a"], "neg": null}', "field 'neg' is NoneType"),
    ('{"query": "q", "pos": ["a"], "instruction": 1}', "field 'instruction' is int"),
    ('{"query": "q", "pos": ["a"], "task_type": "ranking"}', "unknown task_type 'ranking'"),
    ('{"query": "q", "pos": ["a"], "task_type": ["sts"]}', "field 'task_type' is list"),
    (b'{"query": "caf\xe9", "pos": ["a"]}', "not valid UTF-8"),
    ('{"query": "smile \\ud83d", "pos": ["a"]}', "field 'query' is not valid Unicode (a lone surrogate"),
    ('{"query": "q", "pos": ["a"], "neg": ["\\udc00 b"]}', "neg[0] is not valid Unicode"),
    ('{"query": "q", "pos": ["a"], "instruction": "\\ud800"}', "field 'instruction' is not valid Unicode"),
    ('{"query": "q", "pos": ["a", "b"], "neg": ["c", "b"]}', "neg[1] is also a positive"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write_lines(tmp_path / "bad.jsonl", json.dumps(GOOD), "", line, json.dumps(GOOD))
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert message in str(e.value)


def test_read_jsonl_missing_file_and_json_line_separators(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    # U+2028 and \x1c are line breaks to str.splitlines but legal inside a JSON string
    odd = Example("a\u2028b\x1cc", ("d\u2029e",))
    path = str(tmp_path / "odd.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(odd.to_json(), ensure_ascii=False) + "\n")
    assert read_jsonl(path) == [odd]


# ------------------------------------------------------------------------------------------------ write_jsonl
def test_write_jsonl_round_trip(tmp_path):
    examples = [Example("q é", ["p1", "p2"], ["n"], "Instruct: t\nQuery: ", "classification"),
                Example("q2", ("p",))]
    path = str(tmp_path / "out.jsonl")
    assert write_jsonl(path, iter(examples)) == 2
    assert read_jsonl(path) == examples
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert rows[1] == {"query": "q2", "pos": ["p"], "neg": [], "instruction": "", "task_type": "retrieval"}
    assert write_jsonl(path, []) == 0 and read_jsonl(path) == []


@pytest.mark.parametrize("bad,message", [
    ({"query": "q", "pos": ["a"]}, "examples[1] is dict, expected Example"),
    ("not an example", "examples[1] is str"),
])
def test_write_jsonl_bad_item_writes_nothing(tmp_path, bad, message):
    path = tmp_path / "out.jsonl"
    path.write_text("previous contents\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_jsonl(str(path), [Example("q", ("a",)), bad, Example("q3", ("c",))])
    assert path.read_text() == "previous contents\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind
    with pytest.raises(DataError, match="write_jsonl: examples must be"):
        write_jsonl(str(path), "abc")


def test_example_validates():
    with pytest.raises(DataError, match="Example: field 'pos' is empty"):
        Example("q", ())
    with pytest.raises(DataError, match="Example: field 'pos' is str"):
        Example("q", "abc")
    with pytest.raises(DataError, match="Example: unknown task_type 'x'"):
        Example("q", ("a",), task_type="x")
    with pytest.raises(DataError, match=r"Example: neg\[0\] is int"):
        Example("q", ("a",), (1,))


# ---------------------------------------------------------------------------------------------------- batching
def _mixed(n_retrieval=23, n_sts=11, n_cls=5, negs=3):
    out = []
    for task, n in (("retrieval", n_retrieval), ("sts", n_sts), ("classification", n_cls)):
        for i in range(n):
            out.append(Example(f"{task} q{i}", (f"{task} p{i}",), tuple(f"{task} n{i}.{j}" for j in range(negs)),
                               f"Instruct: {task}\nQuery: ", task))
    random.Random(0).shuffle(out)
    return out


def test_make_batches_homogeneous_deterministic():
    ex = _mixed()
    b = make_batches(ex, 4, seed=3, epoch=0)
    assert b == make_batches(ex, 4, seed=3, epoch=0)
    assert b != make_batches(ex, 4, seed=3, epoch=1) and b != make_batches(ex, 4, seed=4, epoch=0)
    # drop_last: 23 -> 5 batches, 11 -> 2, 5 -> 1; every batch full, one task type, no index twice
    assert len(b) == 5 + 2 + 1 and all(len(x) == 4 for x in b)
    assert all(len({ex[i].task_type for i in x}) == 1 for x in b)
    flat = [i for x in b for i in x]
    assert len(flat) == len(set(flat))
    assert {ex[x[0]].task_type for x in b} == {"retrieval", "sts", "classification"}
    # without drop_last every example appears exactly once, tails as smaller batches
    b = make_batches(ex, 4, seed=3, epoch=2, drop_last=False)
    assert sorted(i for x in b for i in x) == list(range(len(ex)))
    assert sorted(len(x) for x in b) == [1, 3, 3] + [4] * 8
    assert all(len({ex[i].task_type for i in x}) == 1 for x in b)


def test_make_batches_bad_arguments():
    ex = _mixed()
    with pytest.raises(DataError, match="make_batches: batch_size must be >= 1, got 0"):
        make_batches(ex, 0, 0, 0)
    with pytest.raises(DataError, match="make_batches: epoch must be >= 0"):
        make_batches(ex, 2, 0, -1)
    with pytest.raises(DataError, match="make_batches: seed must be an int, got str"):
        make_batches(ex, 2, "0", 0)
    with pytest.raises(DataError, match=r"make_batches: examples\[1\] is dict"):
        make_batches([ex[0], {}], 2, 0, 0)


def test_select_group_enough_and_too_few_negatives():
    ex = Example("q", ("p1", "p2"), tuple(f"n{i}" for i in range(10)))
    rng = random.Random(1)
    for _ in range(20):
        g = select_group(ex, 8, rng)
        assert len(g) == 8 and g[0] in ex.pos
        assert len(set(g[1:])) == 7 and set(g[1:]) <= set(ex.neg)  # without replacement
    assert {select_group(ex, 2, rng)[0] for _ in range(50)} == {"p1", "p2"}
    few = Example("q", ("p",), ("a", "b", "c"))
    for _ in range(20):
        g = select_group(few, 8, rng)
        # FlagEmbedding's rule: sample 7 of neg * ceil(7 / 3) -> each negative at most 3 times
        assert len(g) == 8 and g[0] == "p" and set(g[1:]) <= {"a", "b", "c"}
        assert max(g[1:].count(n) for n in "abc") <= math.ceil(7 / 3)
    assert select_group(Example("q", ("p",)), 1, rng) == ["p"]
    assert select_group(ex, 4, random.Random(5)) == select_group(ex, 4, random.Random(5))


def test_select_group_errors():
    with pytest.raises(DataError, match="select_group: the example with query 'lonely' has no negatives"):
        select_group(Example("lonely", ("p",)), 2, random.Random(0))
    with pytest.raises(DataError, match="select_group: group_size must be >= 1"):
        select_group(Example("q", ("p",)), 0, random.Random(0))
    with pytest.raises(DataError, match="select_group: rng must be a random.Random"):
        select_group(Example("q", ("p",)), 1, 0)


def test_check_group_size_counts_missing_negatives():
    ex = _mixed() + [Example("no negs 1", ("p",)), Example("no negs 2", ("p",))]
    check_group_size(ex, 1)
    with pytest.raises(DataError, match=r"check_group_size: 2 of 41 examples have no negatives \(first: "
                                        r"examples\[39\], query 'no negs 1'\), but group_size=4 needs 3"):
        check_group_size(ex, 4)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_iterate_batches_layout_and_resume():
    ex = _mixed()
    per_epoch = len(make_batches(ex, 4, 7, 0))
    full = _take(iterate_batches(ex, batch_size=4, group_size=3, seed=7), 3 * per_epoch + 2)
    assert [b.step for b in full] == list(range(len(full)))
    assert [b.epoch for b in full] == [s // per_epoch for s in range(len(full))]
    by_query = {e.query: e for e in ex}
    for b in full:
        assert isinstance(b, Batch) and b.group_size == 3 and len(b.queries) == 4 and len(b.docs) == 12
        for i, q in enumerate(b.queries):
            e = by_query[q]
            assert e.task_type == b.task_type and b.instructions[i] == e.instruction
            assert b.docs[i * 3] in e.pos and set(b.docs[i * 3 + 1:(i + 1) * 3]) <= set(e.neg)
    # resuming at any step, across epoch boundaries, continues the same sequence
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + 1):
        assert _take(iterate_batches(ex, 4, 3, 7, start_step=k), len(full) - k) == full[k:]
    # the epochs differ (shuffled again) and another seed gives another sequence
    assert [b.queries for b in full[:per_epoch]] != [b.queries for b in full[per_epoch:2 * per_epoch]]
    assert _take(iterate_batches(ex, 4, 3, 8), 3) != full[:3]


def test_iterate_batches_errors_are_eager():
    ex = _mixed()
    with pytest.raises(DataError, match=r"iterate_batches: no full batch of batch_size=32 can be formed .*"
                                        r"retrieval 23, classification 5, sts 11"):
        iterate_batches(ex, batch_size=32, group_size=2, seed=0)
    assert next(iterate_batches(ex, 32, 2, 0, drop_last=False)).step == 0
    # one task type too small for a batch: an error naming it, not a type silently never trained on
    with pytest.raises(DataError, match=r"iterate_batches: task type classification \(5 examples\) cannot fill "
                                        r"one batch of batch_size=8"):
        iterate_batches(ex, batch_size=8, group_size=2, seed=0)
    with pytest.raises(DataError, match=r"task type classification \(5 examples\), sts \(11 examples\) cannot"):
        iterate_batches(ex, batch_size=12, group_size=2, seed=0)
    assert {next(iterate_batches(ex, 8, 2, 0, drop_last=False)).step} == {0}
    with pytest.raises(DataError, match="check_group_size: 1 of 40 examples have no negatives"):
        iterate_batches(ex + [Example("q", ("p",))], 4, 2, 0)
    with pytest.raises(DataError, match="iterate_batches: start_step must be >= 0"):
        iterate_batches(ex, 4, 2, 0, start_step=-1)
    with pytest.raises(DataError, match="iterate_batches: examples must be a sequence"):
        iterate_batches(iter(ex), 4, 2, 0)
    assert "pair" in TASK_TYPES and TASK_TYPES[0] == "retrieval"


# ----------------------------------------------------------------------------------------------- stdlib split
SMALL = ("base64", "bisect", "calendar", "csv", "fnmatch", "glob", "gzip", "heapq", "json", "os.path", "shlex",
         "shutil", "statistics", "string", "textwrap", "zipfile")


def _package(name):
    return name.split(".")[0]


def test_stdlib_split_small_subset(tmp_path):
    counts = stdlib_split.write_stdlib_train_test(str(tmp_path / "a"), seed=0, modules=SMALL, test_fraction=0.3)
    train = read_jsonl(str(tmp_path / "a" / "train.jsonl"))
    ids, titles, texts, queries, qrels = retrieval.load_beir(str(tmp_path / "a" / "test"))
    assert counts["train"] == len(train) > 50 and counts["test"] == len(ids) == len(queries) == len(qrels) > 10
    assert counts["test"] <= 0.3 * (counts["train"] + counts["test"])
    train_names = [ex.pos[0].split(" ")[0] for ex in train]
    # disjoint by top-level package, and every package of the subset on one side
    assert {_package(n) for n in train_names}.isdisjoint({_package(i) for i in ids})
    assert {_package(i) for i in ids} == set(counts["test_packages"])
    for ex in train:
        assert ex.instruction == stdlib_split.INSTRUCTION and ex.task_type == "retrieval" and ex.neg == ()
        assert len(ex.pos) == 1 and ex.query not in ex.pos[0]
    # the test documents are the texts `nvembed eval` embeds, built the same way as the training positives
    docs = {d.name: d for d in stdlib_split.stdlib_docs(SMALL)}
    for i, t, x in zip(ids, titles, texts):
        assert retrieval.document_text(t, x) == docs[i].document() and len(x) <= stdlib_split.MAX_TEXT
        assert queries["q:" + i] == docs[i].summary and qrels["q:" + i] == {i: 1}
    assert len({ex.query for ex in train} | set(queries.values())) == len(train) + len(queries)
    # deterministic: same bytes again; another seed holds out other packages
    stdlib_split.write_stdlib_train_test(str(tmp_path / "b"), seed=0, modules=SMALL, test_fraction=0.3)
    for rel in ("train.jsonl", "test/corpus.jsonl", "test/queries.jsonl", "test/qrels/test.tsv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    other = stdlib_split.write_stdlib_train_test(str(tmp_path / "c"), seed=1, modules=SMALL, test_fraction=0.3)
    assert other["test_packages"] != counts["test_packages"]


def test_stdlib_pool_ignores_methods_third_parties_attach(monkeypatch):
    """A package that attaches a documented method to a stdlib class (transformers adds warning_once to
    logging.Logger) does not change the pool, so the split does not depend on what the process imported."""
    import logging
    before = [d.name for d in stdlib_split.stdlib_docs(("logging",))]

    def helper(self):
        """Log a message once per call site, however often it runs.

        A third-party helper that must not become a stdlib training pair."""
    helper.__module__ = "thirdparty.logging_utils"
    monkeypatch.setattr(logging.Logger, "helper_once", helper, raising=False)
    after = [d.name for d in stdlib_split.stdlib_docs(("logging",))]
    assert after == before and not any("helper_once" in n for n in after)


def test_stdlib_split_arguments():
    with pytest.raises(ValueError, match=r"split_packages: test_fraction must be in \(0, 1\)"):
        stdlib_split.split_packages([], test_fraction=1.0)
    with pytest.raises(TypeError, match="split_packages: seed must be an int"):
        stdlib_split.split_packages([], seed="0")
    with pytest.raises(ValueError, match="write_stdlib_train_test: no documented functions"):
        stdlib_split.write_stdlib_train_test("/nonexistent/x", modules=["no_such_module_here"])


def test_make_stdlib_train_cli_full(tmp_path):
    """The whole pool, in a subprocess (it imports ~340 stdlib modules, which this test process need not)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "std"
    r = subprocess.run([sys.executable, "-m", "nvembed.cli", "make-stdlib-train", str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    train = read_jsonl(str(out / "train.jsonl"))
    ids, _, _, queries, qrels = retrieval.load_beir(str(out / "test"))
    assert f"wrote {len(train)} training pairs" in r.stdout and f"{len(ids)} test documents" in r.stdout
    assert len(train) > 1500 and 400 < len(ids) < 1000 and len(qrels) == len(ids)
    assert 0.18 < len(ids) / (len(ids) + len(train)) <= stdlib_split.TEST_FRACTION
    assert {_package(ex.pos[0].split(" ")[0]) for ex in train}.isdisjoint({_package(i) for i in ids})
