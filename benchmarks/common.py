"""What every benchmark shares: the run settings, the base model and experts, results as JSON."""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.shapes import build_model, describe, random_experts, write_adapter
from benchmarks.timing import MIN_ITERS, as_dict
from selfmoe.models.mixse import Expert

console = Console()


@dataclass
class Settings:
    """Sizes and iteration counts; the defaults are the documented GPU run."""

    shape: str = "llama-3-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    experts: int = 4
    rank: int = 8
    top_k: int = 1
    iters: int = MIN_ITERS
    warmup: int = 3
    prefill_batch: int = 2  # E1: 2 x 1024 tokens per forward (the model configs' max_length)
    prefill_len: int = 1024
    train_batch: int = 4  # E2: the router phase's micro batch (4) at max_length 1024
    train_len: int = 1024
    expert_batch: int = 4  # E3: the expert phase's micro batch (4) at max_length 1024
    expert_len: int = 1024
    decode_batches: tuple[int, ...] = (1, 8, 32, 128)
    decode_context: int = 1024
    # E4 also times base and MiXSE compiled (torch.compile, then the CUDA graph): about 1.5 min of
    # compilation per model and batch on an 8B model, hence opt-in.
    decode_compile: bool = False
    decode_iters: int = MIN_ITERS
    xlora_decode_batches: tuple[int, ...] = (1, 8)  # no KV cache: a step is a full forward of the context
    numerics_len: int = 256
    sweep: bool = True
    peers: bool = True
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Context:
    """The base model, its experts and their adapter directories, built once per shape."""

    settings: Settings
    model: torch.nn.Module
    experts: list[Expert]
    adapter_dirs: dict[str, Path]
    workdir: Path
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.settings.device)

    def input_ids(self, batch: int, length: int, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randint(0, self.model.config.vocab_size, (batch, length), generator=gen, device=self.device)


def make_context(settings: Settings, workdir: Path | None = None) -> Context:
    """Build the base model and ``settings.experts`` random experts; write the experts as PEFT adapters."""
    model = build_model(settings.shape, settings.device, settings.torch_dtype, seed=settings.seed)
    experts = random_experts(model, settings.experts, settings.rank, seed=settings.seed + 1)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="selfmoe-bench-"))
    dirs = {e.name: write_adapter(e, workdir / "adapters" / e.name) for e in experts}
    return Context(settings, model, experts, dirs, workdir, facts=describe(model))


def environment() -> dict[str, Any]:
    """GPU, driver and library versions for the report."""
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one benchmark part; a failure is recorded with its traceback instead of ending the run."""
    try:
        return fn()
    except Exception as exc:
        console.print(f"[red]{name} failed: {exc!r}[/red]")
        return {"error": repr(exc), "traceback": traceback.format_exc(limit=8)}
    finally:
        free_memory()


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(as_dict(results), indent=1, default=str))
    tmp.replace(path)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a rich table (floats to 3 significant digits)."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    console.print(t)


def timing_table(title: str, result: dict[str, Any], ratio_column: str) -> None:
    """The variants of a round-robin result: median ms, tokens/s and the ratio to the reference."""
    tokens_per_s, ratios = result["tokens_per_s"], result["ratio_vs_base"]
    rows = [[k, t.median_ms, tokens_per_s[k], ratios[k]] for k, t in result["timings"].items()]
    table(title, ["variant", "median ms", "tokens/s", ratio_column], rows)


def parser(description: str) -> argparse.ArgumentParser:
    """Command-line options shared by every benchmark entry point."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", default=None, help="llama-3-8b (default on a GPU), gemma-7b, cpu-mid, tiny")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--iters", type=int, default=MIN_ITERS)
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (a smoke test, not numbers)")
    p.add_argument("--decode-batches", default=None, help="E4 batch sizes, e.g. 1,8,32,128")
    p.add_argument("--decode-compile", action="store_true", help="E4: also time compiled decode steps (slow to build)")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (X-LoRA, the per-expert loop, PEFT LoRA)")
    return p


def settings_from(args: argparse.Namespace, **overrides: Any) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(device=device, iters=args.iters, **overrides)
    if args.quick:
        s = quick(s)
    apply_cli_args(s, args)
    if args.shape:
        s.shape = args.shape
    if device == "cpu" and s.dtype == "bfloat16" and not args.quick:
        s.dtype = "float32"
    return s


def apply_cli_args(s: Settings, args: argparse.Namespace) -> None:
    if args.decode_batches:
        s.decode_batches = tuple(int(b) for b in args.decode_batches.split(","))
    s.decode_compile = args.decode_compile
    s.peers = s.peers and not args.no_peers


def quick(s: Settings) -> Settings:
    """Small everything: proves the harness runs end to end (CPU tests, a first GPU call)."""
    s.shape, s.iters, s.warmup = "tiny", 2, 1
    s.prefill_batch, s.prefill_len, s.train_batch, s.train_len = 2, 32, 2, 32
    s.expert_batch, s.expert_len, s.numerics_len = 2, 32, 16
    s.decode_batches, s.decode_context, s.decode_iters, s.xlora_decode_batches = (1, 4), 16, 3, (1,)
    if s.device == "cpu":
        s.dtype = "float32"
    return s


def cli_main(
    doc: str, run: Callable[[Context], dict[str, Any]], show: Callable[[dict[str, Any]], None], key: str
) -> None:
    """The command line of one benchmark module: parse, build the context, run, print, save under ``key``."""
    args = parser(doc.splitlines()[0]).parse_args()
    result = run(make_context(settings_from(args)))
    show(result)
    if args.out:
        write_json(args.out, {key: result})
