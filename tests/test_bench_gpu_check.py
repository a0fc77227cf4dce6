"""bench/gpu_check.sh and its sanitizer cases, checked where no GPU is: the script parses, every bench script it
calls exists, the compute-sanitizer table (bench/sanitize_cases.py) runs on CPU tensors and sets only variables the
ops read (a misspelled one would be ignored silently and leave its path unchecked on the one GPU run)."""
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT, run_bench

BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)
import gpu_verdict  # noqa: E402
import sanitize_cases  # noqa: E402


def _names(patterns):
    """{NVEMBED_* name: files} over the files matching `patterns` (relative to the repository)."""
    names = {}
    for pattern in patterns:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if "__pycache__" in path or not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                for name in re.findall(r"NVEMBED_[A-Z0-9_]+", f.read()):
                    names.setdefault(name, set()).add(os.path.relpath(path, ROOT))
    return names


def _read_variables():
    """Every NVEMBED_* name that appears where variables are read: the ops' sources (C++ / CUDA and the Python
    face), the model / training packages, the build and the tools; plus the benchmarks' own two."""
    return set(_names(["csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "nvembed_ext/*.py",
                       "python/**/*.py", "training/**/*.py", "setup.py", "CMakeLists.txt", "tools/**/*", ".ci/run"])
               ) | {"NVEMBED_BENCH_CSV", "NVEMBED_COMMIT"}  # bench/conftest.py, bench/common.py


VARIABLES_READ = _read_variables()


def test_gpu_check_parses_and_calls_existing_scripts():
    script = os.path.join(BENCH, "gpu_check.sh")
    out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(script) as f:
        called = set(re.findall(r"python3 (bench/[\w/]+\.py)", f.read()))
    assert {"bench/gpu_smoke.py", "bench/sanitize_flash.py", "bench/sanitize_cases.py"} <= called
    missing = sorted(p for p in called if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing


def test_cuda_objects_digest_covers_what_the_kernels_include():
    """tools/pack_cuda_objects.sh digests csrc/cuda's .cu / .cuh only (so edits to the C++ side after packing do not
    force a full nvcc build on the device): that holds while the kernels include no other file of csrc."""
    cuda = os.path.join(ROOT, "csrc", "cuda")
    for path in glob.glob(os.path.join(cuda, "*.cu")) + glob.glob(os.path.join(cuda, "*.cuh")):
        with open(path) as f:
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.M):
                assert inc.startswith("cuda/") and os.path.isfile(os.path.join(ROOT, "csrc", inc)), (path, inc)
    digest = subprocess.run(["bash", os.path.join(ROOT, "tools", "pack_cuda_objects.sh"), "--digest"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_sanitizer_cases_cpu():
    out = run_bench("sanitize_cases.py", "--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sanitizer cases done: 27 infonce, 4 latent_pool on cpu" in out.stdout


def test_sanitizer_cases_set_only_variables_the_ops_read():
    used = {var for env, *_ in sanitize_cases.INFONCE_CASES + sanitize_cases.LATENT_POOL_CASES for var in env}
    assert {"NVEMBED_INFONCE_GRAD", "NVEMBED_INFONCE_ROW_BLOCK", "NVEMBED_LATENT_POOL_KERNELS"} <= used
    unknown = sorted(used - VARIABLES_READ)
    assert not unknown, unknown


def test_benchmarks_tests_and_readme_name_only_variables_that_are_read():
    """A variable the GPU benchmarks set to pick a path (gpu_infonce's variants, the profiles, the CUDA tests) must be
    one the library reads, or the row labelled with that path measures the default one."""
    used = _names(["bench/**/*.py", "bench/*.sh", "tests/*.py", "README.md"])
    used.pop("NVEMBED_INFONCE_", None)  # a prefix: names formed in code (checked above for the sanitizer table)
    unknown = {name: sorted(files) for name, files in used.items() if name not in VARIABLES_READ}
    assert not unknown, unknown


# ---- bench/gpu_verdict.py: what a run says about each path a GPU run had to verify -------------------------------
def test_verdict_knows_every_unverified_flag():
    """The report covers every path csrc marks unverified (a flag added as false shows), and its paths' flags exist
    (all five set true by the H100 run of 2026-11-28: a run now is their regression check)."""
    flags = {}
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True):
        with open(path) as f:
            flags.update(re.findall(r"constexpr bool (k\w+Verified) = (true|false);", f.read()))
    ours = {flag for _, flag, *_ in gpu_verdict.PATHS}
    assert {k for k, v in flags.items() if v == "false"} <= ours
    assert ours <= set(flags)
    assert gpu_verdict.flag_states() == {k: v == "true" for k, v in flags.items()}
    verified_on_h100 = {"kInfonceGemmBwdVerified", "kInfonceGemmFwdVerified", "kInfonceFusedGradVerified",
                        "kLatentPoolFusedVerified", "kLatentPoolSavedVerified"}
    assert all(gpu_verdict.flag_states()[flag] for flag in verified_on_h100)


def test_verdict_does_not_charge_a_race_inside_cublas(tmp_path):
    """A racecheck hazard with both accesses in one cuBLAS kernel (the H100 run's, also reported for the pure-PyTorch
    reference) is listed apart; one in our kernel, or between two kernels, stays an error of the case."""
    log = tmp_path / "racecheck_infonce_latent_pool.log"
    log.write_text(
        "case 0 latent_pool_case latent_pool-fused [torch.bfloat16, 3, 150]\n"
        "========= Error: Race reported between Read access at nvjet_sm90_tst_64x8_64x16_1x4_h_bz_NNT+0xaf0\n"
        "=========     and Write access at nvjet_sm90_tst_64x8_64x16_1x4_h_bz_NNT+0x27e0 [128 hazards]\n"
        "case 1 latent_pool_case latent_pool-saved [torch.bfloat16, 3, 150]\n"
        "========= Error: Race reported between Write access at void nvembed::cuda::geglu_kernel<float>(int)+0x10\n"
        "=========     and Read access at void nvembed::cuda::geglu_kernel<float>(int)+0x20 [4 hazards]\n"
        "========= Error: Race reported between Write access at nvjet_sm90_tst_a+0x10\n"
        "=========     and Read access at nvjet_sm90_tst_b+0x20 [4 hazards]\n"
        "sanitizer cases done: 0 infonce, 2 latent_pool on cuda\n"
        "========= RACECHECK SUMMARY: 3 hazards displayed (3 errors, 0 warnings)\n")
    found = gpu_verdict.sanitizer_errors(str(log))
    assert found["latent_pool-fused"] == 0 and found["latent_pool-saved"] == 2
    assert found["_library"] == ["latent_pool-fused: nvjet_sm90_tst_64x8_64x16_1x4_h_bz_NNT"]
    text, _ = gpu_verdict.report(str(tmp_path))
    assert ("- racecheck: 0 error(s) in this path's cases; not counted: 1 hazard(s) inside cuBLAS "
            "(nvjet_sm90_tst_64x8_64x16_1x4_h_bz_NNT)") in text


def test_verdict_classifies_the_real_cuda_test_ids():
    """Every unverified path has CUDA tests under the ids the report looks for (collected here, run on the GPU)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "test_infonce_cuda.py", "test_latent_pool_cuda.py"], cwd=os.path.join(ROOT, "tests"),
                         capture_output=True, text=True, timeout=300)
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    assert len(ids) > 100, out.stdout[-2000:] + out.stderr[-2000:]
    counts = {}
    for test_id in ids:
        module, name = test_id.split("::", 1)
        which = gpu_verdict.test_path(module.replace("/", ".").removesuffix(".py"), name)
        counts[which] = counts.get(which, 0) + 1
    for name, *_ in gpu_verdict.PATHS:
        assert counts.get(name, 0) >= 10, (name, counts)
    assert counts.get(None, 0) >= 50  # the verified paths' tests are not charged to any unverified one


def test_verdict_report(tmp_path):
    (tmp_path / "smoke.log").write_text(
        "ok   infonce gemm-bwd bfloat16 B=300 G=4 d=128 +17 inb   loss 1e-6\n"
        "FAIL infonce fused bfloat16 B=300 G=4 d=128 +17 inb   grad 0.3\n"
        "ok   infonce fused float16 B=300 G=4 d=128 +17 inb\n"
        "ok   latent_pool fused bfloat16 B=3 L=37 d=64 N=16 H=2\n")

    def case(name, params, outcome=""):
        return f'<testcase classname="tests.test_infonce_cuda" name="{name}[{params}]">{outcome}</testcase>'
    (tmp_path / "cuda_tests.xml").write_text(
        "<testsuites><testsuite>"
        + case("test_matches_reference", "inbatch-1-1-32-0-bf16-gemm")
        + case("test_matches_reference", "inbatch-1-1-32-0-bf16-gemm-fwd", '<failure message="x"/>')
        + case("test_temperatures", "fused-bf16-0.02")
        + case("test_matches_reference", "inbatch-1-1-32-0-bf16-tensorcore", '<failure message="x"/>')
        + '<testcase classname="tests.test_latent_pool_cuda" name="test_x[fused]"><skipped/></testcase>'
        + "</testsuite></testsuites>")
    # the real case table's headers (the CPU run prints them), one memcheck error inside the GEMM forward's cases
    out = run_bench("sanitize_cases.py", "--device", "cpu")
    lines = out.stdout.splitlines()
    first_fwd = next(i for i, ln in enumerate(lines) if " infonce-gemm-fwd " in ln)
    lines.insert(first_fwd + 1, "========= Invalid __global__ read of size 16 bytes")
    (tmp_path / "memcheck_infonce_latent_pool.log").write_text(
        "\n".join(lines) + "\n========= ERROR SUMMARY: 1 error\n")
    # racecheck cut short inside the first case
    (tmp_path / "racecheck_infonce_latent_pool.log").write_text(lines[0] + "\n")
    with open(tmp_path / "gpu_infonce.csv", "w") as f:
        f.write("variant,dtype,B,G,N,d,status,time_ms,peak_mem_mb\n"
                "nvembed-sm90,bfloat16,4096,8,32768,1024,ok,7.2,328\n"
                "nvembed-gemm,bfloat16,4096,8,32768,1024,ok,3.6,400\n"
                "naive,bfloat16,4096,8,32768,1024,ok,3.0,1500\n"
                "nvembed-fused,bfloat16,4096,8,32768,1024,ok,2.4,900\n")
    text, verdicts = gpu_verdict.report(str(tmp_path))
    assert verdicts == {"infonce-gemm-bwd": "incomplete", "infonce-gemm-fwd": "failed", "infonce-fused": "failed",
                        "latent_pool-fused": "incomplete", "latent_pool-saved": "incomplete"}, text
    assert ("- tests: 0 passed, 1 failed, 0 skipped "
            "(first failures: test_matches_reference[inbatch-1-1-32-0-bf16-gemm-fwd])") in text
    assert "- memcheck: 1 error(s) in this path's cases; whole run: ERROR SUMMARY: 1 error" in text
    assert "- racecheck: none of this path's cases ran" in text  # the tile cases come first
    assert "| B=4096 G=8 d=1024 dtype=bfloat16 | 3.6 | nvembed-sm90 | 7.2 | 2.00 | 3.0 | 0.83 | 400.0 | 328.0 |" in text
    assert "- smoke: 1 ok, 1 FAIL (infonce fused bfloat16 B=300 G=4 d=128 +17 inb   grad 0.3)" in text
    # the command line writes the same report
    out = run_bench("gpu_verdict.py", str(tmp_path), "--out", str(tmp_path / "verdict.md"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "verdict.md").read_text().strip() == text.strip()


def test_verdict_reads_the_verbose_log_without_xml(tmp_path):
    """A cuda_tests step killed at its limit writes no JUnit XML: the per-test lines of its -v log (pytest-xdist's
    and plain pytest's forms) give the counts; own-group InfoNCE cases run the tile kernels and count for no path."""
    log = tmp_path / "cuda_tests.log"
    log.write_text(
        "[gw0] [  1%] PASSED tests/test_infonce_cuda.py::test_matches_reference[inbatch-1-1-32-0-bf16-gemm]\n"
        "[gw1] [  2%] FAILED tests/test_infonce_cuda.py::test_matches_reference[inbatch-1-1-32-0-bf16-fused]\n"
        "[gw1] [  3%] PASSED tests/test_infonce_cuda.py::test_matches_reference[owngroup-1-1-32-0-bf16-fused]\n"
        "tests/test_latent_pool_cuda.py::test_x[saved] SKIPPED (no sm90)      [  4%]\n"
        "[gw2] [  5%] ERROR tests/test_latent_pool_cuda.py::test_y[fused]\n"
        "some other line\n")
    counts = gpu_verdict.junit_counts(str(tmp_path / "cuda_tests.xml"), str(log))
    assert counts["infonce-gemm-bwd"]["passed"] == 1
    assert counts["infonce-fused"] == {"passed": 0, "failed": 1, "skipped": 0,
                                       "failures": ["test_matches_reference[inbatch-1-1-32-0-bf16-fused]"]}
    assert counts["latent_pool-saved"]["skipped"] == 1 and counts["latent_pool-fused"]["failed"] == 1


def test_verdict_charges_a_failed_benchmark(tmp_path):
    (tmp_path / "gpu_infonce.csv").write_text(
        "variant,dtype,B,G,N,d,status,time_ms,peak_mem_mb\n"
        "nvembed-sm90,bfloat16,4096,8,32768,1024,ok,7.2,300\n"
        "nvembed-fused,bfloat16,4096,8,32768,1024,failed: RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED,,\n")
    text, verdicts = gpu_verdict.report(str(tmp_path))
    assert verdicts["infonce-fused"] == "failed" and "CUBLAS_STATUS_EXECUTION_FAILED" in text


def test_verdict_unfinished_case_is_matched_by_its_whole_name(tmp_path):
    """A case whose name is the start of a finished case's name ("... B=1" beside "... B=17") is still unfinished
    when its own ok / FAIL line never came (the verdict once searched the joined ok / FAIL lines for the name)."""
    (tmp_path / "smoke.log").write_text(
        "hang? infonce fused bfloat16 B=17 G=4 d=128\n"
        "ok   infonce fused bfloat16 B=17 G=4 d=128                      out=1.0e-03\n"
        "hang? infonce fused bfloat16 B=1\n"
        "hang? infonce fused bfloat16 B=1 G=4\n"
        "ok   infonce fused bfloat16 B=1 G=4                             out=1.0e-03\n")
    counts = gpu_verdict.smoke_counts(str(tmp_path / "smoke.log"))
    assert counts["infonce fused"] == (2, 0, [], ["infonce fused bfloat16 B=1"])
    text, verdicts = gpu_verdict.report(str(tmp_path))
    assert verdicts["infonce-fused"] == "failed" and "unfinished (hang?): infonce fused bfloat16 B=1" in text


def test_verdict_is_not_fooled_by_partial_runs(tmp_path):
    """What a review's synthetic run showed the verdict calling "clean": a failed smoke case of a sub-variant
    ("infonce fused-output ..."), a case started but never finished (its "hang?" line), a smoke step killed at its
    limit and a racecheck never run (steps.txt), a latent_pool row that errored ("unavailable: ...") and one whose
    agreement check failed. Each now counts; "clean" is said to be about correctness only."""
    (tmp_path / "smoke.log").write_text(
        "hang? infonce fused bfloat16 B=300 G=4 d=128 +17 inb\n"
        "ok   infonce fused bfloat16 B=300 G=4 d=128 +17 inb\n"
        "hang? infonce fused-output bfloat16 B=77 G=3 d=73 +5 row blocks 37\n"
        "FAIL infonce fused-output bfloat16 B=77 G=3 d=73 +5 row blocks 37   grad 0.4\n"
        "hang? latent_pool saved bfloat16 B=3 L=37 d=64 N=16 H=2\n"
        "ok   latent_pool fused bfloat16 B=3 L=37 d=64 N=16 H=2\n")
    (tmp_path / "steps.txt").write_text(
        "smoke rc=124 in 90s (limit 90s; log: smoke.log)\ncuda_tests rc=1 in 100s (limit 180s; log: cuda_tests.log)\n"
        "memcheck_infonce_latent_pool rc=0 in 20s (limit 120s; log: x)\nracecheck_infonce_latent_pool not run "
        "(deadline)\ngpu_latent_pool rc=1 in 50s (limit 200s; log: gpu_latent_pool.log)\n")
    (tmp_path / "gpu_latent_pool.csv").write_text(
        "provider,mode,mask,dtype,ms,peak_mb,note\n"
        "nvembed,fwd+bwd,all,bfloat16,70.0,5000,ok\n"
        "nvembed-fused,fwd+bwd,all,bfloat16,,,unavailable: CUDA error: an illegal memory access was encountered\n"
        "nvembed-saved,fwd+bwd,all,bfloat16,60.0,5200,ok\n")
    (tmp_path / "gpu_latent_pool_agreement.csv").write_text(
        "check,provider,status,out_err,grad_err\nsmall-fp32,nvembed-saved,mismatch,0.5,0.7\n"
        "small-fp32,nvembed,ok,1e-6,1e-6\n")
    text, verdicts = gpu_verdict.report(str(tmp_path))
    assert verdicts["infonce-fused"] == "failed" and "infonce fused-output bfloat16" in text
    assert verdicts["latent_pool-saved"] == "failed"  # unfinished smoke case, agreement mismatch
    assert "unfinished (hang?): latent_pool saved bfloat16 B=3 L=37 d=64 N=16 H=2" in text
    assert verdicts["latent_pool-fused"] == "failed" and "illegal memory access" in text
    assert verdicts["infonce-gemm-bwd"] == "incomplete"
    assert "- step smoke: killed (rc=124)" in text and "- step racecheck_infonce_latent_pool: not run (deadline)" in text
    assert "correctness evidence only; speed:" in text
