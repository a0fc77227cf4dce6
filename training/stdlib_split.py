"""A training/test set from Python standard-library docstrings, split BY MODULE so that the test modules are unseen
in training: `nvembed make-stdlib-train DIR` writes DIR/train.jsonl (query/pos pairs for `nvembed mine` and
`nvembed train`) and DIR/test/ (a BEIR folder for `nvembed eval`).

Each documented public function, class and method gives one pair: query = the first docstring line, document =
"<qualified name> <rest of the docstring>" (nvembed.retrieval.document_text(title, text), exactly what
`nvembed eval` embeds for a BEIR document; the rest is cut to 600 characters as in nvembed.corpora). The pool
depends only on the running Python, so it is offline; its size differs a little between Python versions, but a
package's side of the split mostly does not (packages are taken in an order hashed from their names).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

INSTRUCTION = ("Instruct: Given a one-line summary of a Python function or class, retrieve its documentation\n"
               "Query: ")
TEST_FRACTION = 0.22  # share of the documents held out for the test set (whole top-level packages)
MAX_TEXT = 600      # documents are cut here, as nvembed.corpora does

# Never imported: side effects on import (antigravity opens a browser, this/__hello__ print, readline touches the
# terminal, lib2to3 writes grammar caches), GUI toolkits, Windows-only modules, the test suite, codec tables and
# private implementation modules that only duplicate a public one (sre_*, genericpath/posixpath/ntpath = os.path).
EXCLUDED = frozenset({
    "antigravity", "this", "readline", "rlcompleter", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
    "ensurepip", "venv", "pydoc_data", "test", "distutils", "encodings", "msilib", "msvcrt", "winreg", "winsound",
    "nt", "ntpath", "nturl2path", "posix", "posixpath", "genericpath", "sre_compile", "sre_constants", "sre_parse",
    "site", "sitecustomize", "usercustomize", "imp", "asynchat", "asyncore", "smtpd", "opcode", "pyexpat",
})
# a submodule path with one of these parts is skipped: private, tests, entry points, platform back-ends
_SKIP_PARTS = re.compile(r"^(_.*|tests?|__main__|.*win.*|.*_nt|idle_test)$")
# "recv(buffersize[, flags]) -> data", "csv_writer = csv.writer(fileobj [, dialect='excel']",
# "(typ, [data]) = <instance>.capability()"
_SIGNATURE = re.compile(r"->|^[\w.]+\(|^[\w.,\s\[\]()]+ = [\w.<>]+\(")


@dataclass(frozen=True)
class StdlibDoc:
    module: str     # the module it was found in (split by its top-level package)
    name: str       # qualified name, the document title
    summary: str    # first docstring line: the query
    text: str       # the rest of the docstring (whitespace collapsed, cut to MAX_TEXT): the document text

    @property
    def package(self) -> str:
        return self.module.split(".")[0]

    def document(self) -> str:
        from nvembed.retrieval import document_text
        return document_text(self.name, self.text)


def stdlib_module_names(submodules: bool = True) -> List[str]:
    """Sorted stdlib module names to scan: public top-level modules (sys.stdlib_module_names minus EXCLUDED) and,
    with `submodules`, their public submodules (email.utils, xml.etree.ElementTree, ...) plus os.path."""
    names = {"os.path"}
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in EXCLUDED:
            continue
        names.add(top)
        if not submodules:
            continue
        mod = _import(top)
        if mod is None or not hasattr(mod, "__path__"):
            continue
        with _quiet():  # walk_packages imports the subpackages it descends into
            found = [info.name for info in pkgutil.walk_packages(mod.__path__, prefix=top + ".",
                                                                 onerror=lambda name: None)]
        names.update(n for n in found if not any(_SKIP_PARTS.match(p) for p in n.split(".")[1:]))
    return sorted(names)


@contextmanager
def _quiet():
    """Silence the deprecation warnings and any output that importing a module prints."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _import(name: str):
    """The module, or None when it does not import here (platform-specific, missing C library)."""
    try:
        with _quiet():
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001  (ImportError, OSError, AttributeError of half-supported platforms...)
        return None


