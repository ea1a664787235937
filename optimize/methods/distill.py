"""The `distill` method: knowledge distillation into a shallower student.

The student is the teacher's architecture with fewer decoder layers (default: half, every
other layer — 0, 2, 4, ...), initialised from the teacher: those layers' weights, the
embeddings, the final norm and the LM head are copied. It is then trained on the
calibration text against the frozen teacher with

    loss = α · KL(softmax(teacher / T) ‖ softmax(student / T)) · T²  +  (1 − α) · CE

(`--kd-weight` α, default 0.5: half soft targets, half the text itself; `--temperature` T,
default 2: softens the teacher enough to carry its ranking of the runner-up tokens without
flattening it). `--kd-weight 0` trains the same student on CE alone — the "without
distillation" control. Training runs in float32 on the training device (AdamW, linear
warm-up then cosine decay, gradient clipping at 1.0) until `--max-steps` or `--minutes`,
whichever comes first, checkpointing into `--checkpoint-dir` (default `<out>.ckpt/`, next to
`--out`, kept after the run); `--resume` continues the latest checkpoint exactly.

The artifact is an HF safetensors dir in the teacher's dtype (so teacher and student are
measured like for like) with the teacher's tokenizer, chat template and generation config.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import QuiverError
from optimize.methods.base import BuildContext, BuildResult

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files carried over from the teacher besides the weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def parse_layer_map(text: str | None, num_teacher_layers: int,
                    num_student_layers: int | None) -> list[int]:
    """The teacher layer behind each student layer: `--layer-map`, else evenly spaced
    (for half depth: every other layer, 0, 2, 4, ...)."""
    if text:
        try:
            layer_map = [int(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise QuiverError(f"--layer-map {text!r} is not a comma-separated list of layer "
                              "indices") from exc
        if not layer_map or any(not 0 <= i < num_teacher_layers for i in layer_map):
            raise QuiverError(f"--layer-map {text!r}: indices must be in 0..."
                              f"{num_teacher_layers - 1} (the teacher has "
                              f"{num_teacher_layers} layers)")
        if layer_map != sorted(set(layer_map)):
            raise QuiverError(f"--layer-map {text!r} must be strictly increasing")
        if num_student_layers is not None and num_student_layers != len(layer_map):
            raise QuiverError(f"--student-layers {num_student_layers} disagrees with "
                              f"--layer-map {text!r} ({len(layer_map)} layers)")
        return layer_map
    count = num_student_layers or math.ceil(num_teacher_layers / 2)
    if not 1 <= count <= num_teacher_layers:
        raise QuiverError(f"--student-layers {count} must be in 1..{num_teacher_layers}")
    if count == math.ceil(num_teacher_layers / 2):
        return list(range(0, num_teacher_layers, 2))
    return [i * num_teacher_layers // count for i in range(count)]


def make_student(teacher: torch.nn.Module, layer_map: list[int]) -> torch.nn.Module:
    """A copy of `teacher` keeping only the decoder layers in `layer_map` (student layer i
    is teacher layer layer_map[i]); every other weight copied as it is."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layer_map)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layer_map]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    renamed = {f"model.layers.{t}.": f"model.layers.{s}." for s, t in enumerate(layer_map)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renamed:
                continue
            name = renamed[prefix] + name[len(prefix):]
        state[name] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def save_student(student: torch.nn.Module, source: Path, out: Path) -> None:
    """Save in the teacher's on-disk dtype, with the teacher's tokenizer files."""
    import torch

    dtype = getattr(torch, teacher_dtype(source))
    student.to(dtype).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)


