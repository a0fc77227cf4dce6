"""What one bench/gpu_check.sh run says about each CUDA path that a GPU run had to verify: `python
bench/gpu_verdict.py LOGS` (the run's log folder, i.e. $OUT/logs.tgz unpacked) prints a markdown report.

For each such path (the flags in csrc: kInfonceGemmBwdVerified, kInfonceGemmFwdVerified, kInfonceFusedGradVerified,
kLatentPoolFusedVerified, kLatentPoolSavedVerified; all set true after the H100 run of 2026-11-28, so a run now is
a regression check of paths auto may take, and a flag added as false joins this list) it gathers, from the files the
run wrote:
- smoke (smoke.log): its cases, ok / FAIL;
- tests (cuda_tests.xml, pytest's JUnit report): the test cases of that path (by parameter id or test name), passed
  / failed / errors / skipped;
- compute-sanitizer (memcheck_infonce_latent_pool.log, racecheck_...): errors reported under the headers of that
  path's cases (bench/sanitize_cases.py prints one before each case and synchronizes after it); an unfinished log
  is charged to the case that was running; a racecheck hazard whose two accesses both lie in a cuBLAS kernel
  (nvjet_*, sm*_xmma_*, cublas*) is listed apart and charged to no path (on 2026-11-28 one in
  nvjet_sm90_tst_64x8_64x16_1x4_h_bz_NNT came as well from the pure-PyTorch reference: not ours to fix);
- speed: per shape, the path's time against the path `auto` ran before these were verified (InfoNCE: nvembed-sm90
  on Hopper, else nvembed; latent_pool: nvembed) and, for InfoNCE, the naive loss (gpu_infonce.csv,
  gpu_latent_pool.csv).
and says whether the correctness evidence is complete and clean (a step of gpu_check.sh killed at its limit or
skipped by the deadline, per steps.txt, leaves its evidence incomplete; a smoke case started but never finished is a
failure), with the speed beside it: "clean" says nothing about speed. Flipping a flag stays a decision made by
reading the numbers: this only collects them, and a path with missing evidence is reported as such, never as
passed.
"""
import argparse
import csv
import os
import re
import sys
import xml.etree.ElementTree as ET

# name (also the sanitizer cases' label), csrc flag, smoke-name prefix, benchmark (csv, our variant's name there)
# A smoke case belongs to a path when its name starts with the prefix followed by a space or "-" (gpu_smoke's
# "infonce fused-output ..." cases are the fused path's too).
PATHS = [
    ("infonce-gemm-bwd", "kInfonceGemmBwdVerified", "infonce gemm-bwd", ("gpu_infonce.csv", "nvembed-gemm")),
    ("infonce-gemm-fwd", "kInfonceGemmFwdVerified", "infonce gemm-fwd", ("gpu_infonce.csv", "nvembed-gemm-fwd")),
    ("infonce-fused", "kInfonceFusedGradVerified", "infonce fused", ("gpu_infonce.csv", "nvembed-fused")),
    ("latent_pool-fused", "kLatentPoolFusedVerified", "latent_pool fused", ("gpu_latent_pool.csv", "nvembed-fused")),
    ("latent_pool-saved", "kLatentPoolSavedVerified", "latent_pool saved", ("gpu_latent_pool.csv", "nvembed-saved")),
]

# gpu_check.sh's steps whose evidence each kind of check needs (steps.txt: "NAME rc=N in ..." or "NAME not run")
STEPS = {"smoke": ("smoke",), "tests": ("cuda_tests",), "memcheck": ("memcheck_infonce_latent_pool",),
         "racecheck": ("racecheck_infonce_latent_pool",)}
BENCH_STEP = {"gpu_infonce.csv": "gpu_infonce", "gpu_latent_pool.csv": "gpu_latent_pool"}


