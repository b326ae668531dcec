"""Decoder LLMs through qcompile.llm: generation equals transformers' token for token."""
import pytest
import torch

import qcompile
from qcompile.errors import ConfigError, InputError, VerificationError
from qcompile.llm import capture_llm, compile_llm, sample_next
from qcompile.llm.check import check_step_graph

VOCAB = 200


def _model(kind: str = "llama", seed: int = 0, **over):
    import transformers as tf
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    if kind == "llama":  # Llama 3's RoPE scaling: the tables must be the model's own
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}
    kw.update(over)
    torch.manual_seed(seed)
    return cls[1](cls[0](**kw)).eval()


def _prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, new, attention_mask=None):
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.fixture(scope="module")
def llama_ref(llama):
    return compile_llm(llama, "reference", max_seq_len=96, max_batch=3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_greedy_64_tokens_equal_transformers(kind):
    model = _model(kind)
    llm = compile_llm(model, "reference", max_seq_len=96)
    ids = _prompt(10)
    assert llm.generate(ids, 64, stop_tokens=[]) == _hf_greedy(model, ids, 64)


def test_cpu_target_generates_the_same_tokens_writing_the_cache_in_place(llama, tmp_path):
    llm = compile_llm(llama, "cpu", max_seq_len=96, max_batch=2)
    ids = _prompt(10)
    want = _hf_greedy(llama, ids, 64)
    assert llm.generate(ids, 64, stop_tokens=[]) == want
    # decode runs its own build (one token per sequence) on the prefill's parameters
    assert llm._decode is not None and llm._decode._shared is llm._exec
    llm.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert "decode.tvm_params.safetensors" not in files and "decode.model.so" in files
    back = qcompile.load(tmp_path / "art")
    assert back._decode._shared is back._exec
    assert back.generate(ids, 64, stop_tokens=[]) == want
    # the executable hands back the caller's cache tensors: nothing was copied
    caches = [c[:1] for c in llm.caches]
    llm.prefill(ids)
    outs = llm._exec(ids, torch.arange(10)[None], llm._mask(torch.arange(10)[None]),
                     torch.tensor([0]), *caches)
    assert all(o.data_ptr() == c.data_ptr() for o, c in zip(outs[1:], caches))
    # a batch on cpu, too
    prompts = [_prompt(7, 3)[0].tolist(), _prompt(12, 4)[0].tolist()]
    alone = [llm.generate([p], 12, stop_tokens=[])[0] for p in prompts]
    assert llm.generate(prompts, 12, stop_tokens=[]) == alone


@pytest.mark.parametrize("target", ["cpu", "lut"])
def test_quantized_weights_equal_the_fake_quant_interpreter(llama, target):
    """W4 (RTN, groups of 32) on the kernels against the interpreter's fake-quant model,
    within each kernel's stated bound: the cpu dequant kernels to float rounding, the LUT
    kernels to their int8 tables' rounding (tests/backends/lut: 2.5e-2 on a tiny Llama)."""
    cfg = {"weights": "int4", "group_size": 32}
    bound = 1e-4 if target == "cpu" else 2.5e-2
    ref = compile_llm(llama, "reference", config=cfg, max_seq_len=48)
    fast = compile_llm(llama, target, config=cfg, max_seq_len=48)
    assert fast._decode.report.get(f"linear.{'lut.' if target == 'lut' else ''}w4", 0) == 15
    ids = _prompt(8)
    a, b = ref.prefill(ids), fast.prefill(ids)
    assert (a - b).norm() / a.norm() < bound
    a, b = ref.decode_step([7]), fast.decode_step([7])
    assert (a - b).norm() / a.norm() < bound
    if target == "cpu":
        assert fast.generate(ids, 16, stop_tokens=[]) == ref.generate(ids, 16, stop_tokens=[])


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_cpu_target_on_qwen2_and_mistral(kind):
    """QKV bias (Qwen2) and the sliding window (Mistral) through the cpu kernels."""
    model = _model(kind, **({"sliding_window": 8} if kind == "mistral" else {}))
    llm = compile_llm(model, "cpu", max_seq_len=64)
    ids = _prompt(12)
    assert llm.generate(ids, 32, stop_tokens=[]) == _hf_greedy(model, ids, 32)


def test_prefill_and_decode_logits_equal_transformers(llama, llama_ref):
    ids = _prompt(9)
    with torch.no_grad():
        full = llama(torch.cat([ids, torch.tensor([[5, 6]])], 1)).logits
    got = [llama_ref.prefill(ids), llama_ref.decode_step([5]), llama_ref.decode_step([6])]
    for i, g in enumerate(got):
        want = full[:, 8 + i]
        assert (g - want).norm() / want.norm() < 1e-4


def test_a_batch_of_different_lengths_gives_each_prompt_its_own_tokens(llama, llama_ref):
    prompts = [_prompt(5, 2)[0].tolist(), _prompt(11, 3)[0].tolist(), _prompt(8, 4)[0].tolist()]
    alone = [llama_ref.generate([p], 20, stop_tokens=[])[0] for p in prompts]
    assert llama_ref.generate(prompts, 20, stop_tokens=[]) == alone
    # and transformers' batched generate with left padding agrees
    ids = torch.zeros(3, 11, dtype=torch.int64)
    am = torch.zeros(3, 11, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, 11 - len(p):] = torch.tensor(p)
        am[i, 11 - len(p):] = 1
    assert llama_ref.generate(ids, 20, attention_mask=am, stop_tokens=[]) == alone
    assert _hf_greedy(llama, ids, 20, attention_mask=am) == alone


def test_mistral_sliding_window_matches_transformers():
    model = _model("mistral", sliding_window=8)
    llm = compile_llm(model, "reference", max_seq_len=64)
    assert llm.spec.sliding_window == 8
    ids = _prompt(12)
    assert llm.generate(ids, 24, stop_tokens=[]) == _hf_greedy(model, ids, 24)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_ref):
    ids = _prompt(6)
    a = llama_ref.generate(ids, 16, temperature=0.8, top_p=0.9, seed=7, stop_tokens=[])
    b = llama_ref.generate(ids, 16, temperature=0.8, top_p=0.9, seed=7, stop_tokens=[])
    c = llama_ref.generate(ids, 16, temperature=5.0, seed=8, stop_tokens=[])
    assert a == b and a != c
    assert llama_ref.generate(ids, 16, temperature=1.0, top_k=1, seed=3, stop_tokens=[]) == \
        llama_ref.generate(ids, 16, stop_tokens=[])


