"""Throughput harness for MiXSE on real-shaped models with random weights (issue 5, DESIGN §9).

Every benchmark builds its models from a config (Llama-3-8B, Gemma-7B, or small CPU shapes),
times with CUDA events (warm-up, then the median of at least 20 iterations) and measures every
ratio inside one run. ``python -m benchmarks`` runs them all and writes one JSON file;
``python -m benchmarks.e1_prefill`` (e2_router, e3_expert, e4_decode, e5_selfgen, kernels, cpu) runs one.
Results and the commands that made them are recorded in docs/performance.md.

Imports only ``selfmoe.models`` and ``selfmoe.data.generation`` (no omegaconf, no Lightning), so
it runs on a bare GPU machine with torch, transformers and peft.
"""
