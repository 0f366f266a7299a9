"""StaticDecoder against transformers' ``generate``: same greedy tokens, same stop-string cuts, HF's
top-p semantics, and a seeded sampler of the right distribution that leaves the global RNG alone."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import GENERATION_CORPUS as CORPUS
from conftest import SMALL_TINY, make_config, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from selfmoe.data.decoding import StaticDecoder, top_p_filter, unsupported_reason
from selfmoe.data.generation import TextGenerator
from selfmoe.data.sharded import LocalCollective
from selfmoe.models.attention import NAME as SELFMOE_SDPA
from selfmoe.models.tiny import make_tiny
from selfmoe.phases import generate as generate_phase

# Different lengths; the last ends right where the tiny model has learnt to emit EOS.
PROMPTS = [
    "the cat",
    "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n",
    "Task 1:\nAdd two",
    "### Instruction:\nWhat is 3 + 3?\n\n### Response:\nThe answer is 6.",
]


@pytest.fixture(scope="module")
def trained():
    model, tok, _ = make_tiny(CORPUS, replace(SMALL_TINY, pretrain_steps=150, pretrain_batch_size=8))
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA
    return model.eval(), tok


def _encode(tok, prompts):
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


def _hf(model, tok, enc, max_new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )
    return out[:, enc["input_ids"].shape[1] :]


def _decoder(model, tok, **kwargs):
    return StaticDecoder(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tokenizer=tok, **kwargs)


@pytest.mark.parametrize("impl", ["sdpa", SELFMOE_SDPA, "eager"])
@pytest.mark.parametrize("check_every", [1, 16])
def test_greedy_tokens_equal_generate(trained, impl, check_every):
    model, tok = trained
    model.set_attn_implementation(impl)
    enc = _encode(tok, PROMPTS)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(PROMPTS)  # all lengths differ
    want = _hf(model, tok, enc, 14)
    got = _decoder(model, tok, check_every=check_every).generate(
        enc["input_ids"], enc["attention_mask"], max_new_tokens=14
    )
    assert torch.equal(got, want)
    rows = want.tolist()
    assert rows[3].index(tok.eos_token_id) < 3 and rows[3][-1] == tok.pad_token_id  # ended early, then pad
    assert tok.eos_token_id not in rows[0] and want.shape[1] == 14  # ran to the limit


def test_all_rows_ending_early_stop_the_call_at_the_last_end(trained):
    model, tok = trained
    enc = _encode(
        tok, [PROMPTS[3], PROMPTS[3] + "\n\n### Instruction:\nWhat is 3 + 3?\n\n### Response:\nThe answer is 6."]
    )
    want = _hf(model, tok, enc, 40)
    assert want.shape[1] < 40  # every row emitted EOS
    for every in (1, 4, 64):
        got = _decoder(model, tok, check_every=every).generate(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=40
        )
        assert torch.equal(got, want)


def test_stop_strings_cut_where_generate_cuts(trained):
    model, tok = trained
    enc = _encode(tok, PROMPTS)
    greedy = _hf(model, tok, enc, 14).tolist()
    within = tok.decode(greedy[0][2:4])  # inside the first completion
    spanning = PROMPTS[1][-2:] + tok.decode(greedy[1][:1])[:1]  # starts in the prompt, ends in the completion
    stops_seen = 0
    for stops in ([within], [spanning], [within, spanning], ["no such text"]):
        want = _hf(model, tok, enc, 14, stop_strings=stops, tokenizer=tok)
        for every in (1, 5, 16):
            got = _decoder(model, tok, check_every=every).generate(
                enc["input_ids"], enc["attention_mask"], max_new_tokens=14, stop_strings=stops
            )
            assert torch.equal(got, want), (stops, every)
        stops_seen += int((want == tok.pad_token_id).any())
    assert stops_seen >= 3  # the first three did cut a row


def test_top_p_filter_equals_transformers_warpers():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    logits[0, :10] = 2.0  # ties across the nucleus boundary
    ids = torch.zeros(6, 1, dtype=torch.long)
    for temperature in (1.0, 0.7):
        for top_p in (0.05, 0.5, 0.9, 0.98, 0.999):
            want = TopPLogitsWarper(top_p)(ids, TemperatureLogitsWarper(temperature)(ids, logits.clone()))
            got = top_p_filter(logits / temperature, top_p)
            assert torch.equal(got, want)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(trained):
    model, tok = trained
    enc = _encode(tok, PROMPTS)
    dec = _decoder(model, tok)
    state = torch.random.get_rng_state()

    def sample(seed):
        return dec.generate(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=12, do_sample=True, top_p=0.98, seed=seed
        )

    first = sample(3)
    assert torch.equal(first, sample(3))
    assert torch.equal(state, torch.random.get_rng_state())
    assert any(not torch.equal(first, sample(s)) for s in (4, 5))


def test_first_sampled_token_follows_the_softmax():
    """Chi-square of 4,000 first tokens (deterministic seeds) against the model's tempered probabilities."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=7,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a spread-out distribution, not a near-uniform one
    prompt = torch.tensor([[3, 5, 2]])
    temperature = 0.8
    with torch.no_grad():
        probs = (model(prompt).logits[0, -1] / temperature).softmax(-1)
    assert probs.max() > 0.3 and (probs > 0.02).sum() >= 4
    dec = StaticDecoder(model, pad_token_id=0, eos_token_id=7)
    batch = 500
    counts = torch.zeros(8)
    for seed in range(8):
        first = dec.generate(
            prompt.expand(batch, -1),
            torch.ones(batch, 3, dtype=torch.long),
            max_new_tokens=1,
            do_sample=True,
            temperature=temperature,
            seed=seed,
        )
        counts += torch.bincount(first[:, 0], minlength=8)
    expected = probs * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected.clamp_min(1e-9)).sum())
    assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom


