"""Routing statistics of MiXSE during training and validation, and per-token routing views.

What the router does is the paper's main analysis (PAPER.md §2, "routing analysis"): which
expert each domain's tokens go to, how load is spread over experts and layers, how sure the
router is. :class:`RoutingStatsCallback` measures this from the records MiXSE keeps when
``mixse.record`` is True (per decoder layer: softmax ``probs`` and applied ``gates``, both
``(B, T, N)``), ignoring padding:

- expert load per layer ``(L, N)``: each layer's gate mass over real tokens, normalised over
  experts; ``load`` is its mean over layers;
- the domain matrix ``(D, N)``: per layer, the gate mass of each data domain's tokens normalised
  over experts (rows sum to 1), then averaged over layers; a domain without tokens is NaN;
- routing entropy: mean over real tokens and layers of ``-sum p log p`` of the probs (nats).

Per batch only sums are added into device tensors (no ``.item()``/``.cpu()``, so no host sync in
the training loop); at epoch end the sums are all-reduced across ranks (one collective) and
normalised. Metric names (the stage is in the name, so the design's required names stay free
of a prefix for validation, the split that is compared across runs):

- validation: ``router/entropy``, ``router/load/<expert>``
- training:   ``router/train_entropy``, ``router/train_load/<expert>``

At fit end rank zero writes ``routing.json`` and two heatmaps into ``out_dir``.
:class:`TokenRoutingCallback` renders fixed prompts token by token after validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from selfmoe.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from selfmoe.plots import heatmap_png, token_routing_html, token_routing_png

log = logging.getLogger(__name__)

STAGES = ("train", "val")
# Metric names per stage: (entropy, load prefix). Validation keeps the design's names.
METRIC_NAMES = {"val": ("router/entropy", "router/load/"), "train": ("router/train_entropy", "router/train_load/")}
SUM_KEYS = ("layer_gate", "domain_gate", "entropy", "tokens", "domain_tokens")


class RoutingRecordLike(Protocol):
    """What MiXSE records per decoder layer (float32, detached, possibly on GPU)."""

    probs: torch.Tensor  # (B, T, N) softmax router probabilities
    gates: torch.Tensor  # (B, T, N) gates applied: top-k of probs, zeros elsewhere


# ---------------------------------------------------------------------------------------------
# pure statistics
# ---------------------------------------------------------------------------------------------


def routing_summary(
    records: Sequence[RoutingRecordLike],
    attention_mask: torch.Tensor | None,
    domain: torch.Tensor | None,
    num_domains: int,
) -> dict[str, torch.Tensor]:
    """Per-batch sums of routing statistics, on the records' device, in float32.

    Returns ``layer_gate (L, N)`` gate mass per layer and expert, ``domain_gate (L, D, N)`` the
    same split by data domain, ``entropy ()`` entropy of the probs summed over real tokens and
    layers, ``tokens ()`` real tokens, ``domain_tokens (D,)`` real tokens per domain. Padding
    (``attention_mask == 0``) contributes nothing; ``domain=None`` (or an index outside
    ``[0, num_domains)``) counts the tokens in no domain. Sums add up across batches and ranks;
    :func:`finalize` turns them into shares.
    """
    probs = torch.stack([r.probs for r in records]).float()  # (L, B, T, N)
    gates = torch.stack([r.gates for r in records]).float()  # (L, B, T, N)
    _, b, t, _ = gates.shape
    device = gates.device
    mask = torch.ones(b, t, device=device) if attention_mask is None else attention_mask.to(device, torch.float32)
    if mask.shape != (b, t):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the records are (B, T) = {(b, t)}")
    if domain is None:
        onehot = torch.zeros(b, num_domains, device=device)
    else:
        # A comparison instead of F.one_hot: one_hot validates the indices, which syncs on CUDA.
        onehot = (domain.to(device)[:, None] == torch.arange(num_domains, device=device)).float()  # (B, D)
    masked = gates * mask[None, :, :, None]  # (L, B, T, N)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (L, B, T); 0 log 0 = 0
    per_seq = mask.sum(1)  # (B,)
    return {
        "layer_gate": masked.sum((1, 2)),
        "domain_gate": torch.einsum("lbtn,bd->ldn", masked, onehot),
        "entropy": (entropy * mask).sum(),
        "tokens": per_seq.sum(),
        "domain_tokens": onehot.T @ per_seq,
    }


def _shares(x: torch.Tensor) -> torch.Tensor:
    """Normalise the last dim to sum 1; an all-zero row becomes NaN (no data, not "no load")."""
    return x / x.sum(-1, keepdim=True)


def finalize(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn (accumulated, reduced) sums from :func:`routing_summary` into the normalised stats.

    Returns ``layer_load (L, N)`` (rows sum to 1), ``load (N,)`` its mean over layers,
    ``domain_matrix (D, N)`` (rows sum to 1; NaN for a domain without tokens), ``entropy ()`` in
    nats per token and layer (NaN without tokens), ``tokens ()`` and ``domain_tokens (D,)``.
    """
    num_layers = sums["layer_gate"].shape[0]
    layer_load = _shares(sums["layer_gate"])
    # Normalise per layer, then average: every layer has an equal say, whatever its gate mass.
    # nanmean: a layer that gave a domain's tokens no gate mass at all has no opinion.
    domain_matrix = torch.nanmean(_shares(sums["domain_gate"]), dim=0)
    return {
        "layer_load": layer_load,
        "load": layer_load.mean(0),
        "domain_matrix": domain_matrix,
        "entropy": sums["entropy"] / (sums["tokens"] * num_layers),
        "tokens": sums["tokens"],
        "domain_tokens": sums["domain_tokens"],
    }


