"""Retrieval helpers behind the CLI: reading texts and BEIR folders, an on-disk embedding index, exact top-k
search by matrix product, and the IR metrics (nDCG@k with graded relevance, Recall@k, MRR@k).

Everything here raises `InputError` (a ValueError) for bad input, with the file and line number where there is
one; the CLI turns it into a one-line message and exit code 2.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple


class InputError(ValueError):
    """Bad user input (file contents, formats, arguments)."""


# ----------------------------------------------------------------------------------------------- reading input
def _read_text(path: str) -> Tuple[str, str]:
    """(display name, contents) of a file, or of stdin for "-"."""
    import sys
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            # bytes, decoded here (text-mode stdin turns bad bytes into lone surrogates), with universal newlines;
            # a stdin replaced by a text stream (no .buffer) is read as text
            raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
            return name, raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first line
            return name, f.read()
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"cannot read {name}: {reason}") from None


def _lines(text: str) -> List[str]:
    """The lines of a file read with universal newlines: split on "\n" only (str.splitlines would also split at
    U+2028, U+0085, form feeds and other characters that JSON strings and texts may hold raw); no final empty line
    after a trailing newline."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _jsonl_objects(name: str, text: str) -> Iterable[Tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}:{lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{name}:{lineno}: invalid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise InputError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _field(name: str, lineno: int, obj: dict, key: str, required: bool = True, types=(str,)):
    if key not in obj:
        if required:
            raise InputError(f"{name}:{lineno}: missing field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise InputError(f"{name}:{lineno}: field {key!r} is {type(value).__name__}, expected "
                         f"{' or '.join(t.__name__ for t in types)}")
    if isinstance(value, str) and not is_valid_text(value):
        raise InputError(f"{name}:{lineno}: field {key!r} is not valid Unicode (a lone surrogate, e.g. a \\ud800 "
                         "escape without its pair)")
    return value


def is_valid_text(text: str) -> bool:
    """Whether `text` can be encoded (and so tokenized): JSON escapes can spell half a surrogate pair, and command-line
    arguments that are not valid UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def detect_format(path: str, text: str) -> str:
    """"jsonl" for *.jsonl / *.ndjson, "text" for *.txt; otherwise (stdin, other names) "jsonl" when the first
    non-blank line starts with "{", else "text"."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".txt"):
        return "text"
    for line in _lines(text):
        if line.strip():
            return "jsonl" if line.lstrip().startswith("{") else "text"
    return "text"


def read_texts(path: str, fmt: str = "auto") -> List[str]:
    """Texts to embed. Text format: one text per line, every line (blank ones too, so row i is line i+1).
    JSONL: one {"text": ...} object per non-blank line. An empty file gives an empty list."""
    name, text = _read_text(path)
    if fmt == "auto":
        fmt = detect_format(path, text)
    if fmt == "text":
        return _lines(text)
    if fmt != "jsonl":
        raise InputError(f"unknown input format {fmt!r} (auto, text, jsonl)")
    return [_field(name, lineno, obj, "text") for lineno, obj in _jsonl_objects(name, text)]


def read_corpus(path: str) -> Tuple[List[str], List[str], List[str]]:
    """(ids, titles, texts) of a corpus: BEIR JSONL ({"_id", "title" (optional), "text"} per line) or plain
    text (one document per non-blank line, its id the line number)."""
    name, text = _read_text(path)
    ids, titles, texts = [], [], []
    if detect_format(path, text) == "jsonl":
        seen = set()
        for lineno, obj in _jsonl_objects(name, text):
            doc_id = _field(name, lineno, obj, "_id", types=(str, int))
            doc_id = str(doc_id)
            if doc_id in seen:
                raise InputError(f"{name}:{lineno}: duplicate _id {doc_id!r}")
            seen.add(doc_id)
            ids.append(doc_id)
            titles.append(_field(name, lineno, obj, "title", required=False) or "")
            texts.append(_field(name, lineno, obj, "text"))
    else:
        for lineno, line in enumerate(_lines(text), 1):
            if line.strip():
                ids.append(str(lineno))
                titles.append("")
                texts.append(line.strip())
    return ids, titles, texts


def document_text(title: str, text: str) -> str:
    """What is embedded for a document: "title text" (BEIR's sentence-transformers convention), or the text."""
    return f"{title} {text}" if title else text


def read_queries(path: str) -> Dict[str, str]:
    """BEIR queries.jsonl: {"_id", "text"} per line -> {id: text}."""
    name, text = _read_text(path)
    queries = {}
    for lineno, obj in _jsonl_objects(name, text):
        qid = str(_field(name, lineno, obj, "_id", types=(str, int)))
        if qid in queries:
            raise InputError(f"{name}:{lineno}: duplicate _id {qid!r}")
        queries[qid] = _field(name, lineno, obj, "text")
    return queries