def teacher_dtype(source: Path) -> str:
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def calibration_ids(source: Path, texts: list[str]) -> tuple[list[list[int]], int]:
    """Token ids of each text, and the id that separates packed texts (EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    separator = tokenizer.eos_token_id
    if separator is None:
        separator = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [tokenizer(text)["input_ids"] for text in texts], separator


class Distill:
    name = "distill"
    summary = "distill into a shallower student (default: every other layer) with KL + CE"
    # None: no default gate. Dropping half the layers raises perplexity by an amount that
    # depends on the training budget (minutes to hours) far more than on the method, so no
    # fixed limit fits both a smoke run and a real one; the manifest records teacher and
    # student perplexity side by side and `--max-ppl-increase` sets a gate when wanted.
    default_max_ppl_increase: float | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def build(self, context: BuildContext) -> BuildResult:
        return build(context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distillation")
    group.add_argument("--student-layers", type=int, default=None,
                       help="decoder layers of the student (default: half the teacher's)")
    group.add_argument("--layer-map", default=None,
                       help="teacher layer behind each student layer, e.g. 0,2,4 (default: "
                            "evenly spaced; for half depth every other layer from 0)")
    group.add_argument("--kd-weight", type=float, default=0.5,
                       help="α: weight of the KL term, 1-α of the CE term; 0 trains on CE "
                            "alone, without distillation (default 0.5)")
    group.add_argument("--temperature", type=float, default=2.0,
                       help="softmax temperature of the KL term (default 2.0)")
    group.add_argument("--seq-len", type=int, default=256,
                       help="tokens per packed training sequence (default 256)")
    group.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    group.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warm-up steps (default: 5%% of --max-steps)")
    group.add_argument("--max-steps", type=int, default=200,
                       help="training steps; the schedule spans them (default 200)")
    group.add_argument("--minutes", type=float, default=None,
                       help="stop after this much wall-clock training time, even before "
                            "--max-steps (default: no limit)")
    group.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    group.add_argument("--checkpoint-every", type=int, default=50,
                       help="steps between checkpoints (default 50)")
    group.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="where checkpoints go (default: <out>.ckpt next to --out)")
    group.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --checkpoint-dir")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for training (default: torch's choice)")


def train_settings(args: argparse.Namespace):
    from optimize.distill_train import TrainSettings

    for flag in ("seq_len", "batch_size", "max_steps", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise QuiverError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.kd_weight <= 1.0:
        raise QuiverError(f"--kd-weight {args.kd_weight} must be in [0, 1]")
    if args.temperature <= 0 or args.lr <= 0:
        raise QuiverError("--temperature and --lr must be positive")
    warmup = (args.warmup_steps if args.warmup_steps is not None
              else max(1, math.ceil(0.05 * args.max_steps)))
    return TrainSettings(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=warmup, max_steps=args.max_steps, minutes=args.minutes,
                         kd_weight=args.kd_weight, temperature=args.temperature,
                         seed=args.seed, checkpoint_every=args.checkpoint_every)


def checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir)
    out = Path(args.out)
    return out.parent / f"{out.name}.ckpt"


def build(context: BuildContext) -> BuildResult:
    import torch
    from transformers import AutoModelForCausalLM

    from optimize.distill_train import pack_tokens, train
    from optimize.manifest import Manifest

    args, source = context.args, context.source
    manifest = Manifest.read(source)
    if manifest is not None and manifest.format != "safetensors":
        raise QuiverError(f"distill needs an HF safetensors teacher; {source} is a "
                          f"{manifest.format} artifact")
    settings = train_settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = prepare_store(checkpoint_dir(args), resume=args.resume, overwrite=args.overwrite)
    token_lists, separator = calibration_ids(source, context.calibration.texts)
    sequences = pack_tokens(token_lists, settings.seq_len, separator)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layer_map = parse_layer_map(args.layer_map, teacher.config.num_hidden_layers,
                                args.student_layers)
    student = make_student(teacher, layer_map)
    logger.info("distilling %d -> %d layers (%s) on %d sequences of %d tokens, %d threads",
                teacher.config.num_hidden_layers, len(layer_map), layer_map, len(sequences),
                settings.seq_len, torch.get_num_threads())
    result = train(teacher if settings.kd_weight > 0 else None, student, sequences, settings,
                   store, resume=args.resume, fingerprint=teacher_fingerprint(source, layer_map))
    logger.info("trained %d steps (%s) in %.0f s, final loss %.4f; checkpoints kept in %s",
                result.steps, result.stopped_by, result.train_seconds, result.final_loss,
                store.directory)
    save_student(student, source, context.out)
    return BuildResult(format="safetensors", params=build_params(layer_map, settings, result))


def prepare_store(directory: Path, *, resume: bool, overwrite: bool):
    from optimize.distill_train import CheckpointStore

    store = CheckpointStore(directory)
    if not resume and store.latest() is not None:
        if not overwrite:
            raise QuiverError(f"{directory} holds a checkpoint of an earlier run: pass "
                              "--resume to continue it, or --overwrite to start afresh")
        store.clear()
    return store


def teacher_fingerprint(source: Path, layer_map: list[int]) -> dict[str, Any]:
    from optimize.manifest import sha256_of

    return {"teacher": sha256_of(source), "layer_map": ",".join(map(str, layer_map))}


def build_params(layer_map: list[int], settings: Any, result: Any) -> dict[str, Any]:
    return {"student_layers": len(layer_map), "layer_map": layer_map,
            "kd_weight": settings.kd_weight, "temperature": settings.temperature,
            "steps": result.steps, "max_steps": settings.max_steps,
            "stopped_by": result.stopped_by, "seq_len": settings.seq_len,
            "batch_size": settings.batch_size, "lr": settings.lr,
            "warmup_steps": settings.warmup_steps, "seed": settings.seed,
            "tokens_seen": result.tokens_seen, "train_seconds": result.train_seconds,
            "final_loss": round(result.final_loss, 6)}


METHOD = Distill()
