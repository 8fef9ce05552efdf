"""What only a CUDA GPU can show, on random models of the real architectures (skipped without a GPU).

Run by tools/gpu_check.sh (``pytest -m gpu tests/test_gpu.py``), which sets SPEECHLM_GPU_CHECK_WORK (reuse
its random w2v-BERT 2.0 / Whisper large-v3 folders) and SPEECHLM_GPU_CHECK_METRICS (a JSON-lines file the
measured cosines go to, for its report). Each test also prints its numbers.

* bf16 against fp32 on the same input: the SSR connector of the real recipe and both encoders;
* Whisper's variable-length (masked) batch on CUDA: a clip in a batch gives its features alone;
* the SSR causal / blockwise masks under CUDA's SDPA kernels: the same outputs and gradients as the math
  backend, and no information from the frames a mask hides;
* the frozen LLM bit-identical after an optimizer step (bf16, activation checkpointing).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from speechlm.perf import shapes

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")]

SR = 16_000
# The SSR of recipes/configs/librispeech_llama3_stage1.yaml, sized for w2v-BERT 2.0 -> Llama-3-8B.
SSR = {"name": "ssr", "d_enc": 1024, "d_llm": 4096, "d_model": 1024, "n_layers": 4, "n_heads": 16, "stack": 1,
       "readout": "boundary", "dropout": 0.0, "rope": False}


def record(name: str, **values) -> None:
    print(name, values)
    path = os.environ.get("SPEECHLM_GPU_CHECK_METRICS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **values}) + "\n")


@contextlib.contextmanager
def exact_fp32():
    """fp32 references without TF32 (matmuls and cuDNN convolutions)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]),
                                                 dim=-1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = os.environ.get("SPEECHLM_GPU_CHECK_WORK")
    return Path(w) if w else tmp_path_factory.mktemp("gpu")


def encoder_folder(work: Path, kind: str) -> str:
    return str(shapes.build_encoder_folder(kind, work / "models" / shapes.ENCODERS[kind][0], tiny=False,
                                           device="cuda"))