def stats_to_json(stats: Mapping[str, torch.Tensor], experts: Sequence[str], domains: Sequence[str]) -> dict[str, Any]:
    """Finalised stats as JSON-ready lists (NaN -> None, counts -> int)."""

    def plain(x: torch.Tensor) -> Any:
        values = x.detach().cpu().double().tolist()
        return _nan_to_none(values)

    return {
        "experts": list(experts),
        "domains": list(domains),
        "num_layers": int(stats["layer_load"].shape[0]),
        "layer_load": plain(stats["layer_load"]),
        "load": plain(stats["load"]),
        "domain_matrix": plain(stats["domain_matrix"]),
        "entropy": plain(stats["entropy"]),
        "tokens": round(float(stats["tokens"])),
        "domain_tokens": [round(v) for v in stats["domain_tokens"].double().tolist()],
    }


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps token counts exact (2^53) and sums over millions of tokens precise;
    # MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


# ---------------------------------------------------------------------------------------------
# the statistics callback
# ---------------------------------------------------------------------------------------------


class _RecordSwitch:
    """Turns ``mixse.record`` on for the outermost of nested fit/validation scopes and restores it."""

    def __init__(self) -> None:
        self.depth = 0
        self.previous: bool | None = None

    def enter(self, mixse: Any) -> None:
        if self.depth == 0:
            self.previous = bool(mixse.record)
            mixse.record = True
        self.depth += 1

    def exit(self, mixse: Any, force: bool = False) -> None:
        if self.depth == 0:
            return
        self.depth = 0 if force else self.depth - 1
        if self.depth == 0:
            mixse.record = self.previous


