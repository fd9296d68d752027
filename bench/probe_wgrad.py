import torch, triton.testing as tt
from fused_tp import kernels
from fused_tp.kernels.configs import KernelConfig, pin_config
torch.manual_seed(0)
for M, K, N in [(8192, 8192, 14336), (4096, 4096, 7168)]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16); gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    base = tt.do_bench(lambda: gy.t() @ x, return_mode="median")
    xt = x.t().contiguous().t()  # column-major x
    gyc = gy.t().contiguous()    # grad_y^T stored row-major: A K-major
    for cfg in [KernelConfig(64, 256, 64, num_warps=4, num_stages=4), KernelConfig(128, 256, 64, num_warps=8, num_stages=3), KernelConfig(128, 128, 64, num_warps=8, num_stages=4)]:
        with pin_config(cfg):
            r = {}
            r["rowsum"] = tt.do_bench(lambda: kernels.grad_params(gy, x), return_mode="median")
            r["no_rowsum"] = tt.do_bench(lambda: kernels.grad_params(gy, x, bias=False), return_mode="median")
            r["A K-major"] = tt.do_bench(lambda: kernels._matmul(gyc, x), return_mode="median") if hasattr(kernels, "_matmul") else None
            from fused_tp.kernels.matmul import _matmul
            r["A K-major"] = tt.do_bench(lambda: _matmul(gyc, x), return_mode="median")
            r["A K-major B K-major"] = tt.do_bench(lambda: _matmul(gyc, xt), return_mode="median")
        print(M, K, N, cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_warps, " ".join(f"{k}: {base / v:.3f}" for k, v in r.items()), flush=True)
