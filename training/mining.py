"""Positive-aware hard-negative mining (NV-Embed's TopK-PercPos).

A teacher model embeds every query (with its instruction, excluded from pooling where the model's config says
so, exactly as model.encode does) and every corpus text. For each query the corpus is ranked by cosine score
(exact top-k by chunked matrix product, nvembed.retrieval.exact_topk); the positives of every example with the same
query text and the query text itself are dropped (text equality), only the first max_candidates remaining
candidates are considered, and of those the ones scoring below perc_pos x the positive's score are kept, best first,
up to top_k. The threshold removes candidates that score almost as high as the positive, which are often unlabelled
positives (false negatives).
For a positive scoring s < 0 the margin is taken below s as well: the threshold is s - (1 - perc_pos) |s| (equal
to perc_pos x s for s >= 0), so a candidate that beats the positive is never kept as a negative.

With several positives the threshold uses the LOWEST positive score: a candidate is only kept if it scores
clearly below every positive, the conservative choice against false negatives (the maximum would let through
candidates that beat the weaker positives).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .data import DataError, Example


def _threshold(pos_score: float, perc_pos: float) -> float:
    """Candidates scoring below this are kept: perc_pos x pos_score for pos_score >= 0, and as far below a
    negative pos_score (pos_score - (1 - perc_pos) |pos_score|), never above it."""
    return pos_score - (1.0 - perc_pos) * abs(pos_score)


def corpus_from_examples(examples: Sequence[Example]) -> List[str]:
    """Every positive and negative text of the examples, deduplicated, in order of first appearance: the
    default mining corpus."""
    seen: Dict[str, None] = {}
    for ex in examples:
        for text in ex.pos + ex.neg:
            seen.setdefault(text, None)
    return list(seen)


def _check(examples, corpus, model, top_k, perc_pos, max_candidates, batch_size, max_length) -> List[str]:
    fn = "mine_hard_negatives"
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
        raise DataError(f"{fn}: examples must be a sequence of Example, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise DataError(f"{fn}: examples[{i}] is {type(ex).__name__}, expected Example")
    if isinstance(corpus, (str, bytes)) or not isinstance(corpus, Sequence):
        raise DataError(f"{fn}: corpus must be a list of strings, got {type(corpus).__name__}")
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise DataError(f"{fn}: corpus[{i}] is {type(text).__name__}, expected a string")
    if not callable(getattr(model, "encode", None)):
        raise DataError(f"{fn}: model has no encode() method (load one with nvembed.load)")
    for name, value in (("top_k", top_k), ("max_candidates", max_candidates), ("batch_size", batch_size)) + (
            (("max_length", max_length),) if max_length is not None else ()):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{fn}: {name} must be an int >= 1, got {value!r}")
    if max_candidates < top_k:
        raise DataError(f"{fn}: max_candidates ({max_candidates}) must be >= top_k ({top_k})")
    if isinstance(perc_pos, bool) or not isinstance(perc_pos, (int, float)) or not 0.0 < perc_pos <= 1.0:
        raise DataError(f"{fn}: perc_pos must be a number in (0, 1], got {perc_pos!r}")
    unique = list(dict.fromkeys(t for t in corpus if t.strip()))
    if not unique:
        raise DataError(f"{fn}: corpus has no non-blank text")
    return unique


def mine_hard_negatives(examples: Sequence[Example], corpus: Sequence[str], model, top_k: int = 7,
                        perc_pos: float = 0.95, max_candidates: int = 100, batch_size: int = 32,
                        max_length: Optional[int] = None, show_progress_bar: bool = False,
                        instruction: Optional[str] = None) -> List[Example]:
    """The examples with `neg` replaced by up to top_k mined hard negatives each (fewer where not enough
    candidates pass the threshold), see the module docstring. `corpus` is deduplicated and blank texts are
    ignored; positives that are not in it are embedded too (their scores set the thresholds). `model` is any
    model with nvembed's encode(texts, instruction=..., normalize=...), e.g. nvembed.load("default").
    `instruction` (default None: each example's own) replaces the examples' instructions for the teacher's query
    embeddings only, e.g. "" for a teacher trained without instructions; the returned examples keep theirs."""
    import torch

    from nvembed.retrieval import exact_topk

    corpus = _check(examples, corpus, model, top_k, perc_pos, max_candidates, batch_size, max_length)
    if instruction is not None and not isinstance(instruction, str):
        raise DataError(f"mine_hard_negatives: instruction must be a string or None, got {type(instruction).__name__}")
    if not examples:
        return []
    kwargs = dict(batch_size=batch_size, normalize=True)
    if max_length is not None:
        kwargs["max_length"] = max_length

    row = {text: i for i, text in enumerate(corpus)}
    extra = [t for t in dict.fromkeys(p for ex in examples for p in ex.pos) if t not in row]
    for t in extra:
        row[t] = len(row)
    docs = torch.as_tensor(model.encode(corpus + extra, instruction="", show_progress_bar=show_progress_bar,
                                        **kwargs))
    queries = torch.empty(len(examples), docs.shape[1])
    by_instruction: Dict[str, List[int]] = {}
    for i, ex in enumerate(examples):
        by_instruction.setdefault(ex.instruction if instruction is None else instruction, []).append(i)
    for instruction, idx in by_instruction.items():
        queries[idx] = torch.as_tensor(model.encode([examples[i].query for i in idx], instruction=instruction,
                                                    **kwargs))

    # Every positive of the query text (over all its examples: a file with one (query, positive) pair per line must
    # not mine the query's other positives as its negatives) and the query text itself are dropped from the
    # ranking, so fetch enough to still see max_candidates.
    positives: Dict[str, set] = {}
    for ex in examples:
        positives.setdefault(ex.query, set()).update(ex.pos)
    n_drop = max(len(p) for p in positives.values()) + 1
    scores, ranked = exact_topk(queries, docs[:len(corpus)], min(len(corpus), max_candidates + n_drop))
    scores, ranked = scores.tolist(), ranked.tolist()
    mined = []
    for i, ex in enumerate(examples):
        pos_rows = [row[p] for p in ex.pos]
        threshold = _threshold(float((docs[pos_rows] @ queries[i]).min()), perc_pos)
        skip = positives[ex.query] | {ex.query}
        neg, considered = [], 0
        for score, j in zip(scores[i], ranked[i]):
            text = corpus[j]
            if text in skip:
                continue
            considered += 1
            if considered > max_candidates:
                break
            if score < threshold:
                neg.append(text)
                if len(neg) == top_k:
                    break
        mined.append(Example(ex.query, ex.pos, tuple(neg), ex.instruction, ex.task_type))
    return mined
