"""The GPU check's short stage-1 run: eSpeak speech of a few sentences, the random w2v-BERT 2.0 and an LLM of
Llama-3-8B's width, trained by the library's stage-1 run with the real config: does the loss fall?"""

from __future__ import annotations

import shutil
import statistics
import time

from speechlm.perf.gpu_check.context import STAGE_CONFIGS, Ctx, ds_json
from speechlm.perf.gpu_check.dist import no_cpu_shm_jit
from speechlm.perf.shapes import ENCODERS, build_encoder_folder, build_llama, random_clips, word_tokenizer

SENTENCES = [
    "the cat sat on the warm mat", "a dog ran across the green field", "she reads a book every night",
    "the sun rises over the quiet hills", "we walked to the market in the morning",
    "my brother plays the piano very well", "the children laughed at the funny clown",
    "a small bird sang in the old tree", "he drinks a cup of coffee at noon", "the train left the station late",
    "they planted flowers in the garden", "the river flows to the distant sea", "please close the door behind you",
    "the teacher wrote a long sentence on the board", "my mother baked fresh bread today",
    "the wind blew the leaves off the trees", "a red car stopped at the corner", "we watched the stars after dinner",
    "the baby slept through the whole night", "he found his keys under the chair",
    "the shop opens at nine every day", "she painted a picture of the ocean", "the old man walked with a cane",
    "our team won the game last week", "the snow covered the roofs of the town", "i like to swim in the lake",
    "the farmer feeds the cows each morning", "a cold wind came from the north", "the students listened to the story",
    "he cut the apple into four pieces", "the lamp on the desk is very bright", "we heard music from the next room",
    "the boat sailed slowly along the coast", "my sister writes letters to her friend",
    "the clock on the wall stopped at midnight", "a young girl picked a basket of berries",
    "the soup was too hot to eat", "they built a house near the forest", "the dog barked at the passing truck",
    "she wore a blue dress to the party", "the rain fell softly on the window", "he fixed the broken wheel of the bike",
    "the moon was full and bright tonight", "we packed our bags for the long trip",
    "the horse jumped over the wooden fence", "a gentle voice called from the hall", "the fish swam under the bridge",
    "the kettle whistled in the kitchen",
]


def speech(ctx: Ctx, sentences: list[str]) -> list:
    """(wave, word end times) per sentence: eSpeak with its word timings; without eSpeak, random audio with
    evenly spaced words (said so in the result's ``audio_source``)."""
    source = "espeak (speechlm.data.tts.synthesize, voice en-us, word timings from its phoneme events)"
    audio = []
    try:
        from speechlm.data.tts import synthesize

        for text in sentences:
            s = synthesize(text, voice="en-us", sample_rate=16000)
            if s.words is None or len(s.words) != len(text.split()):
                raise RuntimeError(f"eSpeak gave no word timings for {text!r}")
            audio.append((s.wave, [w.end_s for w in s.words]))
    except Exception as e:  # noqa: BLE001 -- e.g. espeakng_loader missing: fall back, and say so
        source = f"RANDOM AUDIO (eSpeak unavailable: {type(e).__name__}: {e}); evenly spaced word boundaries"
        audio = []
        for i, text in enumerate(sentences):
            n = len(text.split())
            dur = 0.35 * n + 0.3
            wave = random_clips(1, dur, seed=100 + i)[0]
            audio.append((wave, [0.15 + 0.35 * (k + 1) for k in range(n)]))
    ctx.put("audio_source", source)
    return audio