def test_path(classname: str, name: str):
    """The unverified path a test case belongs to (None: another path or none)."""
    base, _, params = name.partition("[")
    tokens = params.rstrip("]").split("-") if params else []
    if "test_infonce_cuda" in classname:
        if "owngroup" in tokens or "False" in tokens:
            return None  # in_batch_negatives=False: the launcher runs the tile kernels whatever the path
        if base == "test_gemm_bwd_chunks":
            return "infonce-gemm-bwd"
        if base == "test_gemm_fwd_chunks":
            return "infonce-gemm-fwd"
        if base in ("test_fused_row_blocks", "test_fused_in_place_passes"):
            return "infonce-fused"
        for i, tok in enumerate(tokens):
            if tok == "gemm":
                return "infonce-gemm-fwd" if i + 1 < len(tokens) and tokens[i + 1] == "fwd" else "infonce-gemm-bwd"
            if tok == "fused":
                return "infonce-fused"
    if "test_latent_pool_cuda" in classname and "saved" in tokens:
        return "latent_pool-saved"
    if "test_latent_pool_cuda" in classname and "fused" in tokens:
        return "latent_pool-fused"
    return None


def _outcomes_from_xml(path: str):
    """(classname, name, outcome) per test case of a JUnit XML report; outcome passed / failed / skipped."""
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        yield case.get("classname", ""), case.get("name", ""), outcome


# pytest -v lines, with pytest-xdist ("[gw3] [ 12%] PASSED tests/x.py::test_y[p]") or without ("tests/x.py::test_y[p]
# PASSED [ 12%]")
_VERBOSE = re.compile(r"(?:\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+\.py::\S+))"
                      r"|(?:^(\S+\.py::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)")


def _outcomes_from_log(path: str):
    """The same from a pytest -v log, for a run that ended before writing its XML (killed at the step's limit)."""
    with open(path, errors="replace") as f:
        for line in f:
            m = _VERBOSE.search(line.strip())
            if not m:
                continue
            word, test_id = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            module, name = test_id.split("::", 1)
            outcome = {"PASSED": "passed", "XPASS": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}.get(
                word, "failed")
            yield module.replace("/", ".").removesuffix(".py"), name, outcome


def junit_counts(path: str, log: str = "") -> dict:
    """{path: {"passed", "failed", "skipped", "failures": [names]}} from a JUnit XML report, or, where there is none,
    from the pytest -v log `log` (a case reported twice counts once, with its last outcome)."""
    out = {}
    if os.path.exists(path):
        cases = list(_outcomes_from_xml(path))
    elif log and os.path.exists(log):
        cases = list({(c, n): (c, n, o) for c, n, o in _outcomes_from_log(log)}.values())
    else:
        return out
    for classname, name, outcome in cases:
        which = test_path(classname, name)
        if which is None:
            continue
        c = out.setdefault(which, {"passed": 0, "failed": 0, "skipped": 0, "failures": []})
        c[outcome] += 1
        if outcome == "failed":
            c["failures"].append(name)
    return out


def _case_of(text: str, prefix: str) -> bool:
    return text.startswith(prefix) and text[len(prefix):len(prefix) + 1] in (" ", "-")


def smoke_counts(path: str) -> dict:
    """{smoke-name prefix: (ok, FAIL, [failed names], [unfinished names])} over every line of smoke.log; a case is
    unfinished when its "hang? NAME" line (gpu_smoke.py prints it before the case runs, and the case's ok / FAIL line
    after it, one case at a time) is followed by the next "hang?" line or the end of the log, not by its own ok / FAIL
    line (matched by the whole name: "B=1" is not finished by "B=17")."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    ok = [ln[4:].strip() for ln in lines if ln.startswith("ok")]
    bad = [ln[4:].strip() for ln in lines if ln.startswith("FAIL")]
    unfinished, running = [], None
    for ln in lines:
        if ln.startswith("hang? "):
            if running is not None:
                unfinished.append(running)
            running = ln[len("hang? "):].strip()
        elif ln.startswith(("ok", "FAIL")) and running is not None:
            text = ln[4:].strip()
            if text.startswith(running) and text[len(running):len(running) + 1] in ("", " "):
                running = None
    if running is not None:
        unfinished.append(running)
    for _, _, prefix, _ in PATHS:
        failed = [text[:90] for text in bad if _case_of(text, prefix)]
        out[prefix] = (sum(_case_of(text, prefix) for text in ok), len(failed), failed,
                       [name for name in unfinished if _case_of(name, prefix)])
    return out


def step_status(path: str) -> dict:
    """{step: rc (int) or "not run"} from gpu_check.sh's steps.txt; {} where there is none."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"(\S+) rc=(\d+)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
            elif re.match(r"\S+ not run", line):
                out[line.split()[0]] = "not run"
    return out


