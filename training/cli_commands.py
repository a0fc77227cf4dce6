"""`nvembed mine` and `nvembed make-stdlib-train`: registered by nvembed.cli.build_parser through
add_mine_parser / add_make_stdlib_train_parser. User errors raise the CLI's CLIError (exit code 2, one line)."""
from __future__ import annotations

import argparse
import os
import time


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {x}")
    return x


def add_mine_parser(sub) -> None:
    from nvembed.cli import _add_model_args, _positive
    p = sub.add_parser("mine", help="mine hard negatives for a training file (NV-Embed's TopK-PercPos)",
                       description="Positive-aware hard-negative mining: embed each query of --data (with its "
                                   "instruction) and the corpus with --model, rank the corpus by cosine score, drop "
                                   "the query's positives, keep the first --max-candidates candidates scoring below "
                                   "--perc-pos x the (lowest) positive's score and write the best --top-k of them "
                                   "as the example's neg (existing negatives are replaced). The output is written "
                                   "only when everything succeeded.")
    _add_model_args(p, instruction=False)
    p.add_argument("--data", required=True, metavar="TRAIN.jsonl",
                   help='training examples, one {"query", "pos", ["neg", "instruction", "task_type"]} per line')
    p.add_argument("--corpus", metavar="CORPUS",
                   help="candidate documents: BEIR corpus.jsonl (embedded as 'title text') or a text file (one "
                        "document per non-blank line); default: every pos and neg text of --data, deduplicated")
    p.add_argument("--out", required=True, metavar="MINED.jsonl", help="output training file")
    p.add_argument("--top-k", type=_positive, default=7, help="negatives per query (default 7)")
    p.add_argument("--perc-pos", type=_fraction, default=0.95,
                   help="keep candidates scoring below this fraction of the positive's score (default 0.95)")
    p.add_argument("--max-candidates", type=_positive, default=100,
                   help="how many top-ranked non-positive candidates are considered (default 100)")
    p.add_argument("--instruction", default=None,
                   help="encode the queries with this instruction instead of each example's own (the output keeps "
                        "theirs); --instruction '' suits a teacher trained without instructions, like 'default'")
    p.add_argument("--drop-without-negatives", action="store_true",
                   help="leave out the examples that got no negative (training with group size > 1 needs one)")
    p.set_defaults(func=cmd_mine)


def add_make_stdlib_train_parser(sub) -> None:
    p = sub.add_parser("make-stdlib-train", help="write the offline stdlib training set and its unseen test set",
                       description="From Python standard-library docstrings (offline): DIR/train.jsonl (query = a "
                                   "function's, class's or method's first docstring line, pos = its documentation, "
                                   "no negatives yet: run `nvembed mine`) and DIR/test/, a BEIR folder for "
                                   "`nvembed eval` built from other top-level packages than the training set.")
    p.add_argument("out_dir", metavar="DIR")
    p.add_argument("--seed", type=int, default=0, help="which packages are held out (default 0)")
    p.set_defaults(func=cmd_make_stdlib_train)


def cmd_mine(args) -> int:
    from nvembed import cli, retrieval

    from .data import DataError, read_jsonl, write_jsonl
    from .mining import corpus_from_examples, mine_hard_negatives

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise cli.CLIError(f"output directory {out_dir} does not exist or is not a directory")
    if os.path.isdir(args.out):  # before the mining, not when writing its result
        raise cli.CLIError(f"--out {args.out} is a directory; give the output file's path")
    if args.max_candidates < args.top_k:
        raise cli.CLIError(f"--max-candidates ({args.max_candidates}) must be >= --top-k ({args.top_k})")
    try:
        examples = read_jsonl(args.data)
        if not examples:
            raise cli.CLIError(f"{args.data}: no examples")
        if args.corpus:
            _, titles, texts = retrieval.read_corpus(args.corpus)
            corpus = [retrieval.document_text(a, b) for a, b in zip(titles, texts)]
        else:
            corpus = corpus_from_examples(examples)
        model = cli._load(args)  # on --device / --dtype
        t = time.perf_counter()
        mined = mine_hard_negatives(examples, corpus, model, top_k=args.top_k, perc_pos=args.perc_pos,
                                    max_candidates=args.max_candidates, batch_size=args.batch_size,
                                    max_length=args.max_length,
                                    show_progress_bar=cli._progress(len(corpus), args.batch_size, args.quiet),
                                    instruction=args.instruction)
        dt = time.perf_counter() - t
        counts = [len(ex.neg) for ex in mined]
        kept = [ex for ex in mined if ex.neg] if args.drop_without_negatives else mined
        if not kept:
            raise cli.CLIError("no example got a negative (try a larger --max-candidates or --perc-pos, or "
                               "--instruction ''); nothing written")
        write_jsonl(args.out, kept)
    except (DataError, ValueError) as e:  # ValueError: settings the model cannot honour (e.g. --max-length)
        raise cli.CLIError(str(e)) from None
    n_none = sum(c == 0 for c in counts)
    print(f"nvembed: mined {len(mined)} examples against {len({c for c in corpus if c.strip()})} corpus texts in "
          f"{dt:.1f} s: {sum(counts) / len(counts):.2f} negatives per example on average, "
          f"{sum(c < args.top_k for c in counts)} with fewer than {args.top_k} ({n_none} with none"
          f"{', left out' if args.drop_without_negatives and n_none else ''}); wrote {len(kept)} examples to "
          f"{args.out}")
    return 0


def cmd_make_stdlib_train(args) -> int:
    from nvembed.cli import CLIError

    from .stdlib_split import write_stdlib_train_test
    try:
        counts = write_stdlib_train_test(args.out_dir, seed=args.seed)
    except OSError as e:
        raise CLIError(f"cannot write {args.out_dir}: {e.strerror or e}") from None
    print(f"nvembed: wrote {counts['train']} training pairs from {counts['train_packages']} packages to "
          f"{os.path.join(args.out_dir, 'train.jsonl')} and {counts['test']} test documents and queries from "
          f"{len(counts['test_packages'])} held-out packages ({', '.join(counts['test_packages'])}) to "
          f"{os.path.join(args.out_dir, 'test')}")
    return 0
