"""gpuce.torch.patch on Hugging Face transformers causal LMs (tiny random configs, no download).

The reference is always the same model unpatched (transformers' own lm_head + ForCausalLMLoss):
loss, every parameter's gradient, 50 training steps, Trainer (gradient accumulation with
num_items_in_batch, evaluation with logits), and the peak memory of a training step at a
32000-token vocabulary, measured in a child process.
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gpuce.torch as gt  # noqa: E402
from gpuce import _hf  # noqa: E402

V = 257  # vocabulary: not a power of two
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _config(arch):
    """A tiny random config of each covered architecture, dropout off (so that the patched
    and the unpatched model see the same activations in training mode)."""
    T = transformers
    if arch == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(vocab_size=V, **SMALL)
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(vocab_size=V, head_dim=8, **SMALL)
    if arch == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(vocab_size=V, **SMALL)
    if arch == "qwen3":
        return T.Qwen3ForCausalLM, T.Qwen3Config(vocab_size=V, head_dim=8, **SMALL)
    if arch == "gemma":
        return T.GemmaForCausalLM, T.GemmaConfig(vocab_size=V, head_dim=8, **SMALL)
    if arch == "gemma2":
        # final_logit_softcapping small enough that the cap matters at these logits
        return T.Gemma2ForCausalLM, T.Gemma2Config(
            vocab_size=V, head_dim=8, final_logit_softcapping=0.05, **SMALL)
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2"]


def _pair(arch, seed=0, dtype=torch.float32, cap=None):
    cls, cfg = _config(arch)
    if cap is not None:
        cfg.final_logit_softcapping = cap
    torch.manual_seed(seed)
    ref = cls(cfg).to(dtype)
    model = gt.patch(copy.deepcopy(ref))
    return model, ref


def _batch(seed, b=3, t=19):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100                 # a masked prompt
    labels[1, t - 4:] = -100             # padding at the end
    return ids, labels


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def _assert_grads_close(model, ref, rtol, atol):
    gm, gr = _grads(model), _grads(ref)
    assert gm.keys() == gr.keys()
    for n in gr:
        assert gm[n] is not None and gr[n] is not None, n
        torch.testing.assert_close(gm[n], gr[n], rtol=rtol, atol=atol, msg=n)


def test_every_covered_architecture_is_tested():
    assert sorted(_hf.SUPPORTED) == sorted(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_every_gradient_match_the_unpatched_model(arch):
    model, ref = _pair(arch)
    model.train(), ref.train()
    ids, labels = _batch(1)
    out = model(input_ids=ids, labels=labels)
    exp = ref(input_ids=ids, labels=labels)
    assert out.logits is None            # training mode: the logits are never formed
    assert exp.logits.shape == (3, 19, V)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    _assert_grads_close(model, ref, rtol=1e-5, atol=1e-6)


def test_gemma2_soft_cap_is_applied():
    """Without the cap the loss would be far from the capped model's: the cap is in effect."""
    model, ref = _pair("gemma2")
    ids, labels = _batch(2)
    capped = model(input_ids=ids, labels=labels).loss
    ref.config.final_logit_softcapping = None
    uncapped = ref(input_ids=ids, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 5e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_fifty_training_steps_match(arch):
    # Gemma 2 with a cap the trained logits reach.  Plain SGD at a stable step: Adam turns the
    # rounding noise of gradients that are zero in exact arithmetic (GPT-2's key bias) into
    # full steps, and a step size where the loss oscillates multiplies any rounding difference
    # tenfold every few steps; either would measure the optimiser, not the loss.
    model, ref = _pair(arch, seed=3, cap=2.0 if arch == "gemma2" else None)
    model.train(), ref.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    curves = ([], [])
    batches = [_batch(100 + i) for i in range(4)]  # learnable: four batches, seen in turn
    for step in range(50):
        ids, labels = batches[step % 4]
        for m, opt, curve in zip((model, ref), opts, curves):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert curves[1][-1] < curves[1][0] - 0.5    # it trains
    # float32 rounding noise, compounded over 50 steps
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]),
                               rtol=1e-5, atol=1e-5)
    pm = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(pm[n], p, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_items_in_batch_divides_the_sum(arch):
    model, ref = _pair(arch)
    ids, labels = _batch(4)
    n = torch.tensor(37)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=n)
    exp = ref(input_ids=ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    _assert_grads_close(model, ref, rtol=1e-5, atol=1e-6)
    # an int works too
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=37).loss,
                               exp.loss, rtol=1e-6, atol=1e-6)


def test_shift_labels_are_used_as_given():
    model, ref = _pair("llama")
    ids, labels = _batch(5)
    shifted = torch.roll(labels, 2, dims=1)
    shifted[:, :3] = -100
    out = model(input_ids=ids, labels=labels, shift_labels=shifted)
    exp = ref(input_ids=ids, labels=labels, shift_labels=shifted)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)


