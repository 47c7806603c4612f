"""pytest-benchmark view of `seer bench kernels` (benchmarks/swav_head.py: same setups, same providers).

    pytest benchmarks/test_bench_swav_head.py --benchmark-only                  # SEER's per-GPU shape, fp32
    SWAV_BENCH_SHAPES=seer,large SWAV_BENCH_DTYPES=bf16xfp32,fp32 \
        pytest benchmarks/test_bench_swav_head.py --benchmark-only

Not part of `make test` (pytest.ini's testpaths is tests/). On a machine without a GPU the "triton" cases are
skipped (the kernels would only run in Triton's CPU interpreter) and the reference runs on CPU: those timings are
CPU timings. GPU calls are synchronized inside the timed function. For the work, % of the roofline, the predicted
H200 time and the JSON record, run `seer bench kernels`.
"""

import os

import pytest
import torch

from benchmarks import swav_head as bench

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SHAPES = os.environ.get("SWAV_BENCH_SHAPES", "seer").split(",")
DTYPES = os.environ.get("SWAV_BENCH_DTYPES", "fp32").split(",")


@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("name", [f"{op}/{mode}" for op, mode in bench.BENCHMARKS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swav_head(benchmark, shape, dtype, name, provider):
    if provider == "triton" and not ON_GPU:
        pytest.skip("no GPU: the Triton kernels only run in Triton's CPU interpreter here, which is no benchmark")
    op, mode = name.split("/")
    if not bench.applicable(op, provider):
        pytest.skip(f"the {provider} provider writes out the whole head and Sinkhorn only")
    if not ON_GPU:
        torch.set_num_threads(1)  # stable CPU numbers
    torch._dynamo.reset()
    fn, grads = bench.setup(op, mode, provider, shape, dtype, DEVICE)

    def run():
        for t in grads:
            t.grad = None
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    run()  # warm-up: Triton's JIT compile, torch.compile
    benchmark.group = f"{shape} {dtype} {name}"
    benchmark.extra_info.update(device=("GPU: " + torch.cuda.get_device_name()) if ON_GPU else "CPU",
                                work=bench.work(op, mode, shape, dtype))
    benchmark.pedantic(run, rounds=50 if ON_GPU else 5, warmup_rounds=2 if ON_GPU else 1)
