"""ioattn inside Hugging Face transformers models (ioattn.integrations.transformers).

Tiny randomly initialised models built from configs (nothing is downloaded), in fp32,
run with attn_implementation="eager" (transformers' materialized attention) and with
"ioattn" on the same weights and inputs: logits and the gradients of a loss must agree
to fp32 rounding. Under TRITON_INTERPRET=1 ioattn runs its Triton kernels, otherwise its
plain-PyTorch CPU path (GPU: the compiled kernels). Each test also checks which ioattn
function was called, so a silent fall-back (no mask passed, another implementation)
cannot pass. Skipped when transformers is not installed (scripts/setup.sh installs it).
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; never wait for it
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from ioattn.integrations import transformers as ioattn_hf  # noqa: E402

NAME = ioattn_hf.register()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture
def calls(monkeypatch):
    """Counts the ioattn functions that the integration calls: {"dense": n, "varlen": n}."""
    counts = {"dense": 0, "varlen": 0}
    for key, name in (("dense", "flash_attn_func"), ("varlen", "flash_attn_varlen_func")):
        fn = getattr(ioattn_hf, name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(ioattn_hf, name, counted)
    return counts


def pair(config_name, **overrides):
    """(eager model, ioattn model) with the same random weights, in eval mode."""
    def config():  # one each: from_config sets the implementation on the config object
        return getattr(transformers, config_name)(**{**SMALL, **overrides})
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config(), attn_implementation="eager")
    ours = AutoModelForCausalLM.from_config(config(), attn_implementation=NAME)
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == NAME and eager.config._attn_implementation == "eager"
    return eager.to(DEVICE).eval(), ours.to(DEVICE).eval()


def tokens(batch, seqlen, seed=1):
    return torch.randint(3, SMALL["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, input_ids, **kwargs):
    """Logits and the gradient of every parameter of a loss over the valid tokens."""
    model.zero_grad(set_to_none=True)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    logits = model(input_ids.to(DEVICE), **kwargs).logits
    valid = kwargs.get("attention_mask")
    valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=DEVICE) if valid is None else valid.bool()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (logits * weights)[valid].sum().backward()
    return logits.detach()[valid], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(eager, ours, input_ids, **kwargs):
    logits_e, grads_e = run(eager, input_ids, **kwargs)
    logits_o, grads_o = run(ours, input_ids, **kwargs)
    torch.testing.assert_close(logits_o, logits_e, rtol=1e-4, atol=2e-5)
    assert grads_o.keys() == grads_e.keys() and grads_e
    for name, g in grads_e.items():
        scale = g.abs().max().item() + 1e-6
        err = (grads_o[name] - g).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"grad of {name}: max error {err:.3e} (max |grad| {scale:.3e})"


def test_llama_gqa(calls):
    eager, ours = pair("LlamaConfig")
    assert_same(eager, ours, tokens(2, 24))
    assert calls == {"dense": 2, "varlen": 0}  # 2 layers, no padding: the dense function


def test_llama_padding(calls):
    """Left padding (rows 1, 2) and right padding (row 3): padded tokens unpadded to varlen."""
    eager, ours = pair("LlamaConfig")
    mask = torch.ones(4, 20, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :11] = 0
    mask[3, 15:] = 0
    assert_same(eager, ours, tokens(4, 20), attention_mask=mask)
    assert calls == {"dense": 0, "varlen": 2}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="graph capture and inductor's code, not the kernels: the CPU pass runs it")
@pytest.mark.skipif(DEVICE == "cpu" and not __import__("shutil").which("c++"),
                    reason="inductor's CPU code needs a C++ compiler")
def test_llama_padding_torch_compile_dynamic():
    """torch.compile (inductor, dynamic=True) of a model running ioattn, with and without a padding
    mask, two sequence lengths: logits equal eager attention's. (Before: with a padding mask,
    inductor's code named an unbound size symbol and raised NameError.)"""
    torch._dynamo.reset()
    eager, ours = pair("LlamaConfig")
    compiled = torch.compile(ours, dynamic=True)
    for seqlen in (12, 19):
        mask = torch.ones(2, seqlen, dtype=torch.long)
        mask[0, :5] = 0
        for kwargs in ({}, {"attention_mask": mask.to(DEVICE)}):
            ids = tokens(2, seqlen).to(DEVICE)
            with torch.no_grad():
                got, want = compiled(ids, **kwargs).logits, eager(ids, **kwargs).logits
            valid = kwargs["attention_mask"].bool() if kwargs else torch.ones(2, seqlen, dtype=torch.bool, device=DEVICE)
            torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=2e-5)