# cuBLAS's kernels (never ours: ours are in namespace nvembed, or CUTLASS templates, which these do not match)
LIBRARY_KERNEL = re.compile(r"(void )?(nvjet_|sm\d+_xmma_|cublas)")


def _library_race(line: str, following: str):
    """The kernel name where a racecheck report ("Race reported between <access> at K1+0x.." and, on the next
    line, "and <access> at K2+0x..") has both accesses in one cuBLAS kernel; None otherwise."""
    first = re.search(r"Race reported between .*? access at (.+?)\+0x[0-9a-fA-F]+", line)
    second = re.search(r"and .*? access at (.+?)\+0x[0-9a-fA-F]+", following)
    if not (first and second):
        return None
    k1, k2 = first.group(1).strip(), second.group(1).strip()
    return k1 if k1 == k2 and "nvembed" not in k1 and LIBRARY_KERNEL.match(k1) else None


def sanitizer_errors(path: str) -> dict:
    """{label: errors} from a compute-sanitizer log of bench/sanitize_cases.py, plus "_complete": whether the cases
    finished, "_summary": the tool's summary line and "_library": ["label: kernel"] per racecheck hazard inside a
    cuBLAS kernel (not counted as an error of the case). Absent file: {}."""
    if not os.path.exists(path):
        return {}
    out = {"_complete": False, "_summary": "", "_library": []}
    label = "before the first case"
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        m = re.match(r"case \d+ \S+ (\S+) ", line)
        if m:
            label = m.group(1)
            out.setdefault(label, 0)
        elif line.startswith("sanitizer cases done"):
            out["_complete"] = True
        elif re.match(r"=+ (ERROR|RACECHECK) SUMMARY", line):
            out["_summary"] = line.strip("= \n")
        elif re.match(r"=+ (Invalid|Error|Race|Uninitialized|Program hit|Warning)", line.lstrip()):
            library = _library_race(line, lines[i + 1] if i + 1 < len(lines) else "")
            if library:
                out["_library"].append(f"{label}: {library}")
            else:
                out[label] = out.get(label, 0) + 1
    if not out["_complete"]:
        out[label] = out.get(label, 0) + 1  # the case that was running when the log ended
    return out


def flag_states(root: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")) -> dict:
    """{flag: bool} for every `constexpr bool k...Verified = true|false;` in csrc's headers."""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, "csrc")):
        for fname in files:
            if fname.endswith((".h", ".cuh")):
                with open(os.path.join(folder, fname), errors="replace") as f:
                    for flag, value in re.findall(r"constexpr bool (k\w+Verified) = (true|false);", f.read()):
                        out[flag] = value == "true"
    return out


def read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(row, col):
    """row[col] as a float; None where the row or the value is missing or not a number."""
    try:
        return float(row[col]) if row is not None and row.get(col) not in (None, "") else None
    except ValueError:
        return None


