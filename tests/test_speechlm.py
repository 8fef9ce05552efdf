"""SpeechLM around a tiny random Llama: freezing, input building, scoring, generation, LoRA, save/load."""

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from speechlm import paths
from speechlm.errors import CheckpointError, ModelError
from speechlm.models.connectors import build_connector, load_connector
from speechlm.models.speechlm import SpeechLM, SpeechSegment, TextSegment

D_ENC, D_LLM, VOCAB = 16, 64, 100


def tiny_llm(hidden=D_LLM, vocab=VOCAB, name=""):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=False)
    llm = LlamaForCausalLM(cfg).eval()
    llm.config._name_or_path = name
    return llm


def tiny_ssr(**kw):
    return build_connector({"name": "ssr", "d_enc": D_ENC, "d_llm": D_LLM, "d_model": 32, "n_heads": 4,
                            "n_layers": 2, **kw})


def speech_batch():
    feats = torch.randn(2, 1, 40, D_ENC)
    lengths = torch.tensor([40, 25])
    feats[1, :, 25:] = 0
    bnd = torch.tensor([[4, 9, 20, 39], [6, 24, 0, 0]])
    tmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    ids = [[11, 12, 13, 14], [21, 22]]
    return feats, lengths, bnd, tmask, ids


def ntp_loss(model, feats, lengths, bnd, tmask, ids):
    out = model.speech_embeds(feats, lengths, bnd, tmask)
    segs = model.speech_segments(out, ids, target=True)
    inputs = model.build_inputs([[TextSegment([1]), s] for s in segs])
    logits = model.lm_logits(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), inputs.labels[:, 1:].reshape(-1), ignore_index=-100)


def manual_logprobs(llm, pieces):
    """log_softmax of the LLM over the plain concatenation of embedding pieces (one example, no padding)."""
    x = torch.cat(pieces)[None]
    with torch.no_grad():
        return F.log_softmax(llm(inputs_embeds=x).logits[0].float(), -1)


def test_training_changes_connector_only():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    assert not any(p.requires_grad for p in model.llm.parameters())
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    conn_before = {k: v.clone() for k, v in model.connector.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    assert model.connector.training and not model.llm.training
    for _ in range(3):
        loss = ntp_loss(model, *speech_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm_before.items())
    changed = [k for k, v in conn_before.items() if not torch.equal(v, model.connector.state_dict()[k])]
    assert len(changed) == len(conn_before)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.connector.parameters()}


def test_labels_and_padding_sides_agree():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    v = torch.randn(3, D_LLM)
    batch = [[TextSegment([1, 2]), SpeechSegment(v, ids=[5, 6, 7], target=True)], [TextSegment([3, 4, 8], target=True)]]
    right = model.build_inputs(batch, "right")
    left = model.build_inputs(batch, "left")
    assert right.labels.tolist() == [[-100, -100, 5, 6, 7], [3, 4, 8, -100, -100]]
    assert left.labels[1].tolist() == [-100, -100, 3, 4, 8] and left.position_ids[1].tolist() == [0, 0, 0, 1, 2]
    assert torch.equal(right.inputs_embeds[0, 2:], v)
    with torch.no_grad():
        lr = model.lm_logits(right.inputs_embeds, right.attention_mask, right.position_ids)
        ll = model.lm_logits(left.inputs_embeds, left.attention_mask, left.position_ids)
    assert torch.allclose(lr[1, :3], ll[1, 2:], atol=1e-5) and torch.allclose(lr[0], ll[0], atol=1e-5)


def test_score_equals_manual_computation():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    e = model.llm_embed
    v = torch.randn(4, D_LLM)
    prefixes = [[TextSegment([1, 5, 7]), SpeechSegment(v)], [TextSegment([2])]]
    conts = [[9, 11, 13], [40, 41]]
    scores = model.score(prefixes, conts)
    lp = manual_logprobs(model.llm, [e(torch.tensor([1, 5, 7])), v, e(torch.tensor([9, 11, 13]))])
    expected = torch.stack([lp[6, 9], lp[7, 11], lp[8, 13]])
    assert torch.allclose(scores[0], expected, atol=1e-5)
    lp = manual_logprobs(model.llm, [e(torch.tensor([2, 40, 41]))])
    assert torch.allclose(scores[1], torch.stack([lp[0, 40], lp[1, 41]]), atol=1e-5)
    assert torch.allclose(scores[0].sum(), expected.sum(), atol=1e-5)
    with pytest.raises(ValueError, match="BOS"):
        model.score([[]], [[3]])


