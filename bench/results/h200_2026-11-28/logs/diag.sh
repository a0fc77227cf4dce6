# one-off (2026-11-28, H100): is the racecheck hazard in cuBLAS's nvjet kernel ours? + timing repeat of issue 6's row
S=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
cat > /tmp/case27.py <<'PY'
import sys, types, torch
sys.path.insert(0, "bench")
import sanitize_cases as sc
from nvembed_ext import reference as R
mode = sys.argv[1]
torch.manual_seed(0)
env, *args = sc.LATENT_POOL_CASES[0]
if mode == "reference":  # the same inputs through the pure-PyTorch reference: cuBLAS and ATen kernels only
    sc.ops = types.SimpleNamespace(latent_pool=R.latent_pool_ref)
    env = {}
print(mode, env, args, flush=True)
with sc.env_vars(env):
    for _ in range(2):
        outs = sc.latent_pool_case("cuda", *args)
        torch.cuda.synchronize()
print("done", [tuple(t.shape) for t in outs[:2]], flush=True)
PY
for mode in reference nvembed; do
  echo "=== racecheck case 27 ($mode)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 $S --tool racecheck --print-limit 10 python3 /tmp/case27.py $mode 2>&1 | tail -12
done
echo "=== racecheck case 27 (nvembed, nvjet kernels excluded)"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 $S --tool racecheck --kernel-name-exclude kns=nvjet python3 /tmp/case27.py nvembed 2>&1 | tail -5
mkdir -p /tmp/gpu_check_logs/repeat; echo "=== InfoNCE timing repeat"
python3 bench/gpu_infonce.py --out /tmp/gpu_check_logs/repeat --d 4096 --B 4096,16384 --rounds 6 --max-seconds 4 \
  --variants nvembed-fused,naive 2>&1 | tail -8
