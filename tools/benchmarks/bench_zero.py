"""DeepSpeed ZeRO stages 0 / 2 / 3 for stage 2: measured on 2 CPU ranks, projected for Llama-3-8B on 8 GPUs.

    python tools/benchmarks/bench_zero.py --steps 12 --master-port 29561
    python tools/benchmarks/bench_zero.py --projection-only          # the second table alone, no training

**Measured.** ``recipes/stage2_finetune.py`` with ``--config`` (default ``recipes/configs/stage2_small.yaml``),
the same data, seed and ``--steps`` steps under ``engine.zero_stage`` 0, 2 and 3: one ``deepspeed
--num_gpus 2`` launcher run per stage, each into ``--work-dir/zero{S}`` (removed first, so nothing resumes).
Validation and checkpoints are pushed out of the timed steps (``loop.eval_every=0 loop.save_every=0
leakage_utts=0``; the final validation that every run ends with reads ``--valid-max-utts`` rows). The
ranks are watched from outside (the launcher's children's children, found with psutil): their
``/proc/<pid>/status`` is read every ``--poll-s`` seconds for ``VmHWM`` (the kernel's peak resident set of
the whole process: model load, DeepSpeed init, steps, final validation) and ``VmRSS`` / ``RssAnon`` /
``RssShmem``, whose maxima are kept for the window between the ranks' "step 1" and "step N" log lines
(steps 2..N only). To get those lines the ranks run ``speechlm.perf.zero.rank`` (``deepspeed --module``: it
turns the ``speechlm`` logger on and runs the recipe unchanged with ``loop.log_every=1``). Step time is the run's
``metrics.json`` ``step_time_s_median``; the train losses of the stages are compared step by step.
Trainable / frozen parameters are counted from the safetensors headers of the connector and the LLM
(nothing loaded). DeepSpeed's CPU shared-memory all-reduce buffers that a run leaves in ``/dev/shm``
(``deepspeed_allreduce_buffer_*_<port>_*``, 66 MB per rank, never removed by DeepSpeed) are removed
after each run when this run created them (``--keep-shm`` keeps them).

**Projected** (``--real-config``, default ``recipes/configs/librispeech_llama3_stage2.yaml``): memory per GPU
on ``--gpus`` GPUs under ZeRO-2 and ZeRO-3 for the frozen Meta-Llama-3-8B (bf16; its shape from
``speechlm.perf.shapes.llama_config("8b")``, built on the meta device), w2v-BERT 2.0 (built the same way;
loaded on every rank only when the config needs it: no feature cache, or ``leakage_utts`` > 0) and the SSR
connector built by ``speechlm.training.build.make_connector`` from that config; the DeepSpeed settings are
``engine.ds_config`` as ``speechlm.training.engine.ds_config`` builds it. Formulas: ``speechlm/perf/zero/memory.py``
(``model_states``, ``llm_activations``, ``connector_activations``, ``zero_buffers``); every assumption is printed and
written to the JSON (``projection.assumptions``).

Writes ``--out`` (JSON, atomically; default ``--work-dir/report.json``), a PNG (``--plot``) and prints both
tables as markdown with the machine's load average, because the timings are taken on a shared machine.
"""

from __future__ import annotations

import sys

from speechlm.perf.zero.cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.splitlines()[0]))
