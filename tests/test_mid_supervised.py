"""The supervised mid-training stage: manifest translations, task prompts, the objective, and the recipe
under DeepSpeed on 2 CPU ranks (exact resume, LoRA handed on to stage 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import make_llm, make_tokenizer, make_world, run_recipe, stage1_overrides

from speechlm.data.batching import Example, collate
from speechlm.data.manifest import Utterance, read_manifest, write_manifest
from speechlm.data.tasks import SupervisedTasks, split_template, task_draw
from speechlm.errors import ConfigError, ManifestError
from speechlm.models.connectors.base import build_connector
from speechlm.models.speechlm import SpeechLM
from speechlm.training.configs import StageMidConfig, SupervisedSettings
from speechlm.training.stages import Stage2Finetune

SUP = SupervisedSettings()


def _utt(i: int, text: str = "the cat sat", **kw) -> Utterance:
    return Utterance(id=f"u{i}", audio=f"a{i}.wav", sample_rate=16000, duration_s=1.0, text=text, split="train", **kw)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_translation_round_trips_and_bad_values_name_the_row(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [_utt(0, translation="le chat", translation_lang="French"), _utt(1)])
    rows = read_manifest(path)
    assert (rows[0].translation, rows[0].translation_lang) == ("le chat", "French")
    assert rows[1].translation is None and "translation" not in rows[1].to_json()
    for bad, why in (({"translation": ""}, "'translation' must be a non-empty string"),
                     ({"translation": 3}, "'translation' must be a non-empty string"),
                     ({"translation_lang": "German"}, "'translation_lang' given without a 'translation'")):
        row = {**_utt(2).to_json(), **bad}
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ManifestError, match=why) as e:
            read_manifest(path)
        assert "m.jsonl" in str(e.value) and "u2" in str(e.value)


# ------------------------------------------------------------------------------------------- prompts
def test_task_prompts_split_at_speech_and_answers_end_with_eos(tok):
    tasks = SupervisedTasks(tok, "the {speech} cat", "the {lang} {speech} dog", language="red", translate_ratio=1.0)
    ex = tasks.example(_utt(0, text="a big fox"))
    assert ex.task == "transcribe"  # no translation: always transcription
    assert ex.before == tok("the", add_special_tokens=False)["input_ids"]
    assert ex.after == tok("cat", add_special_tokens=False)["input_ids"]
    assert ex.target == tok("a big fox", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tr = tasks.example(_utt(1, translation="the sun"))
    assert tr.task == "translate"
    assert tr.before == tok("the red", add_special_tokens=False)["input_ids"]  # the config's language
    assert tr.target == tok("the sun", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    own = tasks.example(_utt(2, translation="the sun", translation_lang="blue"))
    assert own.before == tok("the blue", add_special_tokens=False)["input_ids"]  # the row's own language
    with pytest.raises(ConfigError, match="exactly one"):
        split_template("no placeholder", "transcribe")
    with pytest.raises(ConfigError, match="exactly one"):
        SupervisedTasks(tok, "{speech}{speech}", SUP.translate_prompt)
    with pytest.raises(ConfigError, match="translate_ratio"):
        SupervisedTasks(tok, SUP.transcribe_prompt, SUP.translate_prompt, translate_ratio=1.5)


def test_task_choice_is_a_pure_function_of_seed_row_and_epoch(tok):
    half = SupervisedTasks(tok, SUP.transcribe_prompt, SUP.translate_prompt, translate_ratio=0.5, seed=3)
    utts = [_utt(i, translation="the sun") for i in range(400)]
    first = [half.choose(u, epoch=0) for u in utts]
    assert first == [half.choose(u, epoch=0) for u in utts]  # a re-read (resume, another worker) agrees
    share = first.count("translate") / len(first)
    assert 0.4 < share < 0.6
    assert first != [half.choose(u, epoch=1) for u in utts]  # epochs differ
    assert task_draw(3, "u0", 0) == task_draw(3, "u0", 0) != task_draw(4, "u0", 0)
    never = SupervisedTasks(tok, SUP.transcribe_prompt, SUP.translate_prompt, translate_ratio=0.0)
    assert {never.choose(u) for u in utts} == {"transcribe"}


# ----------------------------------------------------------------------------------------- objective
@pytest.fixture(scope="module")
def speechlm(tmp_path_factory, tok):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llm")
    make_llm(folder, vocab=len(tok))
    llm = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    connector = build_connector({"name": "ssr", "d_enc": 8, "n_enc_layers": 1, "d_llm": 32,
                                 "d_model": 16, "n_layers": 1, "n_heads": 2})
    return SpeechLM(connector, llm, tokenizer=tok)


def _batch(tok, utts, tasks):
    examples = []
    for k, u in enumerate(utts):
        ids = tok(u.text, add_special_tokens=False)["input_ids"]
        feats = torch.randn(1, 4 * len(ids), 8, generator=torch.Generator().manual_seed(k))
        examples.append(Example(u.id, ids, [4 * i + 3 for i in range(len(ids))], features=feats,
                                task=tasks.example(u)))
    return collate(examples)


def test_supervised_objective_scores_only_the_answer(tok, speechlm):
    tasks = SupervisedTasks(tok, "the {speech} cat", "the {lang} {speech} dog", language="red", translate_ratio=1.0)
    utts = [_utt(0, text="a big fox jumps"), _utt(1, text="the sun", translation="the moon star")]
    batch = _batch(tok, utts, tasks)
    stage = Stage2Finetune(speechlm, bos_id=tok.bos_token_id, objective="supervised").train()
    loss, m = stage(batch)
    assert m["targets"] == sum(len(t.target) for t in batch.tasks)  # answers + EOS, nothing else
    # The same loss by hand: one row at a time, [BOS] before [vectors] after answer, answer positions scored.
    out = speechlm.speech_embeds(batch.features, batch.frame_lengths, batch.boundaries, batch.token_mask)
    total, count = 0.0, 0
    for b, t in enumerate(batch.tasks):
        vec = out.embeds[b][out.mask[b]]
        assert vec.shape[0] == len(tok(utts[b].text, add_special_tokens=False)["input_ids"])
        ctx = [tok.bos_token_id, *t.before]
        emb = torch.cat([speechlm.llm_embed(torch.tensor(ctx)), vec, speechlm.llm_embed(torch.tensor(t.after)),
                         speechlm.llm_embed(torch.tensor(t.target))])[None]
        logits = speechlm.lm_logits(emb, torch.ones(1, emb.shape[1], dtype=torch.long))[0]
        start = len(ctx) + vec.shape[0] + len(t.after)  # position of the answer's first token
        logp = torch.log_softmax(logits[start - 1: start - 1 + len(t.target)].float(), -1)
        total -= float(logp.gather(1, torch.tensor(t.target)[:, None]).sum().detach())
        count += len(t.target)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in speechlm.connector.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in speechlm.llm.parameters())  # the LLM stays frozen


def test_supervised_objective_needs_task_prompts_and_a_known_name(tok, speechlm):
    tasks = SupervisedTasks(tok, SUP.transcribe_prompt, SUP.translate_prompt)
    batch = _batch(tok, [_utt(0)], tasks)
    batch.tasks = None
    with pytest.raises(ConfigError, match="no task prompts"):
        Stage2Finetune(speechlm, objective="supervised")(batch)
    with pytest.raises(ConfigError, match="objective must be one of"):
        Stage2Finetune(speechlm, objective="asr")


def test_the_mid_stage_config_is_stage_2_with_the_supervised_objective():
    cfg = StageMidConfig()
    assert cfg.objective == "supervised" and cfg.leakage_utts == 0 and cfg.out_dir == "runs/mid"
    assert "{speech}" in cfg.supervised.transcribe_prompt and "{lang}" in cfg.supervised.translate_prompt


# ------------------------------------------------------------------------ recipe: 2 ranks, exact resume
STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    paths = make_world(tmp_path_factory.mktemp("midworld"))
    rows = read_manifest(paths["manifest"])
    for i, u in enumerate(rows):  # every other row has a "translation" (reversed words) in the tiny vocabulary
        if i % 2 == 0:
            u.translation = " ".join(reversed(u.text.split()))
    write_manifest(paths["manifest"], rows)
    return paths


def _mid_overrides(world, out: Path, init: Path, **extra) -> list[str]:
    over = [o for o in stage1_overrides(world, out, **{"loop.max_steps": STEPS, "loop.save_every": 2,
                                                        "loop.eval_every": 3, "loop.log_every": 1, **extra})
            if not o.startswith("model.connector")]
    return over + [f"model.init_connector={init}"]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mid_s1") / "run"
    _ok(run_recipe("stage1_distill.py", "stage1_tiny.yaml", stage1_overrides(world, out, **{"loop.max_steps": 2})))
    return out / "connector"


@pytest.mark.slow
def test_mid_stage_two_ranks_resumes_exactly_and_hands_on_to_stage_2(world, stage1, tmp_path):
    full = tmp_path / "full"
    _ok(run_recipe("stage_mid_supervised.py", "stage_mid_tiny.yaml",
                   _mid_overrides(world, full, stage1, variant="lora"), ranks=2))
    m = json.loads((full / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == STEPS and m["frozen_unchanged"]
    assert {"loss_task", "distill", "targets"} <= set(m["final_valid"]) and "loss_text" not in m["final_valid"]
    assert (full / "connector" / "model.safetensors").is_file()
    assert (full / "lora" / "adapter_config.json").is_file()
    config = (full / "config.yaml").read_text()
    assert "objective: supervised" in config and "translate_prompt" in config

    crashed = tmp_path / "crashed"
    proc = run_recipe("stage_mid_supervised.py", "stage_mid_tiny.yaml",
                      _mid_overrides(world, crashed, stage1, variant="lora", **{"loop.crash_after": 3}), ranks=2)
    assert proc.returncode != 0 and (crashed / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    _ok(run_recipe("stage_mid_supervised.py", "stage_mid_tiny.yaml",
                   _mid_overrides(world, crashed, stage1, variant="lora"), ranks=2))
    resumed = json.loads((crashed / "metrics.json").read_text())
    assert resumed["train_losses"] == pytest.approx(m["train_losses"], rel=1e-6)  # same tasks, same batches

    # Stage 2 starts from the mid-stage's connector and LoRA (kept frozen with variant=frozen).
    s2 = tmp_path / "s2"
    over = [o for o in stage1_overrides(world, s2, **{"loop.max_steps": 2, "loop.save_every": 2})
            if not o.startswith("model.connector")]
    over += [f"model.init_connector={full / 'connector'}", f"model.init_lora={full / 'lora'}", "leakage_utts=2"]
    _ok(run_recipe("stage2_finetune.py", "stage2_tiny.yaml", over))
    s2m = json.loads((s2 / "metrics.json").read_text())
    assert s2m["steps"] == 2 and s2m["frozen_unchanged"] and "loss_speech" in s2m["final_valid"]