def ssr_batch(t: int = 600, n: int = 30, seed: int = 0):
    """Features (4, 1, T, 1024) of four clips of different lengths, each with n tokens spread over its frames
    (the shortest with fewer tokens: padding in both axes)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, t * 3 // 4, t // 2, t // 5])
    feats = torch.randn(4, 1, t, SSR["d_enc"], generator=g)
    bnd = torch.zeros(4, n, dtype=torch.long)
    mask = torch.zeros(4, n, dtype=torch.bool)
    for i, length in enumerate(lengths.tolist()):
        k = n if i < 3 else n // 3
        bnd[i, :k] = torch.linspace(0, length - 1, k + 1)[1:].round().long()
        mask[i, :k] = True
        feats[i, :, length:] = 0
    return feats, lengths, bnd, mask


def build_ssr(mask: str):
    from speechlm.models.connectors import build_connector

    torch.manual_seed(0)
    return build_connector({**SSR, "mask": mask}).eval()


def cuda_bf16_ssr(mask: str, seed: int):
    """``build_ssr(mask)`` in bf16 on CUDA and ``ssr_batch(seed=seed)`` for it: (connector, features in bf16 on
    CUDA, lengths, boundaries, token mask (these three on the CPU), the connector's other arguments on CUDA)."""
    conn = build_ssr(mask).cuda().to(torch.bfloat16)
    feats, lengths, bnd, tmask = ssr_batch(seed=seed)
    return conn, feats.cuda().bfloat16(), lengths, bnd, tmask, (lengths.cuda(), bnd.cuda(), tmask.cuda())


# --------------------------------------------------------------------------------------- precision
def test_bf16_training_is_selected_on_this_gpu():
    from speechlm.training.deepspeed_engine import EngineConfig, ds_config

    conf = ds_config(EngineConfig(precision="bf16", ds_config=str(ROOT / "recipes" / "ds" / "zero2_gpu.json")))
    assert conf["bf16"]["enabled"] is True


@pytest.mark.parametrize("mask", ["causal", "blockwise"])
def test_ssr_connector_bf16_matches_fp32(mask):
    conn = build_ssr(mask).cuda()
    feats, lengths, bnd, tmask = ssr_batch()
    args = (lengths.cuda(), bnd.cuda(), tmask.cuda())
    with torch.no_grad(), exact_fp32():
        ref = conn(feats.cuda(), *args).embeds
        half = copy.deepcopy(conn).to(torch.bfloat16)(feats.cuda().bfloat16(), *args).embeds
    cos = cosines(half[tmask.cuda()], ref[tmask.cuda()])
    record(f"ssr_bf16_vs_fp32[{mask}]", cos_mean=float(cos.mean()), cos_min=float(cos.min()))
    assert torch.isfinite(half).all()
    assert float(cos.mean()) > 0.999 and float(cos.min()) > 0.99


@pytest.mark.parametrize("kind", ["w2v-bert", "whisper"])
def test_encoder_bf16_matches_fp32(work, kind):
    from speechlm.models.encoder import SpeechEncoder

    folder = encoder_folder(work, kind)
    g = torch.Generator().manual_seed(1)
    waves = [0.1 * torch.randn(int(s * SR), generator=g) for s in (7.3, 12.0)]
    with exact_fp32():
        full = SpeechEncoder(folder, dtype=torch.float32).cuda()
        ref = full(waves)
        del full
        half = SpeechEncoder(folder, dtype=torch.bfloat16).cuda()(waves)
    assert torch.equal(ref.lengths, half.lengths)
    valid = torch.arange(ref.features.shape[2])[None, :] < ref.lengths[:, None]  # (B, T)
    cos = cosines(half.features[:, 0][valid.cuda()], ref.features[:, 0][valid.cuda()])
    record(f"encoder_bf16_vs_fp32[{kind}]", cos_mean=float(cos.mean()), cos_p01=float(cos.quantile(0.01)),
           cos_min=float(cos.min()), frames=int(valid.sum()))
    assert torch.isfinite(half.features).all()
    assert float(cos.mean()) > 0.99 and float(cos.quantile(0.01)) > 0.95


# --------------------------------------------------------------------------------- variable length
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_whisper_variable_length_batch_on_cuda(work, dtype):
    """A short clip batched with a longer one (masked attention, zeroed conv padding) = the clip alone."""
    from speechlm.models.encoder import SpeechEncoder

    enc = SpeechEncoder(encoder_folder(work, "whisper"), dtype=dtype).cuda()
    assert not enc.whisper_pad_to_30s
    g = torch.Generator().manual_seed(2)
    short, long = 0.1 * torch.randn(int(6.4 * SR), generator=g), 0.1 * torch.randn(int(17.0 * SR), generator=g)
    with exact_fp32():
        alone = enc([short])
        both = enc([long, short])
    n = int(alone.lengths[0])
    assert int(both.lengths[1]) == n == int(enc.frame_lengths(torch.tensor([short.numel()]))[0])
    cos = cosines(both.features[1, 0, :n], alone.features[0, 0, :n])
    diff = (both.features[1, 0, :n] - alone.features[0, 0, :n]).abs().max() / alone.features[0, 0, :n].abs().max()
    name = str(dtype).removeprefix("torch.")
    record(f"whisper_variable_length[{name}]", cos_min=float(cos.min()), max_rel_diff=float(diff))
    assert float(cos.min()) > (0.9999 if dtype == torch.float32 else 0.99)


# ---------------------------------------------------------------------------------- SDPA kernels
@pytest.mark.parametrize("mask", ["causal", "blockwise"])
def test_ssr_masks_under_cuda_sdpa_kernels_match_math(mask):
    """Default CUDA kernel choice and memory-efficient attention vs the math backend: outputs and gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    conn, feats, _, _, tmask, args = cuda_bf16_ssr(mask, seed=3)

    def run(backends):
        conn.zero_grad(set_to_none=True)
        ctx = sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()
        with ctx:
            out = conn(feats, *args).embeds
            out.float().square().sum().backward()
        grad = torch.cat([p.grad.float().reshape(-1) for p in conn.parameters() if p.grad is not None])
        return out.detach(), grad

    math_out, math_grad = run([SDPBackend.MATH])
    results = {}
    for label, backends in (("default", None), ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
        out, grad = run(backends)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), label
        cos = cosines(out[tmask.cuda()], math_out[tmask.cuda()])
        gcos = float(torch.nn.functional.cosine_similarity(grad, math_grad, dim=0))
        results[label] = {"cos_min": float(cos.min()), "grad_cos": gcos}
        assert float(cos.min()) > 0.995 and gcos > 0.99, (label, results[label])
    record(f"ssr_sdpa_vs_math[{mask}]", **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()})


@pytest.mark.parametrize("mask", ["causal", "blockwise"])
def test_ssr_masked_frames_do_not_leak_on_cuda(mask):
    """Changing frames a token's mask hides leaves its vector unchanged under the CUDA kernels (bf16)."""
    conn, feats, lengths, bnd, tmask, args = cuda_bf16_ssr(mask, seed=4)
    row, n = 0, int(tmask[0].sum())
    if mask == "causal":  # frames after token k's boundary are its future
        k = n // 2
        cut = int(bnd[row, k]) + 1
        keep = slice(0, k + 1)
    else:  # blockwise: frames after the second-to-last boundary belong to the last token's segment only
        cut = int(bnd[row, n - 2]) + 1
        keep = slice(0, n - 1)
    other = feats.clone()
    other[row, :, cut:int(lengths[row])] = torch.randn_like(other[row, :, cut:int(lengths[row])])
    with torch.no_grad():
        a = conn(feats, *args).embeds[row, keep]
        b = conn(other, *args).embeds[row, keep]
        changed = (conn(other, *args).embeds[row, n - 1] - conn(feats, *args).embeds[row, n - 1]).abs().max()
    record(f"ssr_mask_leak[{mask}]", max_abs_diff=float((a - b).abs().max()), last_token_diff=float(changed))
    assert torch.equal(a, b)
    assert float(changed) > 0  # the perturbation does reach the tokens that may see it


# ------------------------------------------------------------------------------------ frozen LLM
def test_frozen_llm_unchanged_after_a_step_on_cuda():
    """Stage 2's module (bf16, activation checkpointing, distill mix) on CUDA: an AdamW step moves the
    connector and leaves every LLM weight bit-identical, with no gradient kept for it."""
    from speechlm.models.connectors import build_connector
    from speechlm.models.speechlm import SpeechLM
    from speechlm.training.stages import Stage2Finetune

    llm = shapes.build_llama("1b", "cuda", torch.bfloat16, layers=2)  # Llama-3.2-1B's shape, 2 layers
    torch.manual_seed(0)
    conn = build_connector({**SSR, "d_llm": llm.config.hidden_size, "mask": "causal"}).cuda().to(torch.bfloat16)
    model = Stage2Finetune(SpeechLM(conn, llm, gradient_checkpointing=True), bos_id=llm.config.bos_token_id,
                           distill_weight=0.5).train()
    assert llm.training and llm.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    conn_before = {n: p.detach().clone() for n, p in conn.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = shapes.synthetic_batch(4, 600, 40, SSR["d_enc"], llm.config.vocab_size)
    batch = batch.to("cuda", torch.bfloat16)
    loss, _metrics = model(batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in llm.parameters())
    assert all(torch.equal(p, before[n]) for n, p in llm.named_parameters())
    moved = sum(not torch.equal(p, conn_before[n]) for n, p in conn.named_parameters())
    record("frozen_llm_step", loss=float(loss), trained_tensors_changed=int(moved), llm_tensors=len(before))
    assert moved > 0