def part_stage1_run(ctx: Ctx) -> None:
    import torch

    from speechlm.config import load_config
    from speechlm.data.audio import save_audio
    from speechlm.data.feature_cache import build_feature_cache
    from speechlm.data.manifest import Utterance, write_manifest
    from speechlm.models.encoder import SpeechEncoder
    from speechlm.training.configs import Stage1Config
    from speechlm.training.preemption import install_stop_handlers
    from speechlm.training.stage_runs import run_stage1

    a = ctx.args
    root = ctx.work / "stage1_run"
    shutil.rmtree(root, ignore_errors=True)
    (root / "audio").mkdir(parents=True)
    t0 = time.perf_counter()
    sentences = SENTENCES[: a.run_sentences]
    audio = speech(ctx, sentences)
    ctx.put("synthesis_s", time.perf_counter() - t0)
    ctx.put("utterances", len(sentences))
    ctx.put("audio_s", sum(w.numel() for w, _ in audio) / 16000)

    # models: the random w2v-BERT 2.0 (or its tiny stand-in), an LLM folder of Llama-3-8B's width with one
    # layer (stage 1 reads only its input-embedding table) and a word-level tokenizer over the sentences
    t0 = time.perf_counter()
    enc_folder = build_encoder_folder("w2v-bert", ctx.work / "models" / (ENCODERS["w2v-bert"][0]
                                                                          + ("-tiny" if ctx.tiny else "")),
                                      ctx.tiny, ctx.device)
    llm_folder = root / "llm"
    tok = word_tokenizer(sorted({w for s in sentences for w in s.split()}), llm_folder)
    llm = build_llama("tiny" if ctx.tiny else "8b", ctx.device, ctx.dtype(), vocab=len(tok), layers=1)
    llm.config.bos_token_id, llm.config.eos_token_id, llm.config.pad_token_id = 1, 2, 0
    llm.save_pretrained(llm_folder)
    del llm
    encoder = SpeechEncoder(str(enc_folder), dtype=ctx.dtype()).to(ctx.device)
    ctx.put("models_s", time.perf_counter() - t0)

    rows = []
    for i, (text, (wave, ends)) in enumerate(zip(sentences, audio)):
        path = root / "audio" / f"u{i:03d}.wav"
        save_audio(path, wave, 16000)
        frames = int(encoder.frame_lengths(torch.tensor([wave.numel()]))[0])
        bnd, prev = [], 0
        for end in ends:
            prev = min(frames - 1, max(prev, int(end * encoder.frame_rate_hz)))
            bnd.append(prev)
        split = "valid" if i % 6 == 5 else "train"
        rows.append(Utterance(id=f"u{i:03d}", audio=str(path), sample_rate=16000, duration_s=wave.numel() / 16000,
                              text=text, split=split, token_boundaries=bnd,
                              boundary_frame_rate_hz=encoder.frame_rate_hz))
    write_manifest(root / "train.jsonl", [r for r in rows if r.split == "train"])
    write_manifest(root / "valid.jsonl", [r for r in rows if r.split == "valid"])
    t0 = time.perf_counter()
    for split in ("train", "valid"):
        build_feature_cache(root / f"{split}.jsonl", encoder, root / "features" / split, batch_size=16)
    ctx.put("cache_s", time.perf_counter() - t0)
    del encoder

    # the command line of recipes/stage1_distill.py that this run is (recorded; run in this process)
    argv = ["--config", str(STAGE_CONFIGS[1]), f"out_dir={root / 'out'}", f"model.llm={llm_folder}",
            f"model.encoder={enc_folder}", f"data.train_manifest={root / 'train.jsonl'}", "data.train_shards=",
            f"data.valid_manifest={root / 'valid.jsonl'}", f"data.feature_cache={root / 'features' / 'train'}",
            f"data.valid_feature_cache={root / 'features' / 'valid'}", "data.num_workers=0",
            f"loop.max_steps={a.run_steps}", "loop.eval_every=0", "loop.save_every=0", "loop.log_every=10",
            "loop.progress=false", "loop.resume=false", f"engine.warmup_steps={max(1, a.run_steps // 10)}",
            f"engine.ds_config={ds_json(ctx, 2)}",
            f"engine.precision={'bf16' if ctx.gpu else 'fp32'}"]
    if ctx.tiny:
        argv += ["model.connector.d_model=32", "model.connector.n_heads=2"]
    if a.threads:
        argv += [f"engine.threads={a.threads}"]
    ctx.put("argv", argv)
    no_cpu_shm_jit(ctx)
    t0 = time.perf_counter()
    install_stop_handlers()  # as the recipe does before it loads its config
    r = run_stage1(load_config(Stage1Config, STAGE_CONFIGS[1], argv[2:]))
    losses = r["train_losses"]
    k = max(1, min(10, len(losses) // 4))
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    ctx.put("run", {"wall_s": time.perf_counter() - t0, "steps": r["steps"], "step_s_median": r["step_time_s_median"],
                    "loss_first_mean": first, "loss_last_mean": last, "loss_ratio": last / first,
                    "losses_every_10": losses[::10], "final_valid": r["final_valid"],
                    "frozen_unchanged": r.get("frozen_unchanged")})
    ctx.check("loss_falls", last < a.run_ratio * first)
    ctx.check("frozen_unchanged", bool(r.get("frozen_unchanged")))
