"""Run directory format v1: file names and columns shared by the writer and the reader.

See docs/run-format.md. The logger imports this module, so it stays stdlib-only.
"""
FORMAT_VERSION = 1

META_FILE = "run.json"                  # metadata, written once (atomically) at start
TRAIN_FILE = "train.csv"                # one row per logged step
CLASS_FILE = "class_losses.csv"         # one row per step x class (Welford state of the step)
EVAL_FILE = "eval.jsonl"                # one record per evaluation
EVENTS_FILE = "events.jsonl"            # resume, close and other run events
GRAD_NORMS_FILE = "grad_norms.csv"      # per-tensor gradient norms at scheduled steps (long form)
EVAL_SET_FILE = "eval_set.safetensors"  # the stored evaluation set (token ids, masks, classes)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = "step_{step:08d}.safetensors"

TRAIN_COLUMNS = ("step", "loss", "grad_norm", "lr", "wall_time")
CLASS_COLUMNS = ("step", "cls", "count", "loss_sum", "loss_m2")
GRAD_NORM_COLUMNS = ("step", "tensor", "grad_norm")
