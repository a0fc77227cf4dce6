"""Training data: JSONL examples, task-homogeneous batches and the per-query group of documents.

One example per line, FlagEmbedding's layout plus two optional fields:

    {"query": "...", "pos": ["...", ...], "neg": ["...", ...], "instruction": "Instruct: ...\\nQuery: ",
     "task_type": "retrieval"}

query (non-empty string) and pos (a non-empty list of non-empty strings) are required; neg (default []),
instruction (default "", prepended to the query and excluded from pooling as model.encode does) and task_type
(default "retrieval", one of TASK_TYPES) are optional. Other keys are ignored, so files written by other tools
(FlagEmbedding's "prompt", "type", scores, ids) load unchanged. Every malformed line raises DataError naming
FILE:LINE.

A training step sees one Batch: B queries of one task type and, for each, a group of G documents (its positive
first, then G-1 negatives), so docs[i * G] is the positive of query i — the layout of torch.ops.nvembed.infonce
(label = i * group_size). Batches are deterministic given (seed, epoch) and resumable by step.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

TASK_TYPES = ("retrieval", "classification", "clustering", "sts", "reranking", "pair")


class DataError(ValueError):
    """Bad training data or arguments; file errors read "FILE:LINE: message"."""


def _encodable(text: str) -> bool:
    """JSON's \\uXXXX escapes can spell half a surrogate pair, which json.loads accepts and no tokenizer can encode.
    (nvembed.retrieval.is_valid_text's twin: importing nvembed loads torch, which this module does not need.)"""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _problem(query, pos, neg, instruction, task_type) -> Optional[str]:
    """What is wrong with these field values (None when nothing is); shared by Example and read_jsonl so that a
    file and a constructed Example obey the same rules."""
    if not isinstance(query, str):
        return f"field 'query' is {type(query).__name__}, expected a string"
    if not query.strip():
        return "field 'query' is empty"
    if not _encodable(query):
        return "field 'query' is not valid Unicode (a lone surrogate, e.g. a \\ud83d escape without its pair)"
    for key, value, required in (("pos", pos, True), ("neg", neg, False)):
        if not isinstance(value, (list, tuple)):
            return f"field {key!r} is {type(value).__name__}, expected a list of strings"
        if required and not value:
            return f"field {key!r} is empty (every query needs at least one positive)"
        for i, text in enumerate(value):
            if not isinstance(text, str):
                return f"{key}[{i}] is {type(text).__name__}, expected a string"
            if not text.strip():
                return f"{key}[{i}] is empty"
            if not _encodable(text):
                return f"{key}[{i}] is not valid Unicode (a lone surrogate, e.g. a \\ud83d escape without its pair)"
    same = [i for i, text in enumerate(neg) if text in pos]
    if same:
        return f"neg[{same[0]}] is also a positive (a document cannot be both)"
    if not isinstance(instruction, str):
        return f"field 'instruction' is {type(instruction).__name__}, expected a string"
    if not _encodable(instruction):
        return "field 'instruction' is not valid Unicode (a lone surrogate, e.g. a \\ud83d escape without its pair)"
    if not isinstance(task_type, str):
        return f"field 'task_type' is {type(task_type).__name__}, expected a string"
    if task_type not in TASK_TYPES:
        return f"unknown task_type {task_type!r} (one of {', '.join(TASK_TYPES)})"
    return None


@dataclass(frozen=True)
class Example:
    """One training example. pos/neg given as lists are stored as tuples (the example stays hashable)."""
    query: str
    pos: tuple[str, ...]
    neg: tuple[str, ...] = ()
    instruction: str = ""
    task_type: str = "retrieval"

    def __post_init__(self):
        problem = _problem(self.query, self.pos, self.neg, self.instruction, self.task_type)
        if problem is not None:
            raise DataError(f"Example: {problem}")
        object.__setattr__(self, "pos", tuple(self.pos))
        object.__setattr__(self, "neg", tuple(self.neg))

    def to_json(self) -> dict:
        return {"query": self.query, "pos": list(self.pos), "neg": list(self.neg), "instruction": self.instruction,
                "task_type": self.task_type}


# ------------------------------------------------------------------------------------------------ JSONL files
def read_jsonl(path: str) -> List[Example]:
    """The examples of a JSONL file (format in the module docstring); blank lines are skipped. Raises DataError
    "PATH:LINE: ..." for a line that is not UTF-8, not JSON, not an object, or has a missing or ill-typed field,
    an empty pos or an unknown task_type; "PATH: ..." when the file cannot be read."""
    if not isinstance(path, str):
        raise DataError(f"read_jsonl: path must be a string, got {type(path).__name__}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    examples = []
    # Split on b"\n" only: str.splitlines would also split inside JSON strings holding U+2028 or \x1c.
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line: {e.reason})") from None
        if lineno == 1 and text.startswith("\ufeff"):
            text = text[1:]  # a UTF-8 byte-order mark, as some editors write
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for key in ("query", "pos"):
            if key not in obj:
                raise DataError(f"{path}:{lineno}: missing field {key!r}")
        fields = (obj["query"], obj["pos"], obj.get("neg", []), obj.get("instruction", ""),
                  obj.get("task_type", "retrieval"))
        problem = _problem(*fields)
        if problem is not None:
            raise DataError(f"{path}:{lineno}: {problem}")
        examples.append(Example(*fields))
    return examples


def write_jsonl(path: str, examples: Iterable[Example]) -> int:
    """Write the examples one per line (every field, instruction and task_type included) and return how many.
    Everything is checked before anything is written, and the file is written to a temporary name in the same
    folder and renamed: a bad item or a failed write leaves `path` as it was. Non-ASCII text is written as JSON
    escapes, so every JSONL reader splits the lines correctly."""
    if not isinstance(path, str) or not path:
        raise DataError(f"write_jsonl: path must be a non-empty string, got {path!r}")
    if isinstance(examples, (str, bytes, dict)):
        raise DataError(f"write_jsonl: examples must be an iterable of Example, got {type(examples).__name__}")
    examples = list(examples)
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise DataError(f"write_jsonl: examples[{i}] is {type(ex).__name__}, expected Example")
        problem = _problem(ex.query, ex.pos, ex.neg, ex.instruction, ex.task_type)  # frozen, but not sealed
        if problem is not None:
            raise DataError(f"write_jsonl: examples[{i}]: {problem}")
    atomic_write_text(path, "".join(json.dumps(ex.to_json()) + "\n" for ex in examples))
    return len(examples)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to a temporary sibling and rename it over `path` (nvembed.retrieval's atomic writer): readers
    see the old file or the new one, never a half-written one, and a failed write leaves nothing behind."""
    from nvembed.retrieval import _atomic, _write
    _atomic(path, lambda tmp: _write(tmp, text))


# ---------------------------------------------------------------------------------------------------- batching
def _check_int(fn: str, name: str, value, minimum: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise DataError(f"{fn}: {name} must be >= {minimum}, got {value}")


def _check_examples(fn: str, examples) -> None:
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
        raise DataError(f"{fn}: examples must be a sequence of Example, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise DataError(f"{fn}: examples[{i}] is {type(ex).__name__}, expected Example")


def make_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int,
                 drop_last: bool = True) -> List[List[int]]:
    """One epoch's batches as lists of example indices, each batch of a single task_type: the indices of each
    task type (in TASK_TYPES order) are shuffled and cut into batches of batch_size, then the batch order is
    shuffled. With drop_last each task type's incomplete tail batch is dropped (a different random tail each
    epoch), otherwise it is kept as a smaller batch. Deterministic given (seed, epoch); the number of batches
    does not depend on them."""
    _check_examples("make_batches", examples)
    _check_int("make_batches", "batch_size", batch_size, 1)
    _check_int("make_batches", "seed", seed)
    _check_int("make_batches", "epoch", epoch, 0)
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"make_batches:{seed}:{epoch}")
    batches = []
    for task in TASK_TYPES:
        idx = [i for i, ex in enumerate(examples) if ex.task_type == task]
        rng.shuffle(idx)
        end = len(idx) - len(idx) % batch_size if drop_last else len(idx)
        batches.extend(idx[s:min(s + batch_size, end)] for s in range(0, end, batch_size))
    rng.shuffle(batches)
    return batches


def select_group(example: Example, group_size: int, rng: random.Random) -> List[str]:
    """[one positive, group_size - 1 negatives] for one query: the positive is rng.choice(pos); the negatives
    are rng.sample(neg, group_size - 1) when there are enough, otherwise FlagEmbedding's rule: sample from neg
    repeated ceil((group_size - 1) / len(neg)) times, so each negative appears at most that often."""
    if not isinstance(example, Example):
        raise DataError(f"select_group: example is {type(example).__name__}, expected Example")
    _check_int("select_group", "group_size", group_size, 1)
    if not isinstance(rng, random.Random):
        raise DataError(f"select_group: rng must be a random.Random, got {type(rng).__name__}")
    group = [rng.choice(example.pos)]
    n = group_size - 1
    if n == 0:
        return group
    neg = list(example.neg)
    if not neg:
        raise DataError(f"select_group: the example with query {example.query[:80]!r} has no negatives, but "
                        f"group_size={group_size} needs {n} (mine them with `nvembed mine`, or use group_size=1 for "
                        "retrieval-only data)")
    if len(neg) < n:
        neg = neg * math.ceil(n / len(neg))
    return group + rng.sample(neg, n)


def check_group_size(examples: Sequence[Example], group_size: int) -> None:
    """Up-front check for a trainer: with group_size > 1 every example needs at least one negative. The error
    says how many lack them and shows the first."""
    _check_examples("check_group_size", examples)
    _check_int("check_group_size", "group_size", group_size, 1)
    if group_size == 1:
        return
    lacking = [i for i, ex in enumerate(examples) if not ex.neg]
    if lacking:
        first = examples[lacking[0]]
        raise DataError(f"check_group_size: {len(lacking)} of {len(examples)} examples have no negatives (first: "
                        f"examples[{lacking[0]}], query {first.query[:80]!r}), but group_size={group_size} needs "
                        f"{group_size - 1} per query: mine them with `nvembed mine`, or use group_size=1 for "
                        "retrieval-only data")


@dataclass
class Batch:
    """One training step's inputs: queries[i] with instructions[i]; docs[i * group_size] is its positive and
    docs[i * group_size + 1 : (i + 1) * group_size] its negatives."""
    step: int
    epoch: int
    task_type: str
    queries: List[str]
    instructions: List[str]
    docs: List[str]
    group_size: int


def iterate_batches(examples: Sequence[Example], batch_size: int, group_size: int, seed: int, start_step: int = 0,
                    drop_last: bool = True) -> Iterator[Batch]:
    """Batches forever, epoch after epoch (make_batches(seed, epoch)), with select_group for each query.
    Resumable: the sequence from start_step=k equals the sequence from 0 without its first k batches, because the
    negatives are drawn with an rng seeded by (seed, epoch, batch index) and the batches per epoch are fixed, so
    a trainer resumes from its step alone. Arguments and negatives are checked before the first batch."""
    _check_examples("iterate_batches", examples)
    _check_int("iterate_batches", "batch_size", batch_size, 1)
    _check_int("iterate_batches", "group_size", group_size, 1)
    _check_int("iterate_batches", "seed", seed)
    _check_int("iterate_batches", "start_step", start_step, 0)
    check_group_size(examples, group_size)
    per_epoch = len(make_batches(examples, batch_size, seed, 0, drop_last))
    if per_epoch == 0:
        counts = {t: sum(ex.task_type == t for ex in examples) for t in TASK_TYPES}
        counts = ", ".join(f"{t} {n}" for t, n in counts.items() if n) or "no examples"
        raise DataError(f"iterate_batches: no full batch of batch_size={batch_size} can be formed (batches hold one "
                        f"task type; examples per type: {counts}): lower batch_size or add examples")
    if drop_last:
        # a task type with fewer examples than a batch would be loaded and then never trained on
        starved = {t: n for t in TASK_TYPES if 0 < (n := sum(ex.task_type == t for ex in examples)) < batch_size}
        if starved:
            listed = ", ".join(f"{t} ({n} examples)" for t, n in starved.items())
            raise DataError(f"iterate_batches: task type {listed} cannot fill one batch of batch_size={batch_size} "
                            "(batches hold one task type, so these examples would never be trained on): lower "
                            "batch_size, add examples of that type, or leave them out")
    return _batches(examples, batch_size, group_size, seed, start_step, drop_last, per_epoch)


def _batches(examples, batch_size, group_size, seed, start_step, drop_last, per_epoch) -> Iterator[Batch]:
    step = start_step
    epoch, first = divmod(start_step, per_epoch)
    while True:
        batches = make_batches(examples, batch_size, seed, epoch, drop_last)
        for b in range(first, per_epoch):
            rng = random.Random(f"iterate_batches:{seed}:{epoch}:{b}")
            chosen = [examples[i] for i in batches[b]]
            docs = []
            for ex in chosen:
                docs.extend(select_group(ex, group_size, rng))
            yield Batch(step=step, epoch=epoch, task_type=chosen[0].task_type, queries=[ex.query for ex in chosen],
                        instructions=[ex.instruction for ex in chosen], docs=docs, group_size=group_size)
            step += 1
        epoch, first = epoch + 1, 0
