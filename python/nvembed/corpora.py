"""Offline corpora: documented functions of the Python standard library, as a search corpus and as a BEIR folder.

The corpus depends only on the running Python (its docstrings), so it needs no network; its exact contents (and
therefore its metrics) can differ a little between Python versions.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

STDLIB_MODULES = ("os", "os.path", "shutil", "json", "re", "math", "statistics", "itertools", "functools",
                  "textwrap", "string", "random", "datetime", "collections", "heapq", "bisect", "glob", "csv")


def stdlib_corpus(limit: int = 400) -> List[Tuple[str, str, str]]:
    """(name, first docstring line, rest of the docstring) for documented functions of a few stdlib modules:
    public callables whose docstring has at least two non-blank lines; the rest is cut to 600 characters.

    Every document is unique, since each query has exactly one relevant document and a twin would count a correct
    hit as a miss:
    - an object reachable from several of the modules (statistics.fsum is math.fsum) is listed once, under its home
      module when that is one of them (itertools.groupby, not statistics.groupby), else under the first;
    - of documents with the same (summary, text), only the first is kept."""
    import importlib
    import inspect

    found = []  # (module, name, obj) in module order
    for mod_name in STDLIB_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if not name.startswith("_") and callable(obj):
                found.append((mod_name, name, obj))

    def home_first(entry):
        mod_name, _, obj = entry
        home = getattr(obj, "__module__", None)
        return 0 if isinstance(home, str) and home.lstrip("_") == mod_name else 1

    listed_as = {}
    for entry in sorted(found, key=home_first):  # stable: module order within each rank
        listed_as.setdefault(id(entry[2]), entry[:2])
    docs, seen = [], set()
    for mod_name, name, obj in found:
        if listed_as[id(obj)] != (mod_name, name):
            continue
        doc = inspect.getdoc(obj) or ""
        lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
        if len(lines) < 2 or len(docs) >= limit:
            continue
        pair = (lines[0], " ".join(lines[1:])[:600])
        if pair not in seen:
            seen.add(pair)
            docs.append((f"{mod_name}.{name}", *pair))
    return docs


def write_stdlib_beir(out_dir: str, limit: int = 400, split: str = "test") -> dict:
    """Write the stdlib corpus in BEIR layout: corpus.jsonl ({"_id", "title", "text"}: the function's qualified
    name as the title, the docstring without its first line as the text), queries.jsonl ({"_id", "text"}: the
    first docstring line) and qrels/<split>.tsv (header `query-id corpus-id score`, one relevant document per
    query, score 1). Query ids are "q:" + the document id. Returns counts. Files are written to temporary names
    and renamed, so a failed run leaves no half-written file."""
    corpus = stdlib_corpus(limit)
    os.makedirs(os.path.join(out_dir, "qrels"), exist_ok=True)
    files = {
        "corpus.jsonl": "".join(json.dumps({"_id": name, "title": name, "text": rest}) + "\n"
                                for name, _, rest in corpus),
        "queries.jsonl": "".join(json.dumps({"_id": "q:" + name, "text": summary}) + "\n"
                                 for name, summary, _ in corpus),
        os.path.join("qrels", f"{split}.tsv"): "query-id\tcorpus-id\tscore\n" + "".join(
            f"q:{name}\t{name}\t1\n" for name, _, _ in corpus),
    }
    from .retrieval import _atomic, _write
    for rel, text in files.items():
        _atomic(os.path.join(out_dir, rel), lambda tmp, text=text: _write(tmp, text))
    return {"documents": len(corpus), "queries": len(corpus), "qrels": len(corpus)}
