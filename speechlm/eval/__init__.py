"""Evaluations of a trained SpeechLM: the tasks (StoryCloze, Speech-MMLU, ASR, speaker probe), their runs behind
recipes/eval_*.py (``run_*``, sharing ``config`` and ``report``), and the run summary and token analysis."""