class RoutingStatsCallback(Callback):
    """Accumulate, log and save MiXSE routing statistics (see the module docstring).

    Args:
        out_dir: where ``routing.json``, ``routing_domain_matrix.png`` and
            ``routing_layer_load.png`` go (created on rank zero).
        domains: data domain names for the batches' ``domain`` indices; by default
            ``trainer.datamodule.domains``. Without either, the domain matrix is empty.

    After an epoch, ``self.stats[stage]`` holds the finalised stats (CPU tensors) of the
    latest completed ``train`` / ``val`` epoch; the files hold those at the end of fit (or of a
    standalone ``trainer.validate``). Sanity-check validation is not counted.
    """

    def __init__(self, out_dir: str | Path, *, domains: Sequence[str] | None = None) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.domains_override = list(domains) if domains is not None else None
        self.domains: list[str] = []
        self.experts: list[str] = []
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self._sums: dict[str, dict[str, torch.Tensor] | None] = dict.fromkeys(STAGES)
        self._switch = _RecordSwitch()
        self._last_counted: RoutingRecordLike | None = None

    # -- recording on/off --------------------------------------------------------------------

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mixse = pl_module.mixse
        self.experts = list(mixse.experts)
        self.domains = self._resolve_domains(trainer)
        self._switch.enter(mixse)

    def _resolve_domains(self, trainer: L.Trainer) -> list[str]:
        if self.domains_override is not None:
            return self.domains_override
        domains = getattr(trainer.datamodule, "domains", None)
        if domains is None:
            log.warning("no trainer.datamodule.domains and no domains given: the domain matrix will be empty")
            return []
        return list(domains)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._switch.exit(pl_module.mixse)
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._switch.exit(pl_module.mixse)
        self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._switch.exit(pl_module.mixse, force=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._switch.exit(pl_module.mixse, force=True)  # safety net; a no-op after a clean end

    # -- accumulation ------------------------------------------------------------------------

    def _accumulate(self, stage: str, pl_module: L.LightningModule, batch: Mapping[str, Any]) -> None:
        records = pl_module.mixse.records
        # Nothing recorded yet (MiXSE starts with one None per layer), or these records were
        # already counted (a step that did not run the model): skip rather than count stale routing.
        if not records or any(r is None for r in records) or records[0] is self._last_counted:
            return
        self._last_counted = records[0]
        batch_sums = routing_summary(records, batch.get("attention_mask"), batch.get("domain"), len(self.domains))
        sums = self._sums[stage]
        if sums is None:
            dtype = _accumulator_dtype(batch_sums["tokens"].device)
            self._sums[stage] = {k: v.to(dtype) for k, v in batch_sums.items()}
        else:
            for key, value in batch_sums.items():
                sums[key].add_(value)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums["train"] = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._accumulate("train", pl_module, batch)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums["val"] = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._accumulate("val", pl_module, batch)

    # -- epoch end: reduce, finalise, log ----------------------------------------------------

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end("train", trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._epoch_end("val", trainer, pl_module)

    def _epoch_end(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank sees the same number of batches (DistributedSampler pads), so either all
        # ranks have sums and join the all-reduce, or none has and none does.
        sums = self._sums[stage]
        self._sums[stage] = None
        if sums is None:
            return
        stats = {k: v.cpu() for k, v in finalize(_reduce_sum(trainer, sums)).items()}  # the one host sync
        self.stats[stage] = stats
        if stats["tokens"] <= 0:
            return
        entropy_name, load_prefix = METRIC_NAMES[stage]
        # The values are already identical on every rank; sync_dist only keeps Lightning from
        # warning about unsynced epoch-level metrics (a few scalar all-reduces per epoch).
        pl_module.log(entropy_name, float(stats["entropy"]), on_epoch=True, sync_dist=True)
        for expert, share in zip(self.experts, stats["load"].tolist(), strict=True):
            pl_module.log(f"{load_prefix}{expert}", share, on_epoch=True, sync_dist=True)

    # -- files -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The content of ``routing.json``: one entry per stage that has stats."""
        return {stage: stats_to_json(self.stats[stage], self.experts, self.domains) for stage in self.stats}

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.stats:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out_dir / "routing.json", self.to_json())
        stages = [s for s in STAGES if s in self.stats]
        if self.domains:
            png = heatmap_png(
                {s: self.stats[s]["domain_matrix"] for s in stages},
                self.domains,
                self.experts,
                title="share of each data domain's gate mass per expert (mean over layers)",
                row_axis="data domain",
            )
            atomic_write_bytes(self.out_dir / "routing_domain_matrix.png", png)
        num_layers = self.stats[stages[0]]["layer_load"].shape[0]
        png = heatmap_png(
            {s: self.stats[s]["layer_load"] for s in stages},
            [str(i) for i in range(num_layers)],
            self.experts,
            title="expert load per decoder layer (share of gate mass)",
            row_axis="layer",
        )
        atomic_write_bytes(self.out_dir / "routing_layer_load.png", png)


def _reduce_sum(trainer: L.Trainer, sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All-reduce (sum) every tensor of ``sums`` across ranks in one collective; identity on one process."""
    flat = torch.cat([sums[k].reshape(-1) for k in SUM_KEYS])
    flat = trainer.strategy.reduce(flat, reduce_op="sum")
    out, offset = {}, 0
    for key in SUM_KEYS:
        n = sums[key].numel()
        out[key] = flat[offset : offset + n].view_as(sums[key])
        offset += n
    return out


# ---------------------------------------------------------------------------------------------
# per-token views
# ---------------------------------------------------------------------------------------------

ForwardFn = Callable[[L.LightningModule, torch.Tensor, torch.Tensor], Any]


def default_forward(pl_module: L.LightningModule, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """Run the wrapped model (``pl_module.model``, else the module itself) on one prompt.

    The inner model is called, not the DDP wrapper, so a forward on rank zero alone does not
    wait on the other ranks.
    """
    model = getattr(pl_module, "model", pl_module)
    return model(input_ids=input_ids, attention_mask=attention_mask)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by decoding growing prefixes.

    Decoding tokens one by one loses the leading spaces of SentencePiece tokens and shows byte
    markers ("Ġ") for byte-level BPE; the prefix difference gives the real text. Where a prefix
    does not extend the previous one (a multi-byte character split over tokens), fall back to
    the raw token string.
    """
    raw = tokenizer.convert_ids_to_tokens(list(ids))
    out, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        out.append(text[len(previous) :] if text.startswith(previous) else str(raw[i]))
        previous = text
    return out


def layer_mean_gates(records: Sequence[RoutingRecordLike], row: int = 0) -> torch.Tensor:
    """Gates of sequence ``row`` averaged over layers: ``(T, N)`` float32 on CPU."""
    return torch.stack([r.gates[row] for r in records]).float().mean(0).cpu()


class TokenRoutingCallback(Callback):
    """After each validation (every ``every_n_epochs`` epochs, rank zero), route ``prompts``
    token by token and write ``tokens_<i>.html`` and ``tokens_<i>.png`` into ``out_dir``.

    Each prompt is run alone (no padding) under ``torch.no_grad`` with the model in eval mode
    and ``mixse.record`` on; gates are averaged over layers. ``forward_fn(pl_module, input_ids,
    attention_mask)`` runs the model (default: :func:`default_forward`). Files are overwritten
    with the latest epoch's view.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: Any,
        out_dir: str | Path,
        every_n_epochs: int = 1,
        *,
        forward_fn: ForwardFn | None = None,
        max_tokens: int = 512,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.every_n_epochs = every_n_epochs
        self.forward_fn = forward_fn or default_forward
        self.max_tokens = max_tokens

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # The precision plugin's context: the same autocast (e.g. bf16-mixed) as validation used.
        with trainer.precision_plugin.forward_context():
            self.render(pl_module, title_suffix=f"epoch {trainer.current_epoch}")

    @torch.no_grad()
    def render(self, pl_module: L.LightningModule, title_suffix: str = "") -> list[Path]:
        """Route every prompt and write its views; returns the paths written (usable without a Trainer)."""
        mixse = pl_module.mixse
        modes = {m: m.training for m in pl_module.modules()}  # restore each, not a blanket train()
        previous = mixse.record
        pl_module.eval()
        mixse.record = True
        written: list[Path] = []
        try:
            for i, prompt in enumerate(self.prompts):
                written += self._render_one(i, prompt, pl_module, title_suffix)
        finally:
            mixse.record = previous
            for module, training in modes.items():
                module.train(training)
        return written

    def _render_one(self, index: int, prompt: str, pl_module: L.LightningModule, title_suffix: str) -> list[Path]:
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][:, : self.max_tokens].to(pl_module.device)
        self.forward_fn(pl_module, ids, torch.ones_like(ids))
        gates = layer_mean_gates(pl_module.mixse.records)  # (T, N)
        tokens = token_texts(self.tokenizer, ids[0].tolist())
        experts = list(pl_module.mixse.experts)
        title = f"token routing, prompt {index}" + (f", {title_suffix}" if title_suffix else "")
        html_path, png_path = self.out_dir / f"tokens_{index}.html", self.out_dir / f"tokens_{index}.png"
        atomic_write_text(html_path, token_routing_html(tokens, experts, gates, title=title))
        atomic_write_bytes(png_path, token_routing_png(tokens, experts, gates, title=title))
        return [html_path, png_path]