def test_logits_in_eval_and_on_request():
    model, ref = _pair("gemma2")
    ids, labels = _batch(6)
    model.eval(), ref.eval()
    out, exp = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, exp.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    assert model(input_ids=ids, labels=labels, return_logits=False).logits is None
    model.train(), ref.train()
    out = model(input_ids=ids, labels=labels, return_logits=True)
    torch.testing.assert_close(out.logits, ref(input_ids=ids, labels=labels).logits,
                               rtol=0, atol=0)
    gt.patch(model, return_logits=True)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_without_labels_the_model_is_untouched():
    model, ref = _pair("llama")
    model.eval(), ref.eval()
    ids, _ = _batch(7)
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits,
                               rtol=0, atol=0)
    kw = dict(max_new_tokens=4, do_sample=False)
    assert model.generate(ids[:1, :5], **kw).tolist() == ref.generate(ids[:1, :5], **kw).tolist()


def test_tuple_output_puts_the_loss_first():
    model, ref = _pair("qwen2")
    model.eval(), ref.eval()
    ids, labels = _batch(8)
    out = model(ids, labels=labels, return_dict=False)
    exp = ref(ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(exp)
    torch.testing.assert_close(out[0], exp[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], exp[1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tuple_in_training_keeps_the_logits_place(arch):
    """Training mode: no logits, but out[1] stays the logits' slot (None) and the cache and
    hidden states follow at the unpatched positions."""
    model, ref = _pair(arch)
    ids, labels = _batch(13)
    kw = dict(labels=labels, return_dict=False, use_cache=True, output_hidden_states=True)
    out, exp = model(ids, **kw), ref(ids, **kw)
    assert isinstance(out, tuple) and len(out) == len(exp)
    torch.testing.assert_close(out[0], exp[0], rtol=1e-6, atol=1e-6)
    assert out[1] is None and exp[1].shape == ids.shape + (V,)
    assert type(out[2]) is type(exp[2])
    assert len(out[3]) == len(exp[3])
    for a, b in zip(out[3], exp[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ignore_index_keyword_is_honoured():
    model, ref = _pair("llama")
    ids, labels = _batch(14)
    labels = labels.masked_fill(labels == -100, 7)      # 7 marks the ignored positions
    labels[2, 3] = 7
    out = model(input_ids=ids, labels=labels, ignore_index=7)
    exp = ref(input_ids=ids, labels=labels, ignore_index=7)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    plain = ref(input_ids=ids, labels=labels).loss
    assert abs(plain.item() - exp.loss.item()) > 1e-3     # the keyword matters here
    with pytest.raises(ValueError, match="ignore_index"):
        model(input_ids=ids, labels=labels, ignore_index=7.0)


def test_torch_compile_of_a_patched_model_matches():
    model, ref = _pair("llama")
    ids, labels = _batch(15)
    out = torch.compile(model)(input_ids=ids, labels=labels)
    exp = torch.compile(ref)(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward(), exp.loss.backward()
    _assert_grads_close(model, ref, rtol=1e-4, atol=1e-6)
    assert "forward" not in model.lm_head.__dict__      # the head is restored


class _Adapter(torch.nn.Module):
    """A LoRA-style head as PEFT puts it on lm_head: weight/bias of the base, another output."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.a = torch.nn.Linear(base.in_features, 2, bias=False)
        self.b = torch.nn.Linear(2, base.out_features, bias=False)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.b(self.a(x))


def test_what_the_patch_cannot_follow_is_refused_at_the_call():
    ids, labels = _batch(16)
    model, _ = _pair("llama")
    model.lm_head = _Adapter(model.lm_head)          # after patching (PEFT on lm_head)
    with pytest.raises(ValueError, match="plain floating-point nn.Linear"):
        model(input_ids=ids, labels=labels)
    for register in (lambda h: h.register_forward_hook(lambda m, i, o: o * 0.5),
                     lambda h: h.register_forward_pre_hook(lambda m, i: (i[0] * 2,))):
        model, _ = _pair("llama")
        handle = register(model.lm_head)
        with pytest.raises(ValueError, match="forward hooks"):
            model(input_ids=ids, labels=labels)
        handle.remove()
        model(input_ids=ids, labels=labels)
    model, _ = _pair("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: 2 * logits.sum()
    with pytest.raises(ValueError, match="loss_function"):
        model(input_ids=ids, labels=labels)
    # nn.DataParallel's replicas share the original's __dict__ (and so its patched forward)
    model, _ = _pair("llama")
    replica = model._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match="DataParallel"):
        replica(input_ids=ids, labels=labels)
    model(input_ids=ids, labels=labels)
    gt.unpatch(model)
    assert not model._forward_pre_hooks


def test_bfloat16_model_gives_a_float32_loss():
    """transformers upcasts the bfloat16 logits to float32 for its loss; gpuce forms the
    chunk's logits in float32 directly.  Both are within bfloat16 rounding of float64."""
    model, ref = _pair("llama", dtype=torch.bfloat16)
    ids, labels = _batch(9)
    out, exp = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32
    hidden = ref.model(input_ids=ids).last_hidden_state.double()
    logits = hidden @ ref.lm_head.weight.double().T
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    f64 = torch.nn.functional.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1))
    assert abs(out.loss.item() - f64.item()) <= 1e-5 * abs(f64.item())
    assert abs(exp.loss.item() - f64.item()) <= 1e-2 * abs(f64.item())
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16


def test_z_loss_option():
    model, ref = _pair("llama")
    ids, labels = _batch(10)
    gt.patch(model, z_loss=1e-2)
    out = model(input_ids=ids, labels=labels).loss
    hidden = ref.model(input_ids=ids).last_hidden_state.double()
    logits = (hidden @ ref.lm_head.weight.double().T).reshape(-1, V)
    y = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    keep = y != -100
    lse = torch.logsumexp(logits[keep], dim=1)
    want = (lse - logits[keep].gather(1, y[keep, None])[:, 0]).mean() + 1e-2 * (lse ** 2).mean()
    assert abs(out.item() - want.item()) <= 1e-5 * want.item()


def test_copy_pickle_unpatch():
    model, ref = _pair("llama")
    ids, labels = _batch(11)
    want = ref(input_ids=ids, labels=labels).loss
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert gt.is_patched(clone)
        out = clone(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    gt.unpatch(model)
    assert not gt.is_patched(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_bad_models_and_options_are_refused():
    T = transformers
    with pytest.raises(TypeError, match="PreTrainedModel"):
        gt.patch(torch.nn.Linear(3, 4))
    base = T.LlamaModel(T.LlamaConfig(vocab_size=V, **SMALL))
    with pytest.raises(ValueError, match="causal LM"):
        gt.patch(base)
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                       ffn_dim=32, num_attention_heads=2,
                                       word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="model_type 'opt'"):
        gt.patch(opt)
    model, _ = _pair("llama")
    for bad in (dict(return_logits="yes"), dict(chunk_size=0), dict(chunk_size=2.0),
                dict(z_loss=-1.0), dict(z_loss=float("nan"))):
        with pytest.raises(ValueError):
            gt.patch(model, **bad)
    ids, labels = _batch(12)
    with pytest.raises(ValueError, match="return_logits"):
        model(input_ids=ids, labels=labels, return_logits="sometimes")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def _dataset(n, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        labels = ids.clone()
        labels[: (i * 5) % 11] = -100    # a different number of tokens in each row
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _trainer(model, tmp_path, name):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
        per_device_eval_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=_dataset(16),
                                eval_dataset=_dataset(8, seed=1))


def test_trainer_runs_with_gradient_accumulation_and_evaluation(tmp_path):
    model, ref = _pair("llama", seed=5)
    tm, tr = _trainer(model, tmp_path, "gpuce"), _trainer(ref, tmp_path, "torch")
    assert tm.model_accepts_loss_kwargs      # so it passes num_items_in_batch
    tm.train()
    tr.train()
    lm = [h["loss"] for h in tm.state.log_history if "loss" in h]
    lr = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(lm) == len(lr) == 4
    torch.testing.assert_close(torch.tensor(lm), torch.tensor(lr), rtol=1e-4, atol=1e-4)
    pm = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(pm[n], p, rtol=1e-4, atol=1e-5, msg=n)
    em, er = tm.evaluate(), tr.evaluate()
    assert abs(em["eval_loss"] - er["eval_loss"]) <= 1e-5 * er["eval_loss"]
    pred_m, pred_r = tm.predict(_dataset(4, seed=2)), tr.predict(_dataset(4, seed=2))
    assert pred_m.predictions.shape == pred_r.predictions.shape == (4, 16, V)
    torch.testing.assert_close(torch.as_tensor(pred_m.predictions),
                               torch.as_tensor(pred_r.predictions), rtol=1e-5, atol=1e-5)


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, sys, torch, transformers
    import gpuce.torch as gt
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    if sys.argv[1] == "gpuce":
        gt.patch(model)
    ids = torch.randint(0, 32000, (4, 512))
    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item()
    step()                                   # warm: the gradients' storage exists
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                         # reset the peak resident size (VmHWM)
    loss = step()
    print(status("VmHWM") - base, loss)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_of_a_training_step_at_vocabulary_32000():
    """2048 tokens x 32000 classes: the unpatched step holds float32 logits (262 MB), their
    log-softmax and gradient; the patched one only a chunk.  Each in its own process."""
    peak, loss = {}, {}
    for name in ("torch", "gpuce"):
        res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, name], capture_output=True,
                             text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        p, l = res.stdout.split()[-2:]
        peak[name], loss[name] = int(p), float(l)
    assert abs(loss["gpuce"] - loss["torch"]) <= 1e-5 * loss["torch"]
    logits_bytes = 2048 * 32000 * 4
    print(f"peak over the resting state: torch {peak['torch'] / 2**20:.0f} MiB, "
          f"gpuce {peak['gpuce'] / 2**20:.0f} MiB")
    assert peak["torch"] >= 2 * logits_bytes
    assert peak["gpuce"] <= logits_bytes / 2
