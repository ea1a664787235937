"""The distillation training loop: a frozen teacher, a student, packed calibration text.

loss = α · KL(softmax(teacher / T) ‖ softmax(student / T)) · T²  +  (1 − α) · CE(next token)

(α = `kd_weight`, T = `temperature`; the T² keeps the soft-target gradients on the scale of
the hard ones, Hinton et al. 2015). α = 0 is plain fine-tuning of the same student, the
"without distillation" control.

Everything that decides step `s` is a function of (settings, s) or is in the checkpoint: the
batch is drawn from a permutation of the packed sequences seeded by (seed, epoch), the
learning rate is a pure function of the step (linear warm-up, cosine to 10 % of the peak),
and the checkpoint holds the student, the AdamW state, the step, the RNG state, the tokens
seen and the time spent. A run resumed from step k therefore follows the same trajectory as
one that never stopped. Checkpoints are written atomically (a temporary file, then a
rename), every `checkpoint_every` steps, at the end, when the budget runs out and on Ctrl-C;
only the newest is kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import QuiverError

logger = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1
CHECKPOINT_GLOB = "step-*.pt"
# Settings that must match for a checkpoint to continue the same trajectory.
RESUME_KEYS = ("seq_len", "batch_size", "lr", "warmup_steps", "kd_weight", "temperature",
               "seed", "grad_clip")


@dataclass(frozen=True)
class TrainSettings:
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-4
    warmup_steps: int = 10
    max_steps: int = 200
    minutes: float | None = None
    kd_weight: float = 0.5
    temperature: float = 2.0
    seed: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 50


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens_seen: int
    train_seconds: float
    final_loss: float
    stopped_by: str          # "max_steps" | "minutes"


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    last_loss: float = math.nan


class StopTraining(Exception):
    """Raised by a step hook to end training early, like a spent budget."""


# --------------------------------------------------------------------------- data


def pack_tokens(token_lists: list[list[int]], seq_len: int, separator_id: int) -> torch.Tensor:
    """Concatenate the texts (a separator after each) and cut into [n, seq_len] rows."""
    stream = [token for ids in token_lists for token in (*ids, separator_id)]
    num_sequences = len(stream) // seq_len
    if num_sequences == 0:
        raise QuiverError(f"the calibration text has {len(stream)} tokens, fewer than one "
                          f"--seq-len {seq_len} sequence; lower --seq-len or add text")
    return torch.tensor(stream[: num_sequences * seq_len]).view(num_sequences, seq_len)


def batch_indices(step: int, batch_size: int, num_sequences: int, seed: int) -> list[int]:
    """Rows of step `step`: a stream of per-epoch permutations, each seeded by (seed, epoch)."""
    rows, cache = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_sequences)
        if epoch not in cache:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_sequences, generator=generator)
        rows.append(int(cache[epoch][offset]))
    return rows


def data_fingerprint(sequences: torch.Tensor) -> str:
    return hashlib.sha256(sequences.numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- loss, lr


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 input_ids: torch.Tensor, kd_weight: float,
                 temperature: float) -> torch.Tensor:
    """α·KL(teacher_T ‖ student_T)·T² per token + (1 − α)·next-token CE; logits [B, L, V]."""
    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(),
                         input_ids[:, 1:].reshape(-1))
    if kd_weight == 0.0 or teacher_logits is None:
        return ce
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    num_tokens = student_logits.shape[0] * student_logits.shape[1]
    kl = F.kl_div(student_logp.reshape(-1, vocab), teacher_logp.reshape(-1, vocab),
                  reduction="sum", log_target=True) / num_tokens
    return kd_weight * kl * temperature**2 + (1.0 - kd_weight) * ce


def lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from `lr` to 10 % of it."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.lr * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


# --------------------------------------------------------------------------- checkpoints


class CheckpointStore:
    """`step-NNNNNN.pt` files in one dir; written atomically, only the newest kept."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def latest(self) -> Path | None:
        paths = sorted(self.directory.glob(CHECKPOINT_GLOB)) if self.directory.is_dir() else []
        return paths[-1] if paths else None

    def save(self, payload: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{payload['state']['step']:06d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        for old in self.directory.glob(CHECKPOINT_GLOB):
            if old != path:
                old.unlink()
        return path

    def load(self) -> dict[str, Any]:
        path = self.latest()
        if path is None:
            raise QuiverError(f"--resume: no checkpoint in {self.directory}")
        logger.info("resuming from %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        for path in self.directory.glob("step-*.pt*"):
            path.unlink()


def checkpoint_payload(student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       state: TrainState, settings: TrainSettings,
                       fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
            "state": asdict(state), "rng": torch.get_rng_state(),
            "settings": asdict(settings), "fingerprint": fingerprint}


def restore(payload: dict[str, Any], student: torch.nn.Module,
            optimizer: torch.optim.Optimizer, settings: TrainSettings,
            fingerprint: dict[str, Any]) -> TrainState:
    """Load a checkpoint after checking it continues this very run."""
    saved = payload["settings"]
    changed = [f"{key} {saved[key]} -> {getattr(settings, key)}" for key in RESUME_KEYS
               if saved[key] != getattr(settings, key)]
    changed += [f"{key} differs" for key in fingerprint if payload["fingerprint"].get(key)
                != fingerprint[key]]
    if changed:
        raise QuiverError("--resume: the checkpoint is from a different run ("
                          + "; ".join(changed) + "); use the same options or drop --resume")
    if saved["max_steps"] != settings.max_steps:
        logger.info("resuming with --max-steps %d (was %d): the cosine schedule stretches",
                    settings.max_steps, saved["max_steps"])
    student.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    return TrainState(**payload["state"])


# --------------------------------------------------------------------------- loop


class AbortTraining(KeyboardInterrupt):
    """A second Ctrl-C: stop now, mid-step, without writing a checkpoint."""


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Hold a first Ctrl-C until the current step ends (the loop then checkpoints and
    stops); a second one aborts at once, without a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            raise AbortTraining
        received.append(signum)
        logger.warning("interrupt: stopping after this step (Ctrl-C again to abort at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)


def train_step(teacher: torch.nn.Module | None, student: torch.nn.Module,
               optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, step: int,
               settings: TrainSettings) -> float:
    """One optimizer step; returns the loss. Only the final update mutates state."""
    teacher_logits = None
    if teacher is not None and settings.kd_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
    student_logits = student(input_ids=input_ids, use_cache=False).logits
    loss = distill_loss(student_logits, teacher_logits, input_ids, settings.kd_weight,
                        settings.temperature)
    del teacher_logits, student_logits
    if not torch.isfinite(loss):
        raise QuiverError(f"the loss is {loss.item()} at step {step + 1}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), settings.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, settings)
    optimizer.step()
    return loss.item()


def make_optimizer(student: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)


def train(teacher: torch.nn.Module | None, student: torch.nn.Module,
          sequences: torch.Tensor, settings: TrainSettings, store: CheckpointStore, *,
          resume: bool = False, fingerprint: dict[str, Any] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `student` in place until `max_steps` or `minutes`, whichever comes first.

    `on_step(step, loss)` runs after each completed step; raising `StopTraining` from it ends
    training like a spent budget, raising `KeyboardInterrupt` like Ctrl-C (checkpoint, then
    the interrupt propagates)."""
    trainer = Trainer(teacher, student, sequences, settings, store,
                      {**(fingerprint or {}), "data": data_fingerprint(sequences)})
    if resume:
        trainer.state = restore(store.load(), student, trainer.optimizer, settings,
                                trainer.fingerprint)
        trainer.saved_step = trainer.state.step
    else:
        torch.manual_seed(settings.seed)
    stopped_by = trainer.run(on_step)
    state = trainer.state
    return TrainResult(steps=state.step, tokens_seen=state.tokens_seen,
                       train_seconds=round(state.train_seconds, 2),
                       final_loss=state.last_loss, stopped_by=stopped_by)


class Trainer:
    def __init__(self, teacher: torch.nn.Module | None, student: torch.nn.Module,
                 sequences: torch.Tensor, settings: TrainSettings, store: CheckpointStore,
                 fingerprint: dict[str, Any]) -> None:
        self.teacher, self.student, self.sequences = teacher, student, sequences
        self.settings, self.store, self.fingerprint = settings, store, fingerprint
        self.optimizer = make_optimizer(student, settings)
        self.state = TrainState()
        self.saved_step: int | None = None

    def run(self, on_step: Callable[[int, float], None] | None) -> str:
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.student.train()
        bar = tqdm(total=self.settings.max_steps, initial=self.state.step, desc="distill",
                   unit="step", dynamic_ncols=True, mininterval=1.0)
        try:
            with deferred_interrupt() as interrupted:
                stopped_by = self._loop(bar, interrupted, on_step)
        except AbortTraining:
            logger.warning("aborted during step %d: no checkpoint written", self.state.step + 1)
            raise
        except KeyboardInterrupt:
            path = self.checkpoint()
            logger.warning("interrupted after step %d; checkpoint %s: rerun with --resume to "
                           "continue", self.state.step, path)
            raise
        finally:
            bar.close()
        self.checkpoint()
        self.student.eval()
        return stopped_by

    def _loop(self, bar: tqdm, interrupted: Callable[[], bool],
              on_step: Callable[[int, float], None] | None) -> str:
        settings = self.settings
        deadline = (time.monotonic() + settings.minutes * 60.0
                    if settings.minutes is not None else math.inf)
        while self.state.step < settings.max_steps:
            loss = self._step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            try:
                if on_step is not None:
                    on_step(self.state.step, loss)
            except StopTraining:
                return "stopped"
            if interrupted():
                raise KeyboardInterrupt
            if time.monotonic() >= deadline:
                return "minutes"
            if self.state.step % settings.checkpoint_every == 0:
                self.checkpoint()
        return "max_steps"

    def _step(self) -> float:
        state, settings = self.state, self.settings
        rows = batch_indices(state.step, settings.batch_size, len(self.sequences), settings.seed)
        started = time.monotonic()
        loss = train_step(self.teacher, self.student, self.optimizer, self.sequences[rows],
                          state.step, settings)
        state.step += 1
        state.tokens_seen += len(rows) * settings.seq_len
        state.train_seconds += time.monotonic() - started
        state.last_loss = loss
        return loss

    def checkpoint(self) -> Path:
        if self.saved_step != self.state.step or self.store.latest() is None:
            payload = checkpoint_payload(self.student, self.optimizer, self.state,
                                         self.settings, self.fingerprint)
            path = self.store.save(payload)
            self.saved_step = self.state.step
            logger.info("checkpoint: step %d -> %s", self.state.step, path)
        return self.store.latest()