def speed_rows(logs: str, csv_name: str, variant: str) -> list:
    """[(shape, ms, baseline name, baseline ms, naive ms or None, peak MiB, baseline peak MiB)] per shape."""
    rows = read_csv(os.path.join(logs, csv_name))
    if csv_name == "gpu_infonce.csv":
        column, key = "variant", ("B", "G", "d", "dtype")
        baselines = ("nvembed-sm90", "nvembed")
        time_col, mem_col = "time_ms", "peak_mem_mb"
        ok = [r for r in rows if r.get("status") == "ok"]
    else:
        column, key = "provider", ("mode", "mask", "dtype")
        baselines = ("nvembed",)
        time_col, mem_col = "ms", "peak_mb"
        ok = [r for r in rows if r.get(time_col) and r.get("provider") not in (None, "torch.matmul")]
    shapes = {}
    for r in ok:
        shapes.setdefault(tuple(r.get(k, "") for k in key), {})[r[column]] = r
    out = []
    for shape, by in shapes.items():
        if variant not in by:
            continue
        base_name = next((b for b in baselines if b in by), None)
        base = by.get(base_name) if base_name else None
        naive = by.get("naive")
        out.append((" ".join(f"{k}={v}" for k, v in zip(key, shape)), _num(by[variant], time_col), base_name,
                    _num(base, time_col), _num(naive, time_col), _num(by[variant], mem_col), _num(base, mem_col)))
    return out


