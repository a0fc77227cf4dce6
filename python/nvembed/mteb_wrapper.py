"""MTEB integration: `NVEmbedMTEB(model)` implements mteb's encoder protocol (mteb 2.x `EncoderProtocol`) without
importing mteb, so this module works (and is tested) where mteb is not installed.

    import mteb
    results = mteb.evaluate(NVEmbedMTEB(nvembed.load(path)), mteb.get_tasks(tasks=["SciFact"]))

`encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs)` reads the texts from the
batches of mteb's DataLoader (`batch["text"]`), picks NV-Embed's instruction for the task and calls
`NVEmbedModel.encode(texts, instruction=...)` (instruction tokens excluded from pooling, as released):

- queries, and the inputs of tasks without a query/document split (classification, clustering, STS, pair
  classification, ...; mteb passes prompt_type None there) get `"Instruct: {task instruction}\\nQuery: "`;
- documents (`prompt_type` "document"; "passage"/"corpus" accepted too) get no instruction, as in the NV-Embed
  paper, except where the released instructions.json gives the corpus one (QuoraRetrieval: the same as its queries);
- the task instruction is looked up by task name: NV-Embed's published ones (`NVEMBED_TASK_INSTRUCTIONS`), then
  the task types instructions.json names by type (STS, Summarization), then our transcriptions of the paper's
  table that could not be checked (`UNVERIFIED_TASK_INSTRUCTIONS`, CQADupstack), else
  `GENERIC_RETRIEVAL_INSTRUCTION`, NV-Embed's own example instruction, whatever the task type.
  `instructions={...}` adds or overrides entries: a task name (or "STS" / "SUMM" for those task types) mapped to
  the query instruction, or to {"query": ..., "corpus": ...} / {"text": ...} as in instructions.json, so the
  released file itself can be passed (`instructions=json.load(open("instructions.json"))`).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery: "

# Sources, checked for every entry in the groups below:
# [R] NV-Embed-v2's released instructions.json: Hugging Face nvidia/NV-Embed-v2, file instructions.json, added in
#     the first commit (2c0dadb, 2024-09-09, Chankyu Lee) and unchanged through c50d55f (2025-02-23); read from the
#     GitHub mirror of that repository's history, repository abhaybd/NV-Embed-v2_fixed, path instructions.json.
#     It has the 15 BEIR retrieval tasks except CQADupStack ({"query", "corpus"}), "STS" and "SUMM" ({"text"}).
# [C] the same repository's model card, README.md (commit 5130cf1): the example instruction below; "For MTEB
#     sub-tasks for retrieval, STS, summarization, please use the instruction prefix template in instructions.json.
#     For classification, clustering and reranking, please use the instructions provided in Table. 7 in NV-Embed
#     paper" (arXiv 2405.17428). The text of that table was not available here: see UNVERIFIED_TASK_INSTRUCTIONS.

# [C] NV-Embed's model-card example instruction; used for any task missing from the tables.
GENERIC_RETRIEVAL_INSTRUCTION = "Given a question, retrieve passages that answer the question"

# Query-side task descriptions (they go into INSTRUCTION_TEMPLATE), all from [R].
NVEMBED_TASK_INSTRUCTIONS: Dict[str, str] = {
    # retrieval: instructions.json's "query" fields
    "ArguAna": "Given a claim, retrieve documents that support or refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve relevant passages that answer the query",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that answer the question",
    "NQ": "Given a question, retrieve passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve passages that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    # STS: instructions.json's "STS" entry (one instruction for every STS task), spelled out for MTEB's English ones
    "BIOSSES": "Retrieve semantically similar text",
    "SICK-R": "Retrieve semantically similar text",
    "STS12": "Retrieve semantically similar text",
    "STS13": "Retrieve semantically similar text",
    "STS14": "Retrieve semantically similar text",
    "STS15": "Retrieve semantically similar text",
    "STS16": "Retrieve semantically similar text",
    "STS17": "Retrieve semantically similar text",
    "STS22": "Retrieve semantically similar text",
    "STSBenchmark": "Retrieve semantically similar text",
    # summarization: instructions.json's "SUMM" entry
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}

# Document-side instructions, from [R]: the only non-empty "corpus" field of instructions.json.
NVEMBED_CORPUS_INSTRUCTIONS: Dict[str, str] = {
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
}

# [R] names two task types rather than tasks; mteb's TaskMetadata.type -> instructions.json key.
RELEASED_TYPE_KEYS = {"STS": "STS", "Summarization": "SUMM"}
RELEASED_TYPE_INSTRUCTIONS: Dict[str, str] = {
    "STS": "Retrieve semantically similar text",
    "SUMM": "Given a news summary, retrieve other semantically similar summaries",
}

# Ours, not published: written from memory for the tasks the card sends to the paper's Table 7 (classification,
# clustering, reranking; pair classification too), which could not be checked against NV-Embed's own text here.
# They equal e5-mistral-7b-instruct's evaluation instructions word for word; NV-Embed's retrieval instructions
# above differ from e5-mistral's for 5 of 14 tasks (ArguAna, FiQA2018, NFCorpus, NQ, Touche2020), so these may
# differ from NV-Embed's too. They are used (closer to the task than the generic retrieval instruction) but are
# NOT verified NV-Embed instructions: check them against the paper before publishing scores, or pass
# `instructions=`.
UNVERIFIED_TASK_INSTRUCTIONS: Dict[str, str] = {
    # reranking
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    # classification
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual "
                                          "or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                             "emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, "
                                              "or neutral",
    # clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # pair classification
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
}

# Ours, not published: CQADupStack (one of the 15 BEIR tasks) is missing from instructions.json; every
# CQADupstack*Retrieval subset gets this one.
CQADUPSTACK_INSTRUCTION = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                           "duplicates to the given question")

DOCUMENT_PROMPT_TYPES = ("document", "passage", "corpus")
QUERY_PROMPT_TYPES = ("query",)

Instructions = Mapping[str, Union[str, Mapping[str, str]]]


def _task_name(task_metadata: Any) -> str:
    if isinstance(task_metadata, str):
        return task_metadata
    name = getattr(task_metadata, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"NVEmbedMTEB: task_metadata must have a str .name, got {type(task_metadata).__name__}")
    return name


def _task_type(task_metadata: Any) -> Optional[str]:
    value = getattr(task_metadata, "type", None)
    return value if isinstance(value, str) else None


def _prompt_type(prompt_type: Any) -> Optional[str]:
    if prompt_type is None:
        return None
    value = getattr(prompt_type, "value", prompt_type)  # mteb.types.PromptType is a str enum
    value = str(value).lower()
    if value not in DOCUMENT_PROMPT_TYPES + QUERY_PROMPT_TYPES:
        raise ValueError(f"NVEmbedMTEB: unknown prompt_type {prompt_type!r} (expected query / document or None)")
    return value


def _entry(key: str, value: Any) -> Tuple[str, str]:
    """(query, corpus) instruction of one `instructions=` entry: a str (the query side), or a mapping with
    "query" / "corpus" / "text" (instructions.json's layout; "text" serves both sides, as for STS)."""
    if isinstance(value, str):
        return value, ""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"query", "corpus", "text"})
        if unknown:
            raise ValueError(f"NVEmbedMTEB: instructions[{key!r}] has unknown fields {unknown} "
                             "(expected query / corpus / text)")
        for field, text in value.items():
            if not isinstance(text, str):
                raise TypeError(f"NVEmbedMTEB: instructions[{key!r}][{field!r}] is {type(text).__name__}, "
                                "expected str")
        text = value.get("text", "")
        return value.get("query", text), value.get("corpus", text if "text" in value else "")
    raise TypeError(f"NVEmbedMTEB: instructions[{key!r}] is {type(value).__name__}, expected str or a mapping "
                    "with query / corpus / text")