def test_calls_with_the_same_bucket_reuse_the_cache(trained):
    model, tok = trained
    dec = _decoder(model, tok, max_cached=1)
    enc = _encode(tok, PROMPTS[:2])
    dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=5)
    ((key, slot),) = dec._slots.items()
    shorter = _encode(tok, PROMPTS[:1] * 2)  # other prompt and limit, the same 64-slot bucket
    out = dec.generate(shorter["input_ids"], shorter["attention_mask"], max_new_tokens=9)
    assert list(dec._slots) == [key] and dec._slots[key].cache is slot.cache
    assert torch.equal(out, _hf(model, tok, shorter, 9))  # the reused cache left nothing behind
    dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=70)  # a longer bucket replaces it
    assert list(dec._slots) == [(2, 128)]


def test_text_generator_falls_back_for_sliding_window_models(caplog):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = MistralForCausalLM(config).eval()
    assert "full attention" in unsupported_reason(model)
    assert unsupported_reason(tiny_llama()) is None
    gen = TextGenerator(model, tokenizer=None)
    with caplog.at_level("WARNING"):
        assert gen.decoder() is None
    assert "model.generate" in caplog.text


def test_a_decode_step_and_sampling_never_read_the_device(trained):
    """What a CUDA graph needs and per-step speed wants, checked on the CPU: between the host's looks, no op
    reads a value back (``.item()``, ``bool(t)``, ``torch.equal``, ``nonzero``: what would sync on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero"):
                self.seen.append(name)
            return func(*args, **kwargs)

    model, tok = trained
    for impl in ("sdpa", SELFMOE_SDPA):
        model.set_attn_implementation(impl)
        dec = _decoder(model, tok)
        enc = _encode(tok, PROMPTS)
        dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=3)
        (slot,) = dec._slots.values()
        rng = torch.Generator().manual_seed(0)
        with Reads() as reads, torch.inference_mode():
            logits = dec._step(slot)
            dec._pick(logits, True, 0.7, 0.9, rng)
            dec._pick(logits, False, 1.0, 1.0, None)
        assert reads.seen == [], (impl, reads.seen)


# --- torch.compile ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(trained):
    """One compiling decoder for the compile tests: each new shape is an inductor compile (~15 s on a CPU)."""
    model, tok = trained
    return _decoder(model, tok, compile=True)


def test_compiled_decode_equals_the_plain_decode_and_recompiles_for_new_shapes(trained, compiled, caplog):
    model, tok = trained
    model.set_attn_implementation(SELFMOE_SDPA)  # what the generate phase decodes with
    plain = _decoder(model, tok)
    # (4 rows, 64 slots), then (3 rows, 128 slots): the second call recompiles with dynamic shapes.
    for prompts, max_new in ((PROMPTS, 14), (PROMPTS[:3], 70)):
        enc = _encode(tok, prompts)
        with caplog.at_level(logging.WARNING, logger="selfmoe.data.decoding"):
            got = compiled.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new)
        assert compiled.compile and compiled._compiled is not None, caplog.text  # no fallback
        assert torch.equal(got, plain.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new))
        assert torch.equal(got, _hf(model, tok, enc, max_new))
    assert list(compiled._slots) == [(4, 64), (3, 128)]
    assert "torch.compile" not in caplog.text


def _failing_compile(error: BaseException, calls: list[str]):
    """A stand-in for torch.compile: the callable it makes raises ``error`` when called (where dynamo compiles)."""

    def compile_(fn, **kwargs):
        calls.append("compile")

        def run(*args, **kw):
            calls.append("call")
            raise error

        return run

    return compile_


def test_a_failed_compile_falls_back_to_the_plain_step_with_a_warning(trained, monkeypatch, caplog):
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler

    model, tok = trained
    calls: list[str] = []
    failure = BackendCompilerFailed("inductor", InvalidCxxCompiler(), None)
    monkeypatch.setattr(torch, "compile", _failing_compile(failure, calls))
    dec = _decoder(model, tok, compile=True)
    enc = _encode(tok, PROMPTS)
    with caplog.at_level(logging.WARNING, logger="selfmoe.data.decoding"):
        got = dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=14)
    assert "decoding without torch.compile" in caplog.text and "InvalidCxxCompiler" in caplog.text
    assert torch.equal(got, _hf(model, tok, enc, 14))
    assert calls == ["compile", "call"] and not dec.compile  # given up on for the decoder's life
    dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=70)  # a new shape: no new attempt
    assert calls == ["compile", "call"]


def test_torch_compile_refusing_falls_back_too(trained, monkeypatch, caplog):
    model, tok = trained

    def refuse(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", refuse)
    dec = _decoder(model, tok, compile=True)
    enc = _encode(tok, PROMPTS)
    with caplog.at_level(logging.WARNING, logger="selfmoe.data.decoding"):
        got = dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=14)
    assert "not supported here" in caplog.text and not dec.compile
    assert torch.equal(got, _hf(model, tok, enc, 14))


def test_errors_that_are_not_compile_failures_propagate(trained, monkeypatch):
    model, tok = trained
    monkeypatch.setattr(torch, "compile", _failing_compile(ValueError("not the compiler's"), []))
    dec = _decoder(model, tok, compile=True)
    enc = _encode(tok, PROMPTS)
    with pytest.raises(ValueError, match="not the compiler's"):
        dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=5)


def test_going_past_the_recompile_limit_falls_back_with_a_warning(trained, monkeypatch, caplog):
    """Not dynamo's silent eager fallback: the decoder says so and runs its plain step."""
    import torch._dynamo.config

    model, tok = trained
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real(fn, **kwargs, backend="eager"))  # trace only
    dec, plain = _decoder(model, tok, compile=True), _decoder(model, tok)
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, "selfmoe.data.decoding"):
        for prompts, max_new in ((PROMPTS, 14), (PROMPTS[:3], 70)):  # the second shape needs a recompile
            enc = _encode(tok, prompts)
            got = dec.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new)
            assert torch.equal(got, plain.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new))
    assert "FailOnRecompileLimitHit" in caplog.text and not dec.compile