def test_speech_condition_scores_transcript_tokens():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    v = torch.randn(3, D_LLM)
    scores = model.score_speech([[TextSegment([1, 4])]], [SpeechSegment(v, ids=[20, 21, 22])])
    lp = manual_logprobs(model.llm, [model.llm_embed(torch.tensor([1, 4])), v])
    # Position 1 (last prefix token) predicts token 0; speech position i predicts token i+1.
    assert scores[0].shape == (3,)
    assert torch.allclose(scores[0], torch.stack([lp[1, 20], lp[2, 21], lp[3, 22]]), atol=1e-5)
    other = model.score_speech([[TextSegment([1, 4])]], [SpeechSegment(v, ids=[20, 21, 23])])
    assert torch.equal(other[0][:2], scores[0][:2]) and other[0][2] != scores[0][2]


def test_bf16_llm_with_fp32_connector_scores_like_fp32():
    """Evaluation with dtype=bf16 (eval_dtype): fp32 connector vectors enter a bf16 LLM; scores come back
    float32 and close to the fp32 model's."""
    import copy

    torch.manual_seed(0)
    connector, llm = tiny_ssr(), tiny_llm()
    feats, lengths, bnd, tmask, ids = speech_batch()
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = SpeechLM(connector, copy.deepcopy(llm).to(dtype))
        with torch.no_grad():
            segs = model.speech_segments(model.speech_embeds(feats, lengths, bnd, tmask), ids)
        scores[dtype] = model.score([[TextSegment([1]), segs[0]]], [[30, 31]])[0]
    assert scores[torch.bfloat16].dtype == torch.float32
    assert torch.allclose(scores[torch.bfloat16], scores[torch.float32], atol=0.1)
    assert not torch.equal(scores[torch.bfloat16], scores[torch.float32])  # it really ran in bf16


def rigged_llm():
    """A Llama whose layers do nothing and whose head maps token x to x+1: greedy output is predictable."""
    llm = tiny_llm()
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = llm.model.embed_tokens.weight
        llm.lm_head.weight.copy_(F.normalize(torch.roll(emb, 1, dims=0), dim=-1))  # row j = E[j-1]
    return llm


def test_generate_with_rigged_llm():
    model = SpeechLM(tiny_ssr(), rigged_llm())
    prefixes = [[SpeechSegment(torch.randn(5, D_LLM)), TextSegment([10])], [TextSegment([1, 2, 3, 50])]]
    assert model.generate(prefixes, max_new_tokens=6, eos=14) == [[11, 12, 13], [51, 52, 53, 54, 55, 56]]
    # EOS as the very next token: nothing comes out, unless a first token is required
    assert model.generate([[TextSegment([50])]], max_new_tokens=4, eos=51) == [[]]
    forced = model.generate([[TextSegment([50])]], max_new_tokens=4, eos=51, min_new_tokens=1)[0]
    assert forced and forced[0] != 51


def test_generate_matches_uncached_greedy():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    prefixes = [[TextSegment([1, 2]), SpeechSegment(torch.randn(4, D_LLM))], [TextSegment([7])]]
    got = model.generate(prefixes, max_new_tokens=5)
    for prefix, tokens in zip(prefixes, got):
        pieces = [model.llm_embed(torch.tensor(s.ids)) if isinstance(s, TextSegment) else s.embeds for s in prefix]
        expected = []
        for _ in range(5):
            nxt = int(manual_logprobs(model.llm, pieces)[-1].argmax())
            expected.append(nxt)
            pieces.append(model.llm_embed(torch.tensor([nxt])))
        assert tokens == expected