def test_mistral_sliding_window(calls):
    """sliding_window 5 < seqlen: each query sees itself and the 4 keys before it."""
    eager, ours = pair("MistralConfig", sliding_window=5)
    assert_same(eager, ours, tokens(2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :7] = 0
    assert_same(eager, ours, tokens(2, 24, seed=3), attention_mask=mask)
    assert calls == {"dense": 2, "varlen": 2}


def test_gemma2_softcap_alternating_window(calls):
    """Gemma-2: logit softcap, query_pre_attn_scalar scaling, sliding and global layers."""
    eager, ours = pair("Gemma2Config", sliding_window=6, attn_logit_softcapping=1.5, query_pre_attn_scalar=24,
                       final_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    assert_same(eager, ours, tokens(2, 20), attention_mask=mask)
    assert calls == {"dense": 0, "varlen": 2}


def test_gpt_oss_sinks_and_alternating_window(calls):
    """GPT-OSS: attention sinks (s_aux, learned: their gradients are compared too), sliding and
    full layers, biased projections, a mixture of experts; padding in one row."""
    eager, ours = pair("GptOssConfig", sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"], rope_parameters=None)
    for model in (eager, ours):  # the sinks start at 0 in the configs' init: make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.5, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    assert_same(eager, ours, tokens(2, 20), attention_mask=mask)
    assert_same(eager, ours, tokens(2, 20, seed=5))
    assert calls == {"dense": 2, "varlen": 2}


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
def test_packed_sequences(calls, source):
    """Padding-free batch: 3 sequences in one row, each attending only to itself. The
    reference runs eager on each sequence alone (its gradients summed)."""
    eager, ours = pair("LlamaConfig")
    lens = [7, 9, 4]
    cu = [0, 7, 16, 20]
    ids = tokens(1, 20).to(DEVICE)
    weights = torch.randn(1, 20, SMALL["vocab_size"], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    position_ids = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0).to(DEVICE)
    extra = {}
    if source == "cu_seq_lens":  # as DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes them
        cu_t = torch.tensor(cu, device=DEVICE)
        extra = dict(cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=max(lens), max_length_k=max(lens))
    logits_e = []
    for a, b in zip(cu, cu[1:]):
        out = eager(ids[:, a:b]).logits
        (out * weights[:, a:b]).sum().backward()
        logits_e.append(out.detach())
    logits_o = ours(ids, position_ids=position_ids, use_cache=False, **extra).logits
    (logits_o * weights).sum().backward()
    torch.testing.assert_close(logits_o.detach(), torch.cat(logits_e, dim=1), rtol=1e-4, atol=2e-5)
    for (name, p_e), p_o in zip(eager.named_parameters(), ours.parameters()):
        g = p_e.grad
        torch.testing.assert_close(p_o.grad, g, rtol=1e-4, atol=1e-4 * g.abs().max().item() + 1e-6, msg=name)
    assert calls == {"dense": 0, "varlen": 2}


@pytest.mark.parametrize("config", ["LlamaConfig", "MistralConfig"])
def test_generate_left_padded(calls, config):
    """Greedy decoding with a KV cache: prefill (varlen, padded) then one query per step
    (Mistral: a sliding window of 6, whose cache soon holds no padding)."""
    eager, ours = pair(config, **(dict(sliding_window=6) if config == "MistralConfig" else {}))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    ids = tokens(2, 10).masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask.to(DEVICE), max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    with torch.no_grad():
        out_e = eager.generate(ids.to(DEVICE), **kw)
        out_o = ours.generate(ids.to(DEVICE), **kw)
    assert torch.equal(out_o.sequences, out_e.sequences)
    for step_o, step_e in zip(out_o.logits, out_e.logits):
        torch.testing.assert_close(step_o, step_e, rtol=1e-4, atol=2e-5)
    assert calls["dense"] + calls["varlen"] == 2 * 5 and calls["varlen"] >= 2
    if config == "LlamaConfig":  # row 0's padding stays in view: every step is varlen
        assert calls["varlen"] == 2 * 5


def test_prefill_after_cache(calls):
    """A second chunk of 5 queries over a cache of 7 left-padded tokens (queries shorter than
    the keys: the last q_len columns of the mask are the queries')."""
    eager, ours = pair("LlamaConfig")
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :6] = 0
    ids = tokens(3, 12).to(DEVICE)
    logits = []
    with torch.no_grad():
        for model in (eager, ours):
            first = model(ids[:, :7], attention_mask=mask[:, :7].to(DEVICE), use_cache=True)
            # transformers 5.x renamed past_key_values to cache (the old name warns)
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            second = model(ids[:, 7:], attention_mask=mask.to(DEVICE), **{name: first.past_key_values})
            logits.append(torch.cat([first.logits, second.logits], dim=1)[mask.bool().to(DEVICE)])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=2e-5)
    assert calls == {"dense": 0, "varlen": 4}


def test_dropout_only_in_training(calls):
    eager, ours = pair("LlamaConfig", attention_dropout=0.5)
    ids = tokens(2, 16).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-4, atol=2e-5)  # eval: none
        ours.train()
        torch.manual_seed(5)
        a = ours(ids).logits
        torch.manual_seed(5)
        b = ours(ids).logits
        torch.manual_seed(6)
        c = ours(ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)  # dropout on, following torch.manual_seed