def test_text_generator_passes_compile_to_its_decoder():
    model = tiny_llama()
    assert TextGenerator(model, SimpleNamespace(pad_token_id=0, eos_token_id=1), compile=True).decoder().compile
    assert not TextGenerator(model, SimpleNamespace(pad_token_id=0, eos_token_id=1)).decoder().compile


@pytest.mark.parametrize(
    ("setting", "device", "want"), [(True, "cpu", False), (True, "cuda", True), (False, "cuda", False)]
)
def test_the_generate_phase_compiles_on_a_gpu_only(tmp_path, monkeypatch, setting, device, want):
    cfg = make_config("generate", tmp_path, "domain=math", f"data.compile={str(setting).lower()}")
    seen = []

    class Stop(Exception):
        pass

    def text_generator(model, tokenizer, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(generate_phase, "TextGenerator", text_generator)
    # Only the parameters' device is looked at before the generator is made: no GPU needed.
    model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))
    job = generate_phase._Job(cfg, "math", tmp_path / "data", "key", "base", None, [])
    with pytest.raises(Stop):
        job(model, LocalCollective())
    assert seen == [{"compile": want}]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", SELFMOE_SDPA])
def test_cuda_graph_decode_equals_eager_decode(trained, impl):
    model, tok = trained
    model = copy.deepcopy(model).cuda()
    model.set_attn_implementation(impl)
    enc = _encode(tok, PROMPTS)
    eager = _decoder(model, tok, use_graphs=False)
    graphed = _decoder(model, tok)
    for max_new in (14, 30):  # the second call replays the graph captured by the first
        want = eager.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new)
        got = graphed.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new)
        assert torch.equal(got, want)
        assert torch.equal(got, _hf(model, tok, {k: v.cuda() for k, v in enc.items()}, max_new).cpu())
    assert all(slot.graph is not None for slot in graphed._slots.values())
    sampled = [graphed.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=20, do_sample=True, seed=1)]
    sampled.append(eager.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=20, do_sample=True, seed=1))
    assert torch.equal(*sampled)


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_equals_eager_decode(trained):
    model, tok = trained
    model = copy.deepcopy(model).cuda()
    model.set_attn_implementation(SELFMOE_SDPA)
    eager = _decoder(model, tok, use_graphs=False)
    compiled = _decoder(model, tok, compile=True)
    for prompts, max_new in ((PROMPTS, 14), (PROMPTS[:3], 70)):  # the second shape recompiles
        enc = _encode(tok, prompts)
        want = eager.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new)
        assert torch.equal(compiled.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new), want)
    assert compiled.compile and all(slot.graph is not None for slot in compiled._slots.values())