def _own_doc(obj) -> Optional[Tuple[str, str]]:
    """(summary, rest) of the object's OWN docstring (inspect.getdoc would inherit a base class's docstring and
    create duplicates). Leading signature lines of C functions ("recv(buffersize[, flags]) -> data") are skipped,
    so the summary is the first line of prose; None when fewer than two lines remain, the summary or the rest has
    fewer than three words ("pp expression", "Beta distribution."), or the rest repeats the summary."""
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str):
        return None
    lines = [ln.strip() for ln in inspect.cleandoc(doc).splitlines() if ln.strip()]
    while lines and _SIGNATURE.search(lines[0]):
        lines.pop(0)
    if len(lines) < 2 or len(lines[0].split()) < 3:
        return None
    rest = " ".join(" ".join(lines[1:]).split())
    if len(rest.split()) < 3:  # the tail of a wrapped first sentence ("inheritance."), nothing to retrieve
        return None
    if lines[0] in rest:  # the summary repeated verbatim: a trivial pair
        return None
    return lines[0], rest[:MAX_TEXT]


def _is_stdlib_object(obj) -> bool:
    """Whether an object belongs to the standard library by its __module__ (none, as for C method descriptors, counts
    as yes): third-party packages attach methods to stdlib classes (transformers adds warning_once to
    logging.Logger), and those must not enter the pool, or the split would depend on what the process imported."""
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str):
        return True
    top = home.split(".")[0]
    return top in sys.stdlib_module_names or top.lstrip("_") in sys.stdlib_module_names


def _public_members(mod) -> List[Tuple[str, object]]:
    """The module's public API: its __all__ when it has one, else the public names it defines itself."""
    names = getattr(mod, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n, v in vars(mod).items() if getattr(v, "__module__", None) == mod.__name__]
    out = []
    for n in sorted(set(names)):
        if not isinstance(n, str) or n.startswith("_") or not hasattr(mod, n):
            continue
        obj = getattr(mod, n)
        if not _is_stdlib_object(obj):
            continue
        own = getattr(obj, "__name__", n)
        if own != n and isinstance(own, str) and getattr(mod, own, None) is obj:
            continue  # an alias (array.ArrayType = array.array): listed under its own name
        out.append((n, obj))
    return out


def _methods(cls) -> List[Tuple[str, object]]:
    """Public methods the class defines itself (inherited ones belong to the base class)."""
    out = []
    for n, v in sorted(vars(cls).items()):
        if n.startswith("_"):
            continue
        if isinstance(v, (classmethod, staticmethod)):
            v = v.__func__
        if (inspect.isfunction(v) or inspect.ismethoddescriptor(v) or inspect.isbuiltin(v)) and _is_stdlib_object(v):
            out.append((n, v))
    return out


def _home_rank(module: str, obj, position: int) -> tuple:
    """Where an object reachable from several modules is listed: in its home package first (queue.Queue, not the
    re-export multiprocessing.dummy.Queue; _heapq counts as heapq), then at the shortest module path
    (asyncio.Future, not asyncio.futures.Future), then in module order. The home package matters for the split:
    a re-exported object must not leak a held-out package's docstring into the training set."""
    home = getattr(obj, "__module__", None)
    home_package = home.split(".")[0].lstrip("_") if isinstance(home, str) else None
    return module.split(".")[0] != home_package, module.count("."), position


def stdlib_docs(modules: Optional[Sequence[str]] = None) -> List[StdlibDoc]:
    """The documented public functions, classes and methods of `modules` (default stdlib_module_names()), in
    module order. An object reachable from several modules counts once (see _home_rank); identical docstrings
    and repeated summaries are dropped, since a query with several equally right answers is noise."""
    if modules is None:
        modules = stdlib_module_names()
    found = []  # (module, name, object) of every public callable, in module order
    for mod_name in modules:
        mod = _import(mod_name)
        if mod is not None:
            found.extend((mod_name, name, obj) for name, obj in _public_members(mod)
                         if callable(obj) and not inspect.ismodule(obj))
    best: Dict[int, tuple] = {}
    for position, (mod_name, _, obj) in enumerate(found):
        rank = _home_rank(mod_name, obj, position)
        if id(obj) not in best or rank < best[id(obj)]:
            best[id(obj)] = rank

    docs: List[StdlibDoc] = []
    seen_obj, seen_name, seen_summary, seen_doc = set(), set(), set(), set()

    def add(module, name, obj):
        if id(obj) in seen_obj or name in seen_name:
            return
        seen_obj.add(id(obj))
        seen_name.add(name)
        doc = _own_doc(obj)
        if doc is None or doc[0] in seen_summary or doc in seen_doc:
            return
        seen_summary.add(doc[0])
        seen_doc.add(doc)
        docs.append(StdlibDoc(module, name, doc[0], doc[1]))

    for position, (mod_name, name, obj) in enumerate(found):
        if best[id(obj)][2] != position:
            continue
        add(mod_name, f"{mod_name}.{name}", obj)
        if inspect.isclass(obj):
            for m_name, meth in _methods(obj):
                add(mod_name, f"{mod_name}.{name}.{m_name}", meth)
    return docs