def test_from_pretrained(tmp_path):
    """The user's path: save a model, load it with attn_implementation="ioattn"."""
    eager, _ = pair("LlamaConfig")
    eager.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ioattn").to(DEVICE).eval()
    assert ours.config._attn_implementation == "ioattn"
    ids = tokens(1, 12).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, rtol=1e-4, atol=2e-5)


def test_errors():
    for bad in ("flash_ioattn", "my/kernel", "paged|ioattn", ""):
        with pytest.raises(ValueError, match="pick a name"):
            ioattn_hf.register(bad)
    _, ours = pair("LlamaConfig")
    ids = tokens(1, 8).to(DEVICE)
    mask4d = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE).tril()
    with pytest.raises(ValueError, match="2-D padding mask"):
        ours(ids, attention_mask=mask4d)
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    k = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.warns(UserWarning, match="attention weights"):
        out, weights = ioattn_hf.attention_forward(ours.model.layers[0].self_attn, q, k, k, None,
                                                   output_attentions=True)
    assert out.shape == (1, 8, 4, 16) and weights is None


@pytest.mark.parametrize("v_dim", [16, 40])
def test_value_head_dim_of_its_own(v_dim):
    """A value head dim below or above the query's (MLA-style) goes to ioattn as it is, with or
    without a padding mask: the output has the value's head dim."""
    q, k = torch.randn(2, 4, 10, 24, device=DEVICE), torch.randn(2, 2, 10, 24, device=DEVICE)
    v = torch.randn(2, 2, 10, v_dim, device=DEVICE)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = ioattn_hf.attention_forward(module, q, k, v, None, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-4, atol=1e-5)
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    out, _ = ioattn_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    allowed = mask[:, None, None, :] & torch.ones(10, 10, dtype=torch.bool, device=DEVICE).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
    assert out.shape == (2, 10, 4, v_dim) and (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask], ref.transpose(1, 2)[mask], rtol=1e-4, atol=1e-5)


