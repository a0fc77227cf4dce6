"""One-off (2026-11-28): with every NVEMBED_* choice unset, which kernels do infonce / latent_pool run on CUDA, and
latent_pool's time at NV-Embed-v2 size under auto against the ATen stages."""
import os
import torch
import nvembed_ext  # noqa: F401
from torch.profiler import profile, ProfilerActivity

for k in [k for k in os.environ if k.startswith("NVEMBED_") and k != "NVEMBED_COMMIT"]:
    del os.environ[k]
print("env NVEMBED_*:", {k: v for k, v in os.environ.items() if k.startswith("NVEMBED_")}, flush=True)


def kernels(fn):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name.split("(")[0][:100] for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA})


torch.manual_seed(0)
q = (torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
d = (torch.randn(4096 * 8, 1024, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
def nce():
    torch.ops.nvembed.infonce(q, d, 8, 0.05, True).backward()
print("infonce auto, bf16 fwd+bwd:", [n for n in kernels(nce) if "nvjet" not in n and "elementwise" not in n])
def nce_fwd():
    with torch.no_grad():
        torch.ops.nvembed.infonce(q, d, 8, 0.05, True)
print("infonce auto, bf16 forward only:", kernels(nce_fwd))

B, L, dm, N, H, dh, F = 32, 512, 4096, 512, 8, 4096, 16384
def p(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale).requires_grad_()
x = p(B, L, dm)
mask = torch.ones(B, L, device="cuda", dtype=torch.int64)
inner = H * dh
w = [p(N, dm), p(dm), p(dm), p(dm), p(dm), p(inner, dm, scale=dm ** -0.5), p(2 * inner, dm, scale=dm ** -0.5),
     p(dm, inner, scale=inner ** -0.5), p(dm), p(dm), p(2 * F, dm, scale=dm ** -0.5), p(2 * F),
     p(dm, F, scale=F ** -0.5), p(dm)]
def pool():
    torch.ops.nvembed.latent_pool(x, mask, *w, H, True, 1e-5).square().sum().backward()
print("latent_pool auto kernels (nvembed):", [n for n in kernels(pool) if "nvembed" in n])
for label, env in (("auto", {}), ("aten", {"NVEMBED_LATENT_POOL_KERNELS": "aten"})):
    os.environ.update(env)
    times = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); pool(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    for k in env:
        del os.environ[k]
    print(f"latent_pool v2 size fwd+bwd {label}: median of last 5 {sorted(times[1:])[2]:.2f} ms", flush=True)