def test_sample_next_filters():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    # top_p: token 0 alone holds ~0.71 of the mass; 0.5 keeps only it
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}
    assert int(sample_next(logits, temperature=0)) == 0


def test_stop_tokens_and_streaming(llama_ref):
    ids = _prompt(6)
    free = llama_ref.generate(ids, 20, stop_tokens=[])[0]
    stop = free[4]
    seen = []
    got = llama_ref.generate(ids, 20, stop_tokens=[stop], callback=lambda b, t: seen.append((b, t)))
    first = free.index(stop)
    assert got == [free[:first + 1]]       # the stop token is kept, nothing after it
    assert seen == [(0, t) for t in got[0]]
    assert llama_ref.generate(ids, 0) == [[]]


def test_save_and_load_keep_generation(llama, tmp_path):
    llm = compile_llm(llama, "reference", max_seq_len=48)
    ids = _prompt(5)
    want = llm.generate(ids, 10, stop_tokens=[])
    llm.save(tmp_path / "art")
    back = qcompile.load(tmp_path / "art")
    assert isinstance(back, qcompile.CompiledLLM) and back.spec == llm.spec
    assert back.generate(ids, 10, stop_tokens=[]) == want


def test_bad_inputs(llama_ref):
    with pytest.raises(ConfigError, match="Llama family"):
        compile_llm(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="max_seq_len"):
        compile_llm(_model(), max_seq_len=0)
    llama_ref.reset()
    with pytest.raises(InputError, match="before prefill"):
        llama_ref.decode_step([1])
    with pytest.raises(InputError, match="max_batch"):
        llama_ref.prefill([[1, 2]] * 4)
    with pytest.raises(InputError, match="no room"):
        llama_ref.prefill(_prompt(96))
    with pytest.raises(InputError, match="left-padded"):
        llama_ref.prefill(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(InputError, match="empty prompt"):
        llama_ref.prefill([[1, 2], []])
    with pytest.raises(InputError, match="max_new_tokens"):
        llama_ref.generate(_prompt(3), -1)
    llama_ref.prefill(_prompt(90))
    with pytest.raises(InputError, match="full"):
        for _ in range(10):
            llama_ref.decode_step([1])


def test_cache_inputs_must_only_feed_their_kv_write(llama):
    graph, spec = capture_llm(llama, max_seq_len=32)
    check_step_graph(graph, spec)
    cache = graph.inputs[4]
    graph.outputs[0] = graph.add("neg", cache)  # a second reader of the cache
    with pytest.raises(VerificationError, match="read only by the kv_write"):
        check_step_graph(graph, spec)


@pytest.mark.parametrize("kv,ratio,err", [("int8", 3.2, 1e-2), ("int4", 5.3, 1.5e-1)])
def test_quantized_kv_cache_is_stored_small_and_read_directly(llama, llama_ref, kv, ratio, err):
    cfg = {"weights": None, "kv_cache": kv}
    ref = compile_llm(llama, "reference", config=cfg, max_seq_len=96, max_batch=3)
    cpu = compile_llm(llama, "cpu", config=cfg, max_seq_len=96, max_batch=3)
    ids = _prompt(10)
    exact = llama_ref.prefill(ids)
    a, b = ref.prefill(ids), cpu.prefill(ids)
    assert ref.caches[0].dtype == torch.uint8
    assert llama_ref.cache_bytes / ref.cache_bytes == pytest.approx(ratio, rel=0.02)
    assert (a - exact).norm() / exact.norm() < err            # the quantization's own error
    assert (a - b).norm() / a.norm() < 1e-5                   # both backends read it alike
    assert ref.graph.op_histogram()["kv_read"] == 4
    assert ref.generate(ids, 16, stop_tokens=[]) == cpu.generate(ids, 16, stop_tokens=[])


def test_kv_cache_formats_compile_llm_cannot_store_are_refused(llama):
    with pytest.raises(ConfigError, match="cannot be stored"):
        compile_llm(llama, config={"weights": None, "kv_cache": "fp8_e4m3"})