def read_qrels(path: str) -> Dict[str, Dict[str, int]]:
    """BEIR qrels TSV (header `query-id corpus-id score`, tab separated) -> {query id: {doc id: relevance}}.
    The header line is optional; relevance is an integer (graded; <= 0 counts as not relevant)."""
    name, text = _read_text(path)
    qrels: Dict[str, Dict[str, int]] = {}
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3:
            parts = line.split()
        if len(parts) != 3:
            raise InputError(f"{name}:{lineno}: expected 3 tab-separated fields (query-id corpus-id score), "
                             f"got {len(parts)}")
        qid, did, score = (p.strip() for p in parts)
        if lineno == 1 and not _is_number(score):
            continue  # a header (query-id corpus-id score); a numeric score is data and must be an integer
        if not _is_int(score):
            raise InputError(f"{name}:{lineno}: score {score!r} is not an integer")
        qrels.setdefault(qid, {})[did] = int(score)
    return qrels


def _is_int(s: str) -> bool:
    """An integer as trec_eval / BEIR's int() read it: optional sign and ASCII digits (not "1_0" or other digits)."""
    body = s[1:] if s[:1] in "+-" else s
    return body.isascii() and body.isdigit()


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_beir(data_dir: str, split: str = "test"):
    """(corpus ids, titles, texts, queries {id: text}, qrels) of a BEIR folder."""
    if not os.path.isdir(data_dir):
        raise InputError(f"{data_dir} is not a directory (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    paths = {"corpus": os.path.join(data_dir, "corpus.jsonl"), "queries": os.path.join(data_dir, "queries.jsonl"),
             "qrels": os.path.join(data_dir, "qrels", f"{split}.tsv")}
    for p in paths.values():
        if not os.path.isfile(p):
            raise InputError(f"{p} not found (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    ids, titles, texts = read_corpus(paths["corpus"])
    return ids, titles, texts, read_queries(paths["queries"]), read_qrels(paths["qrels"])


# ----------------------------------------------------------------------------------------------------- search
def search_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def exact_topk(queries, docs, k: int, device=None, query_chunk: int = 1024, doc_chunk: int = 65536):
    """Exact top-k by inner product (cosine for L2-normalized rows): (scores [Q, k'], indices [Q, k']) with
    k' = min(k, number of docs), best first. Chunked over queries and documents so that no Q x N score matrix
    larger than query_chunk x doc_chunk exists; runs on `device` (default: CUDA if available, else CPU)."""
    import torch
    queries = torch.as_tensor(queries, dtype=torch.float32)
    docs = torch.as_tensor(docs, dtype=torch.float32)
    device = device or search_device()
    n_q, n_d = queries.shape[0], docs.shape[0]
    k = min(k, n_d)
    if n_q == 0 or k == 0:
        return torch.empty(n_q, k), torch.empty(n_q, k, dtype=torch.long)
    if queries.shape[1] != docs.shape[1]:
        raise InputError(f"query embeddings have dimension {queries.shape[1]}, the index {docs.shape[1]}")
    doc_chunks = [(s, docs[s:s + doc_chunk].to(device)) for s in range(0, n_d, doc_chunk)]
    out_s, out_i = [], []
    for qs in range(0, n_q, query_chunk):
        q = queries[qs:qs + query_chunk].to(device)
        best_s = best_i = None
        for start, d in doc_chunks:
            s, i = (q @ d.T).topk(min(k, d.shape[0]), dim=1)
            i = i + start
            if best_s is not None:
                s, j = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
        out_s.append(best_s.cpu())
        out_i.append(best_i.cpu())
    return torch.cat(out_s), torch.cat(out_i)


def retrieve(q_emb, d_emb, qids: Sequence[str], ids: Sequence[str], k: int, device=None,
             ignore_identical_ids: bool = True) -> Dict[str, List[str]]:
    """The run of an evaluation: query id -> the ids of its top-k documents, best first. With ignore_identical_ids
    (BEIR's EvaluateRetrieval.evaluate default) a document whose id equals the query's is dropped from that query's
    list (ArguAna- / Quora-style sets hold each query in the corpus too), and the next one moves up."""
    scores, idx = exact_topk(q_emb, d_emb, k + 1 if ignore_identical_ids else k, device=device)
    run = {}
    for q, srow, row in zip(qids, scores.tolist(), idx.tolist()):
        # equal scores in trec_eval's order (pytrec_eval, BEIR): by document id, descending (reverse keeps the sort
        # stable: equal (score, id) pairs stay in their top-k order)
        hits = [ids[i] for _, i in sorted(zip(srow, row), key=lambda p: (p[0], ids[p[1]]), reverse=True)]
        if ignore_identical_ids:
            hits = [d for d in hits if d != q]
        run[q] = hits[:k]
    return run


INDEX_EMBEDDINGS, INDEX_META, INDEX_DOCS = "embeddings.safetensors", "index.json", "docs.jsonl"


def save_index(out_dir: str, embeddings, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str],
               meta: Mapping) -> None:
    """INDEX_DIR/embeddings.safetensors ("embeddings" [N, d] float32), docs.jsonl (id, title, text per row, in
    embedding order) and index.json (model name, count, dim, encode settings). index.json is written last, so a
    folder with one is complete."""
    import torch
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    emb = torch.as_tensor(embeddings, dtype=torch.float32).contiguous()
    meta = dict(meta, count=len(ids), dim=int(emb.shape[1]) if emb.dim() == 2 else 0, format=1)
    stale = os.path.join(out_dir, INDEX_META)
    if os.path.exists(stale):
        os.remove(stale)
    _atomic(os.path.join(out_dir, INDEX_EMBEDDINGS), lambda p: save_file({"embeddings": emb}, p))
    _atomic(os.path.join(out_dir, INDEX_DOCS), lambda p: _write(p, "".join(
        json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in zip(ids, titles, texts))))
    _atomic(os.path.join(out_dir, INDEX_META), lambda p: _write(p, json.dumps(meta, indent=2) + "\n"))