def test_lora_trains_only_lora_params():
    model = SpeechLM(tiny_ssr(), tiny_llm())
    model.apply_lora(r=4, alpha=8)
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        loss = ntp_loss(model, *speech_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.llm.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in base_before.items())
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)  # lora_B starts at zero


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = SpeechLM(tiny_ssr(), tiny_llm(), gradient_checkpointing=ckpt).train()
        torch.manual_seed(1)
        ntp_loss(model, *speech_batch()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.connector.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_load_roundtrip_and_mismatches(tmp_path):
    llm = tiny_llm(name="/models/tiny-llama")
    model = SpeechLM(tiny_ssr(n_enc_layers=1), llm)
    model.connector.init_output_bias(llm.get_input_embeddings().weight.mean(0))
    folder = tmp_path / "conn"
    model.connector.save_pretrained(folder)
    feats, lengths, bnd, tmask, _ = speech_batch()
    loaded = load_connector(folder, llm=llm)
    with torch.no_grad():
        assert torch.equal(model.connector(feats, lengths, bnd, tmask).embeds, loaded(feats, lengths, bnd, tmask).embeds)
    again = SpeechLM.from_pretrained(folder, llm=tiny_llm(name="/elsewhere/tiny-llama"))
    assert again.connector.cfg.llm_name == "tiny-llama" and again.connector.cfg.llm_vocab_size == VOCAB

    with pytest.raises(ModelError, match="hidden size 32"):
        load_connector(folder, llm=tiny_llm(hidden=32, name="tiny-llama"))
    with pytest.raises(ModelError, match="other-llm"):
        load_connector(folder, llm=tiny_llm(name="other-llm"))
    with pytest.raises(ModelError, match="vocab"):
        load_connector(folder, llm=tiny_llm(vocab=120, name="tiny-llama"))
    enc = types.SimpleNamespace(name="/x/whisper-base", hidden_size=D_ENC + 1, layers=[-1], frame_rate_hz=50.0)
    with pytest.raises(ModelError, match="d_enc"):
        load_connector(folder, encoder=enc)
    with pytest.raises(ModelError, match="config not found"):
        load_connector(tmp_path / "nothing")

    weights = folder / "model.safetensors"
    tiny_ssr(d_model=48).save_pretrained(tmp_path / "other")  # same type, other shapes
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=str(weights)):
        load_connector(folder)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=str(weights)):
        load_connector(folder)


def test_connector_must_fit_llm():
    with pytest.raises(ModelError, match="d_llm=64"):
        SpeechLM(tiny_ssr(), tiny_llm(hidden=32))


@pytest.mark.slow
def test_real_smollm2_scores_ssr_speech(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechlm.models.convert import prepare_model

    folder, _ = prepare_model(paths.SMOLLM2_135M)  # reuses a complete folder, converts otherwise
    tok = AutoTokenizer.from_pretrained(folder)
    llm = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    d_llm = llm.config.hidden_size
    conn = build_connector({"name": "ssr", "d_enc": 512, "d_llm": d_llm, "n_layers": 2, "stack": 4})
    model = SpeechLM(conn, llm, tokenizer=tok)
    model.connector.init_output_bias(llm.get_input_embeddings().weight.mean(0))
    ids = tok("The cat sat on the mat.")["input_ids"]
    feats = torch.randn(1, 1, 150, 512)
    bnd = torch.linspace(10, 149, len(ids)).long()[None]
    with torch.no_grad():
        out = model.speech_embeds(feats, torch.tensor([150]), bnd)
    assert out.embeds.shape == (1, len(ids), d_llm)
    speech = model.speech_segments(out, [ids])[0]
    bos = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    ending = tok(" It was happy.")["input_ids"]
    text_score = model.score([[TextSegment(bos + ids)]], [ending])[0]
    speech_score = model.score([[TextSegment(bos), speech]], [ending])[0]
    s_score = model.score_speech([[TextSegment(bos)]], [speech])[0]
    assert text_score.shape == speech_score.shape == (len(ending),) and s_score.shape == (len(ids),)
    assert all(torch.isfinite(s).all() and (s <= 0).all() for s in (text_score, speech_score, s_score))
    # A fluent text context makes the ending likelier than untrained speech vectors do.
    assert text_score.sum() > speech_score.sum()
    # Cached greedy decoding from inputs_embeds agrees with HF's own greedy decoding from ids.
    ours = model.generate([[TextSegment(bos + ids)]], max_new_tokens=6)[0]
    theirs = llm.generate(torch.tensor([bos + ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.eos_token_id)[0, len(ids) + 1:].tolist()
    assert ours == theirs
    # The connector folder + the LLM folder load back into the same model in one call.
    model.connector.save_pretrained(tmp_path / "conn")
    again = SpeechLM.from_pretrained(tmp_path / "conn", llm=folder)
    assert again.connector.cfg.llm_name == folder.name and again.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(again.speech_embeds(feats, torch.tensor([150]), bnd).embeds, out.embeds)
