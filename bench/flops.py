"""Model FLOPs utilization (MFU) for `duet bench`: the useful model FLOPs of a run ÷ its wall time ÷ a peak: on
a GPU its dense bf16 peak; on the CPU the matrix-product speed the bench measures itself (a large GEMM in the
variant's dtype, float32 or bfloat16, on the thread count it ran on), so "close to the limit" means close to what
this machine's BLAS does in that precision.

Useful FLOPs, the same for every tool (they train the same pairs in the same order, so the work is set by the
data, not by how a tool does it): per token of every chosen and rejected sequence (prompt + reply), 6·N, where
N counts the weights of every linear layer (the LM head once, tied or not; embedding look-ups are no matmuls):
2·N for the policy's forward pass, 2·N for its backward pass to the activations (the frozen base gets no weight
gradient under LoRA; the LoRA matrices' own are negligible), 2·N for the reference model's forward pass. Plus
attention scores and their weighted sums, 12·L·(heads·head_dim)·T per token of a T-token sequence (PaLM's
formula, causal masking not halved). Tokens are counted with Duet's tokenization of the workload's pairs.
"""

from __future__ import annotations

from bench.workloads import Workload

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s. NVIDIA's H100 and H200 SXM datasheets give 1,979 TFLOP/s
# for bf16 "with sparsity"; dense is half, 989.5. The H200 has the H100's compute (it differs in memory).
BF16_PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5}


def peak_tflops(gpu_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU that torch names ``gpu_name`` (None when not in the table)."""
    if not gpu_name:
        return None
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in gpu_name.upper()), None)


def sequence_lengths(workload: Workload, steps: int, pairs: int | None) -> list[int]:
    """The lengths of every chosen and rejected sequence a run of ``steps`` steps trains, in Duet's
    tokenization (the batches cycle over the workload's first pairs, as bench.worker does)."""
    from bench import worker
    from core.models_io import load_tokenizer
    from core.tokenization import ChatTokenizer, tokenize_pairs

    worker.PAIRS = pairs
    chat = ChatTokenizer(load_tokenizer(str(worker.model_folder(workload))))
    tokenized, _ = tokenize_pairs(
        worker.workload_pairs(workload),
        chat,
        max_length=workload.max_length,
        max_prompt_length=workload.max_prompt_length,
    )
    size = workload.batch_pairs
    batches = [tokenized[i : i + size] for i in range(0, len(tokenized), size)]
    lengths = []
    for step in range(steps):
        for pair in batches[step % len(batches)]:
            lengths += [len(pair.prompt_ids) + len(pair.chosen_ids), len(pair.prompt_ids) + len(pair.rejected_ids)]
    return lengths


def model_shape(workload: Workload) -> tuple[int, int, int]:
    """(N: weights in linear layers, layers, attention width heads·head_dim), from a meta-device copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench import worker

    config = AutoConfig.from_pretrained(worker.model_folder(workload))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return linear, config.num_hidden_layers, config.num_attention_heads * head_dim


def run_flops(workload: Workload, steps: int, pairs: int | None) -> float:
    """The useful model FLOPs of a run of ``steps`` steps (the module's docstring says what counts)."""
    weights, layers, width = model_shape(workload)
    return float(sum(6 * weights * t + 12 * layers * width * t * t for t in sequence_lengths(workload, steps, pairs)))


def measured_gemm_tflops(threads: int, dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """This machine's matrix-product speed in ``dtype`` on ``threads`` threads: the best of ``repeats`` products
    of two ``size``² matrices (2·size³ FLOPs each), after one to warm up."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn((size, size), generator=generator).to(getattr(torch, dtype))
        b = torch.randn((size, size), generator=generator).to(getattr(torch, dtype))
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best / 1e12


def add_cpu_mfu(rows: list[dict], flops: float) -> None:
    """MFU of CPU rows against the measured GEMM speed in each row's own dtype and thread count (a bf16 row
    against bf16 products: on a CPU with AMX they run several times faster than fp32's)."""
    peaks: dict[tuple[int, str], float] = {}
    for row in rows:
        threads = row.get("threads")
        if "error" in row or not threads:
            continue
        dtype = "bfloat16" if row.get("dtype") == "bfloat16" else "float32"
        if (threads, dtype) not in peaks:
            peaks[threads, dtype] = measured_gemm_tflops(int(threads), dtype)
        add_mfu([row], flops, peaks[threads, dtype])
        short = "bf16" if dtype == "bfloat16" else "fp32"
        row["peak_source"] = f"measured {short} GEMM, {threads} thread{'s' if threads != 1 else ''}"


def add_mfu(rows: list[dict], flops: float, peak: float | None) -> None:
    """Give every measured row its ``mfu`` (a fraction of ``peak`` TFLOP/s, over the run's total wall time)."""
    for row in rows:
        if "error" in row:
            continue
        row["model_flops"] = flops
        own = peak or peak_tflops(row.get("gpu"))
        row["peak_tflops"] = own
        row["mfu"] = flops / row["total_seconds"] / (own * 1e12) if own else None
        # a training step is the policy's forward and backward: two thirds of the useful FLOPs (the reference
        # pass is the other third), over the median step's time
        steps = row.get("steps") or 0
        per_step = flops * 2 / 3 / steps if steps else None
        row["step_mfu"] = per_step / row["seconds_per_step"] / (own * 1e12) if own and per_step else None