def test_deepseek_v3_mla(calls):
    """DeepSeek-V3's multi-head latent attention: q/k head dim 24 (16 + 8 rotary), v head dim 16,
    dense and padded, logits and gradients as eager's."""
    eager, ours = pair("DeepseekV3Config", head_dim=8, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                       num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
                       first_k_dense_replace=1)
    assert_same(eager, ours, tokens(2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    assert_same(eager, ours, tokens(2, 12), attention_mask=mask)
    assert calls == {"dense": 2, "varlen": 2}


@pytest.mark.parametrize("causal", [False, True])
def test_attention_function_with_padding(causal):
    """attention_forward alone against SDPA: a bidirectional or causal layer (module.is_causal),
    GQA, a left- and a right-padded row. A causal layer's padded queries output zeros; a
    bidirectional layer's queries all attend to the real keys, as eager's (the mask is the keys':
    the layer may be a cross-attention whose queries are all real, of the keys' length)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 10, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(3, 2, 10, 16, generator=g).to(DEVICE) for _ in range(2))
    mask = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    mask[1, :4] = False
    mask[2, 7:] = False
    module = torch.nn.Module()
    module.is_causal = causal
    out, _ = ioattn_hf.attention_forward(module, q, k, v, mask)
    allowed = mask[:, None, None, :] & (torch.ones(10, 10, dtype=torch.bool, device=DEVICE).tril() if causal else True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-4, atol=1e-5)
    if causal:
        assert (out[~mask] == 0).all()
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_cross_attention_key_padding():
    """Non-causal, 6 queries over 10 padded keys (cross-attention): every query is real."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 4, 10, 16, generator=g).to(DEVICE) for _ in range(2))
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = ioattn_hf.attention_forward(module, q, k, v, mask, scaling=0.2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.2)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_packed_rows_from_position_ids_any_batch():
    """position_ids that restart inside rows of a batch of 2 (padding-free packing, as
    transformers' masks read it): each packed sequence attends only to itself."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 2, 12, 16, generator=g).to(DEVICE) for _ in range(2))
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))], device=DEVICE)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = ioattn_hf.attention_forward(module, q, k, v, None, position_ids=pos)
    for b, segments in ((0, ((0, 5), (5, 12))), (1, ((0, 12), ))):
        for s, e in segments:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], is_causal=True, enable_gqa=True)
            torch.testing.assert_close(out[b:b + 1, s:e], ref.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_mask_patterns_ioattn_cannot_express_raise():
    """Chunked attention past its first chunk and data-dependent unions (image-token / prefix
    blocks) raise; causal, windows, bidirectional windows, padding and packing pass."""
    mu = pytest.importorskip("transformers.masking_utils")
    check = ioattn_hf._check_mask_function
    chunked = mu.and_masks(mu.chunked_overlay(6, torch.zeros(2, dtype=torch.long)), mu.causal_mask_function)
    check(chunked, 6)  # all keys in the first chunk: causal
    with pytest.raises(ValueError, match="chunks of 6 tokens"):
        check(chunked, 16)
    blocks = torch.tensor([[0, 1, 1, 0]])
    with pytest.raises(ValueError, match="data-dependent"):
        check(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks)), 4)
    token_types = torch.tensor([[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="data-dependent"):
        check(mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: token_types[b, kv] == 1), 4)
    for ok in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(5),
               mu.or_masks(mu.causal_mask_function, lambda *args: torch.tensor(True)),
               mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(2, 4, dtype=torch.bool))),
               mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(1, 4)))):
        check(ok, 16)


def test_model_without_attention_interface_raises():
    """Bloom computes attention in its own code: with ioattn's name its causal mask would be
    lost (None without padding), so building its mask raises."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    config = transformers.BloomConfig(vocab_size=97, hidden_size=64, n_layer=1, n_head=4)
    model = bloom.BloomForCausalLM._from_config(config, attn_implementation=NAME).to(DEVICE).eval()
    with pytest.raises(ValueError, match="bloom models compute attention in their own code"):
        model(tokens(1, 8))