def report(logs: str) -> tuple:
    """(markdown text, {path: "clean" | "failed" | "incomplete"})."""
    tests = junit_counts(os.path.join(logs, "cuda_tests.xml"), os.path.join(logs, "cuda_tests.log"))
    smoke = smoke_counts(os.path.join(logs, "smoke.log"))
    steps = step_status(os.path.join(logs, "steps.txt"))
    agreement = read_csv(os.path.join(logs, "gpu_latent_pool_agreement.csv"))
    sanitizers = {tool: sanitizer_errors(os.path.join(logs, f"{tool}_infonce_latent_pool.log"))
                  for tool in ("memcheck", "racecheck")}
    lines = [f"# CUDA paths verified on a GPU run, checked in {os.path.abspath(logs)}", ""]
    env = os.path.join(logs, "env.txt")
    if os.path.exists(env):
        with open(env, errors="replace") as f:
            lines += ["```", f.read().strip(), "```", ""]
    verdicts = {}
    flags = flag_states()
    for name, flag, prefix, (csv_name, variant) in PATHS:
        problems, missing = [], []
        state = flags.get(flag)
        lines.append(f"## {name} (`{flag}`" + ("" if state is None else f" = {'true' if state else 'false'}") + ")")
        s_ok, s_bad, s_failed, s_unfinished = smoke.get(prefix, (0, 0, [], []))
        lines.append(f"- smoke: {s_ok} ok, {s_bad} FAIL" + (f" ({'; '.join(s_failed)})" if s_failed else "")
                     + (f", unfinished (hang?): {'; '.join(s_unfinished)}" if s_unfinished else ""))
        if s_bad or s_unfinished:
            problems.append("smoke")
        elif not s_ok:
            missing.append("smoke")
        # a step killed at its limit or never run leaves its evidence partial, whatever the logs show so far
        for check, names in STEPS.items():
            for step in names:
                rc = steps.get(step)
                if rc == "not run" or rc in (124, 137):
                    lines.append(f"- step {step}: {'not run (deadline)' if rc == 'not run' else f'killed (rc={rc})'}")
                    if check not in missing:
                        missing.append(check)
        t = tests.get(name)
        if t is None:
            lines.append("- tests: none found in cuda_tests.xml / cuda_tests.log")
            missing.append("tests")
        else:
            lines.append(f"- tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                         + (f" (first failures: {', '.join(t['failures'][:5])})" if t["failures"] else ""))
            if t["failed"]:
                problems.append("tests")
            elif not t["passed"]:
                missing.append("tests")
        for tool, found in sanitizers.items():
            if not found:
                lines.append(f"- {tool}: no log")
                if tool not in missing:
                    missing.append(tool)
                continue
            if name not in found:
                lines.append(f"- {tool}: none of this path's cases ran ({found.get('_summary', '')})")
                missing.append(tool)
                continue
            library = [k.split(": ", 1)[1] for k in found.get("_library", []) if k.split(": ", 1)[0] == name]
            lines.append(f"- {tool}: {found[name]} error(s) in this path's cases"
                         + ("" if found["_complete"] else " (the cases did not finish)")
                         + (f"; not counted: {len(library)} hazard(s) inside cuBLAS "
                            f"({', '.join(sorted(set(library)))})" if library else "")
                         + (f"; whole run: {found['_summary']}" if found.get("_summary") else ""))
            if found[name]:
                problems.append(tool)
        speed = speed_rows(logs, csv_name, variant)
        # gpu_infonce: status "failed: ..."; gpu_latent_pool: note "unavailable: ..." (an error) or "skipped:
        # disagrees with eager ..." (its agreement check failed), and the agreement CSV's "mismatch" rows
        crashed = [str(r.get("status", "")) for r in read_csv(os.path.join(logs, csv_name))
                   if r.get("variant", r.get("provider")) == variant and str(r.get("status", "")).startswith("failed")]
        crashed += [n for r in read_csv(os.path.join(logs, csv_name)) if r.get("provider") == variant
                    for n in str(r.get("note", "")).split("; ") if n.startswith(("unavailable", "skipped: disagrees"))]
        crashed += [f"agreement {r.get('check')}: {r.get('status')} (out {r.get('out_err')}, grads {r.get('grad_err')})"
                    for r in agreement if csv_name == "gpu_latent_pool.csv" and r.get("provider") == variant
                    and r.get("status") not in ("ok", "baseline")]
        if crashed:
            lines.append(f"- benchmark: failed on {len(crashed)} row(s): {crashed[0][:200]}")
            problems.append("benchmark")
        bench_rc = steps.get(BENCH_STEP[csv_name])
        if bench_rc == "not run" or bench_rc in (124, 137):
            lines.append(f"- step {BENCH_STEP[csv_name]}: {'not run' if bench_rc == 'not run' else f'killed (rc={bench_rc})'}")
            missing.append("speed")
        if not speed:
            lines.append(f"- speed: no `{variant}` rows in {csv_name}")
            missing.append("speed")
        else:
            lines += ["", f"| shape | {variant} ms | baseline | baseline ms | × baseline | naive ms | × naive "
                          "| peak MiB | baseline peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
            faster = 0
            for shape, ms, base_name, base_ms, naive_ms, mem, base_mem in speed:
                ratio = base_ms / ms if ms and base_ms else None
                faster += bool(ratio and ratio > 1)
                lines.append(f"| {shape} | {ms if ms is not None else ''} | {base_name or ''} | "
                             f"{base_ms if base_ms is not None else ''} | {f'{ratio:.2f}' if ratio else ''} | "
                             f"{naive_ms if naive_ms is not None else ''} | "
                             f"{f'{naive_ms / ms:.2f}' if naive_ms and ms else ''} | "
                             f"{mem if mem is not None else ''} | {base_mem if base_mem is not None else ''} |")
            timed = sum(1 for _, ms, _, base_ms, *_ in speed if ms and base_ms)
            lines += ["", f"- speed: faster than the baseline on {faster} of {timed} timed shapes"]
            speed_word = ("faster on every timed shape" if timed and faster == timed else
                          "slower on every timed shape" if timed and not faster else
                          f"faster on {faster} of {timed} shapes" if timed else "not timed against the baseline")
        verdict = "failed" if problems else "incomplete" if missing else "clean"
        verdicts[name] = verdict
        lines.append(f"- **verdict: {verdict}**" + (f" ({', '.join(problems)})" if problems else "")
                     + (f" (missing: {', '.join(dict.fromkeys(missing))})" if missing and not problems else "")
                     + " — correctness evidence only; speed: "
                     + (speed_word if speed else "no rows"))
        lines.append("")
    return "\n".join(lines), verdicts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", help="the gpu_check.sh log folder ($OUT/logs.tgz unpacked)")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.logs):
        parser.error(f"{args.logs} is not a folder")
    text, _ = report(args.logs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
