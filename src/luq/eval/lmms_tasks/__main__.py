"""``python -m luq.eval.lmms_tasks``: print the folder of luq's lmms-eval tasks (for --include_path)."""

from luq.eval.lmms_tasks import TASKS_DIR

print(TASKS_DIR)
