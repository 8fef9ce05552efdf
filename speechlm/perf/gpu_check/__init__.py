"""The GPU check (tools/gpu_check.py, tools/gpu_check.sh): its command line (cli), the parts it runs and their
order (orchestrate, parts, stage1_run), their shared context and report, and the install plan of the carried
wheels. Kept import-light: ``--plan-install`` runs before the GPU machine has its wheels (standard library only)."""