def check_instructions(instructions: Optional[Instructions]) -> Dict[str, Tuple[str, str]]:
    """`instructions=` as {key: (query, corpus)}, every entry checked up front (errors name the key)."""
    if instructions is None:
        return {}
    if not isinstance(instructions, Mapping):
        raise TypeError(f"NVEmbedMTEB: instructions must be a mapping, got {type(instructions).__name__}")
    out = {}
    for key, value in instructions.items():
        if not isinstance(key, str):
            raise TypeError(f"NVEmbedMTEB: instructions keys must be task names (str), got {key!r}")
        out[key] = _entry(key, value)
    return out


def _override(task_name: str, task_type: Optional[str], instructions) -> Optional[Tuple[str, str]]:
    """(query, corpus) of the `instructions=` entry for this task (by name, then by the base task a renamed mteb
    variant derives from, as the built-in tables look it up, else by instructions.json's type key), or None. An
    entry decides both sides."""
    for key in (task_name, base_task_name(task_name), RELEASED_TYPE_KEYS.get(task_type)):
        if instructions and key is not None and key in instructions:
            return _entry(key, instructions[key])
    return None


def base_task_name(task_name: str) -> str:
    """The task a renamed mteb variant derives from, whose instruction it keeps: mteb 2.x's English v2 benchmark
    uses `ClimateFEVERHardNegatives`, `Touche2020Retrieval.v3`, `TwentyNewsgroupsClustering.v2` and the like for
    the tasks NV-Embed's table names `ClimateFEVER`, `Touche2020`, `TwentyNewsgroupsClustering`."""
    name = re.sub(r"\.v\d+$", "", task_name)
    name = re.sub(r"HardNegatives$", "", name)
    return "Touche2020" if name == "Touche2020Retrieval" else name


def _lookup(table: Dict[str, str], task_name: str) -> Optional[str]:
    if task_name in table:
        return table[task_name]
    return table.get(base_task_name(task_name))