def split_packages(docs: Sequence[StdlibDoc], seed: int = 0, test_fraction: float = TEST_FRACTION) -> List[str]:
    """The top-level packages held out for testing, sorted. Packages are visited in the order of a hash of
    (seed, name) and each one is held out while the held-out documents stay within test_fraction of all
    (first fit), so the test share is close to test_fraction for any seed although package sizes range from 1 to
    ~170 documents (asyncio), and a package's side does not depend on the order of the pool."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"split_packages: seed must be an int, got {type(seed).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_packages: test_fraction must be in (0, 1), got {test_fraction}")
    sizes: Dict[str, int] = {}
    for d in docs:
        sizes[d.package] = sizes.get(d.package, 0) + 1

    def key(package):
        return hashlib.sha256(f"{seed}:{package}".encode()).hexdigest()

    budget = test_fraction * len(docs)
    held_out, n_test = [], 0
    for package in sorted(sizes, key=key):
        if n_test + sizes[package] <= budget:
            held_out.append(package)
            n_test += sizes[package]
    return sorted(held_out)


def write_stdlib_train_test(out_dir: str, seed: int = 0, modules: Optional[Sequence[str]] = None,
                            test_fraction: float = TEST_FRACTION) -> dict:
    """Write out_dir/train.jsonl and the BEIR folder out_dir/test/ from stdlib_docs(modules), split by top-level
    package (split_packages(seed, test_fraction)): no package has documents on both sides.

    train.jsonl: one nvembed.training.data Example per document of the train packages: query = summary,
    pos = [document()], neg = [] (mine them with `nvembed mine`), instruction = INSTRUCTION, task_type
    "retrieval". test/: corpus.jsonl ({"_id": name, "title": name, "text": rest}), queries.jsonl ({"_id":
    "q:" + name, "text": summary}), qrels/test.tsv (one relevant document per query), as nvembed.corpora's
    make-stdlib-beir writes them. Each file is written to a temporary name and renamed. Returns the counts and
    the held-out packages."""
    from .data import Example, atomic_write_text, write_jsonl

    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"write_stdlib_train_test: out_dir must be a non-empty path, got {out_dir!r}")
    docs = stdlib_docs(modules)
    if not docs:
        raise ValueError(f"write_stdlib_train_test: no documented functions in modules {modules!r}")
    test_packages = set(split_packages(docs, seed, test_fraction))
    train = [d for d in docs if d.package not in test_packages]
    test = [d for d in docs if d.package in test_packages]

    test_dir = os.path.join(out_dir, "test")
    os.makedirs(os.path.join(test_dir, "qrels"), exist_ok=True)
    n_train = write_jsonl(os.path.join(out_dir, "train.jsonl"),
                          (Example(query=d.summary, pos=(d.document(),), instruction=INSTRUCTION) for d in train))
    atomic_write_text(os.path.join(test_dir, "corpus.jsonl"), "".join(
        json.dumps({"_id": d.name, "title": d.name, "text": d.text}) + "\n" for d in test))
    atomic_write_text(os.path.join(test_dir, "queries.jsonl"), "".join(
        json.dumps({"_id": "q:" + d.name, "text": d.summary}) + "\n" for d in test))
    atomic_write_text(os.path.join(test_dir, "qrels", "test.tsv"), "query-id\tcorpus-id\tscore\n" + "".join(
        f"q:{d.name}\t{d.name}\t1\n" for d in test))
    return {"train": n_train, "test": len(test),
            "train_packages": len({d.package for d in train}), "test_packages": sorted(test_packages)}
