"""MTEB integration: `NVEmbedMTEB(model)` implements mteb's encoder protocol (mteb 2.x `EncoderProtocol`) without
importing mteb, so this module works (and is tested) where mteb is not installed.

    import mteb
    results = mteb.evaluate(NVEmbedMTEB(nvembed.load(path)), mteb.get_tasks(tasks=["SciFact"]))

`encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs)` reads the texts from the
batches of mteb's DataLoader (`batch["text"]`), picks NV-Embed's instruction for the task and calls
`NVEmbedModel.encode(texts, instruction=...)` (instruction tokens excluded from pooling, as released):

- documents (`prompt_type` "document"; "passage"/"corpus" accepted too) get no instruction, as in the NV-Embed paper;
- queries, and the inputs of tasks without a query/document split (classification, clustering, STS, pair
  classification, ...; mteb passes prompt_type None there) get `"Instruct: {task instruction}\\nQuery: "`;
- the task instruction is looked up by task name in `NVEMBED_TASK_INSTRUCTIONS` (NV-Embed's published per-task
  MTEB instructions for a representative set of tasks; every CQADupstack*Retrieval subset shares one); a task not
  in the table gets `GENERIC_RETRIEVAL_INSTRUCTION`, NV-Embed's own example instruction, whatever the task type.
  Pass `instructions={...}` to add or override entries.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import torch

INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery: "

# NV-Embed's model-card example instruction; used for any task missing from the table.
GENERIC_RETRIEVAL_INSTRUCTION = "Given a question, retrieve passages that answer the question"

CQADUPSTACK_INSTRUCTION = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                           "duplicates to the given question")

# NV-Embed's published per-task instructions (the task description that goes into INSTRUCTION_TEMPLATE), as
# listed for its MTEB evaluation (model repository's instructions.json / paper appendix), transcribed by hand:
# no copy of that file is available offline here. Checked against an independent copy only for FiQA2018, NQ,
# HotpotQA and the generic instruction; compare the rest with the released instructions.json before publishing
# scores (`instructions=` overrides any entry).
NVEMBED_TASK_INSTRUCTIONS: Dict[str, str] = {
    # retrieval (queries only; documents get no instruction)
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
    # STS
    **{name: "Retrieve semantically similar text" for name in
       ("STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STS22", "STSBenchmark", "SICK-R", "BIOSSES")},
    # summarization
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
}

DOCUMENT_PROMPT_TYPES = ("document", "passage", "corpus")
QUERY_PROMPT_TYPES = ("query",)


def _task_name(task_metadata: Any) -> str:
    if isinstance(task_metadata, str):
        return task_metadata
    name = getattr(task_metadata, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"NVEmbedMTEB: task_metadata must have a str .name, got {type(task_metadata).__name__}")
    return name


def _prompt_type(prompt_type: Any) -> Optional[str]:
    if prompt_type is None:
        return None
    value = getattr(prompt_type, "value", prompt_type)  # mteb.types.PromptType is a str enum
    value = str(value).lower()
    if value not in DOCUMENT_PROMPT_TYPES + QUERY_PROMPT_TYPES:
        raise ValueError(f"NVEmbedMTEB: unknown prompt_type {prompt_type!r} (expected query / document or None)")
    return value


def task_instruction(task_name: str, instructions: Optional[Mapping[str, str]] = None) -> str:
    """The task description for `task_name`: `instructions` (overrides), NV-Embed's table, CQADupstack subsets,
    else GENERIC_RETRIEVAL_INSTRUCTION."""
    if instructions and task_name in instructions:
        return instructions[task_name]
    if task_name in NVEMBED_TASK_INSTRUCTIONS:
        return NVEMBED_TASK_INSTRUCTIONS[task_name]
    if task_name.lower().startswith("cqadupstack"):
        return CQADUPSTACK_INSTRUCTION
    return GENERIC_RETRIEVAL_INSTRUCTION


def instruction_for(task_metadata: Any, prompt_type: Any = None,
                    instructions: Optional[Mapping[str, str]] = None) -> str:
    """The string prepended to the texts: "" for documents, else "Instruct: {task}\\nQuery: "."""
    if _prompt_type(prompt_type) in DOCUMENT_PROMPT_TYPES:
        return ""
    return INSTRUCTION_TEMPLATE.format(task=task_instruction(_task_name(task_metadata), instructions))


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
            texts.extend(item["text"])
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
                 device: Optional[str] = None, instructions: Optional[Mapping[str, str]] = None,
                 max_length: int = 4096, batch_size: int = 32, name: Optional[str] = None, **kwargs: Any):
        if isinstance(model, str):
            from .hub import load
            name = name or f"nvembed/{model}"
            model = load(model, device=device)
        elif device is not None:
            model = model.to(device)
        self.model = model
        self.revision = revision
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