def task_instruction(task_name: str, instructions: Optional[Instructions] = None,
                     task_type: Optional[str] = None) -> str:
    """The query-side task description for `task_name` (mteb's TaskMetadata.type in `task_type`, optional):
    `instructions` (overrides), NV-Embed's published table, the released type-wide ones (STS, Summarization),
    ours (unverified, CQADupstack subsets), else GENERIC_RETRIEVAL_INSTRUCTION. "" means no instruction."""
    entry = _override(task_name, task_type, instructions)
    if entry is not None:
        return entry[0]
    found = _lookup(NVEMBED_TASK_INSTRUCTIONS, task_name)
    if found is not None:
        return found
    if task_type in RELEASED_TYPE_KEYS:
        return RELEASED_TYPE_INSTRUCTIONS[RELEASED_TYPE_KEYS[task_type]]
    found = _lookup(UNVERIFIED_TASK_INSTRUCTIONS, task_name)
    if found is not None:
        return found
    if task_name.lower().startswith("cqadupstack"):
        return CQADUPSTACK_INSTRUCTION
    return GENERIC_RETRIEVAL_INSTRUCTION


def corpus_instruction(task_name: str, instructions: Optional[Instructions] = None,
                       task_type: Optional[str] = None) -> str:
    """The document-side task description: "" (none) except where instructions.json gives one (QuoraRetrieval)
    or an `instructions=` entry has a "corpus" / "text" field."""
    entry = _override(task_name, task_type, instructions)
    if entry is not None:
        return entry[1]
    return _lookup(NVEMBED_CORPUS_INSTRUCTIONS, task_name) or ""


def instruction_for(task_metadata: Any, prompt_type: Any = None,
                    instructions: Optional[Instructions] = None) -> str:
    """The string prepended to the texts: "Instruct: {task}\\nQuery: " with the query-side description (or the
    document-side one for documents), "" where that description is empty (documents of most tasks)."""
    name, task_type = _task_name(task_metadata), _task_type(task_metadata)
    if _prompt_type(prompt_type) in DOCUMENT_PROMPT_TYPES:
        task = corpus_instruction(name, instructions, task_type)
    else:
        task = task_instruction(name, instructions, task_type)
    return INSTRUCTION_TEMPLATE.format(task=task) if task else ""


def _texts_from_inputs(inputs: Iterable) -> List[str]:
    """Texts from mteb's DataLoader of batched dicts ({"text": [...], ...}); a plain list of str also works."""
    texts: List[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping):
            if "text" not in item:
                raise ValueError(f"NVEmbedMTEB: a batch without a 'text' field (fields: {sorted(item)}); only text "
                                 "inputs are supported")
            text = item["text"]
            if isinstance(text, str):  # one row ({"text": "..."}), not a batch: its characters are not texts
                texts.append(text)
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                texts.extend(text)
            else:
                raise TypeError(f"NVEmbedMTEB: a batch's 'text' must be a str or a list of str, got "
                                f"{type(text).__name__}")
        else:
            raise TypeError(f"NVEmbedMTEB: unsupported input item {type(item).__name__} (expected mteb batches or str)")
    return texts


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.float()
    return t[None] if t.dim() == 1 else t


class NVEmbedMTEB:
    """mteb encoder protocol around an NVEmbedModel (or a name/path for nvembed.load). Cosine similarity."""

    def __init__(self, model: Union[str, Any] = "default", revision: Optional[str] = None, *,
                 device: Optional[str] = None, instructions: Optional[Instructions] = None,
                 max_length: int = 4096, batch_size: int = 32, name: Optional[str] = None, **kwargs: Any):
        if isinstance(model, str):
            from .hub import load
            name = name or f"nvembed/{model}"
            model = load(model, device=device)
        elif device is not None:
            model = model.to(device)
        self.model = model
        self.revision = revision
        check_instructions(instructions)
        self.instructions = dict(instructions or {})
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = name or "nvembed/NVEmbedModel"

    def get_instruction(self, task_metadata: Any, prompt_type: Any = None) -> str:
        return instruction_for(task_metadata, prompt_type, self.instructions)

    def encode(self, inputs: Iterable, *, task_metadata: Any, hf_split: str = "", hf_subset: str = "",
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        instruction = self.get_instruction(task_metadata, prompt_type)
        texts = _texts_from_inputs(inputs)
        return self.model.encode(texts, instruction=instruction, max_length=self.max_length,
                                 batch_size=kwargs.get("batch_size") or self.batch_size,
                                 show_progress_bar=bool(kwargs.get("show_progress_bar", False)))

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        a = torch.nn.functional.normalize(_as_tensor(embeddings1), dim=-1)
        b = torch.nn.functional.normalize(_as_tensor(embeddings2), dim=-1)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a = torch.nn.functional.normalize(_as_tensor(embeddings1), dim=-1)
        b = torch.nn.functional.normalize(_as_tensor(embeddings2), dim=-1)
        return (a * b).sum(-1)

    @property
    def mteb_model_meta(self):
        """mteb's ModelMeta (an empty one named after this model) when mteb is installed, else None."""
        try:
            from mteb.models.model_meta import ModelMeta
        except ImportError:
            return None
        overwrites = {"name": self.name, "revision": self.revision or "no_revision_available",
                      "use_instructions": True,
                      "embed_dim": self.model.embedding_dim}
        try:
            return ModelMeta.create_empty(overwrites=overwrites)
        except Exception:  # a ModelMeta that rejects these fields: the empty one (mteb accepts it)
            return ModelMeta.create_empty()