def load_index(index_dir: str):
    """(embeddings tensor, docs list of dicts, meta dict) of a folder written by save_index."""
    from safetensors.torch import load_file
    meta_path = os.path.join(index_dir, INDEX_META)
    if not os.path.isfile(meta_path):
        raise InputError(f"{index_dir} is not an nvembed index (no {INDEX_META}; build one with "
                         "`nvembed search index`)")
    _, meta_text = _read_text(meta_path)
    try:
        meta = json.loads(meta_text)
        emb = load_file(os.path.join(index_dir, INDEX_EMBEDDINGS))["embeddings"]
    except Exception as e:  # corrupt JSON, missing or corrupt safetensors file
        raise InputError(f"{index_dir}: unreadable index ({type(e).__name__}: {e})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), str)
            and (meta.get("max_length") is None or (isinstance(meta["max_length"], int)
                                                    and not isinstance(meta["max_length"], bool)
                                                    and meta["max_length"] > 0))):
        raise InputError(f"{index_dir}: unreadable index ({INDEX_META} must be an object with a string 'model' and an "
                         "integer or null 'max_length')")
    if emb.dim() != 2 or not emb.is_floating_point() or not bool(emb.isfinite().all()):
        raise InputError(f"{index_dir}: unreadable index ({INDEX_EMBEDDINGS} must hold a 2-D float matrix of finite "
                         f"values, got {emb.dtype} of shape {list(emb.shape)})")
    name, docs_text = _read_text(os.path.join(index_dir, INDEX_DOCS))
    docs = []
    for lineno, obj in _jsonl_objects(name, docs_text):
        for key in ("_id", "text"):
            _field(name, lineno, obj, key)
        _field(name, lineno, obj, "title", required=False)
        docs.append(obj)
    if len(docs) != emb.shape[0]:
        raise InputError(f"{index_dir}: {len(docs)} documents but {emb.shape[0]} embeddings")
    return emb.float(), docs, meta


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _atomic(path: str, write) -> None:
    """write(tmp) then rename to path: readers never see a half-written file, a failure leaves none behind."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------- metrics
def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k with graded relevance and linear gain (trec_eval / BEIR): DCG = sum_{i<k} rel_i / log2(i + 2) over
    the ranking, divided by the DCG of the ideal ordering of the judged relevances. 0 if nothing is relevant."""
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 100) -> float:
    """Fraction of the relevant (relevance > 0) documents found in the top k."""
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    """1 / rank of the first relevant document in the top k, 0 if none."""
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


METRICS = (("nDCG@10", ndcg_at_k, 10), ("Recall@100", recall_at_k, 100), ("MRR@10", mrr_at_k, 10))


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
             metrics=METRICS) -> Dict[str, float]:
    """Mean of each metric over the queries that have at least one relevant document in qrels (as BEIR / trec_eval
    do); `run` maps query id -> document ids, best first (a query missing from run scores 0)."""
    judged = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    if not judged:
        raise InputError("no query to score: no query of the qrels has a relevant document (score > 0) among the "
                         "queries (check the query ids of the qrels file against queries.jsonl)")
    out = {}
    for name, fn, k in metrics:
        out[name] = sum(fn(list(run.get(q, ())), qrels[q], k) for q in judged) / len(judged)
    out["queries"] = len(judged)
    return out
