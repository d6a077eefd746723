"""Recovery training recipe for the stock ``megatron.training.pretrain`` (megatron-core 0.19.2).

One linear script: parse Megatron's own flags (+ ours), check the inputs (:mod:`.checks`), hand the stock loop a
LLaMA-family ``GPTModel`` provider (:mod:`.model`, :mod:`.teacher`), a ``GPTDataset`` provider (:mod:`.datasets`) and
a forward step whose loss is the LM loss or, with ``--kd-teacher-load``, ``(1 - alpha) * LM + alpha * T^2 *
KL(teacher || student)`` (:mod:`.kd`). On a machine without CUDA it applies ``megatron.prune.cpu`` shims and the CPU
flags first.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron.prune.cpu import CPU_FLAGS, WITHOUT_TE_FLAGS, apply_cpu_shims, skip_compile_helpers
from megatron.prune.errors import PruneError
from megatron.prune.formats.mcore.schema import META_DIR
from megatron.prune.training.checks import (check_flags_first, check_paths_first, keep_own_tokenizer, preflight_flags,
                                            validate_inputs)
from megatron.prune.training.moe_checks import set_moe_aux_loss
from megatron.prune.training.datasets import train_valid_test_datasets_provider
from megatron.prune.training.kd import distill_losses
from megatron.prune.training.checkpoints import saved_layer_spec
from megatron.prune.training.model import (build_gpt, follows_local_checkpoint, have_transformer_engine,
                                           refuse_partial_loads, spec_description, start_memory_history)
from megatron.prune.training.teacher import build_teacher, carry_teacher_between_stages, stage_output


def add_recovery_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags on top of Megatron's (passed to ``parse_args`` as ``extra_args_provider``); also the script's
    description, and help texts made printable."""
    parser.description = ("Recovery training of a pruned LLaMA-family model on megatron-core's stock loop: "
                          "Megatron-LM's flags, plus distillation from a teacher (the last group); attention and "
                          "hidden dropout default to 0 as for LLaMA-family models. "
                          "scripts/check_model.sh sets the usual flags from environment variables; docs/recovery.md "
                          "walks through the whole cycle.")
    escape_help_percents(parser)
    g = parser.add_argument_group("megatron-prune recovery")
    g.add_argument("--kd-teacher-load", default=None,
                   help="Megatron checkpoint of the teacher (the unpruned model, same vocabulary; a torch-format one "
                        "saved at the run's TP and PP, a torch_dist one at any)")
    g.add_argument("--kd-alpha", type=float, default=0.5,
                   help="weight of the KD loss; total = (1-alpha)*LM + alpha*T^2*KL (default 0.5)")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T (default 1)")
    return parser


def escape_help_percents(parser: argparse.ArgumentParser) -> None:
    """Double each bare ``%`` in the flags' help: argparse %-formats help text, and one of megatron-core 0.19.2's
    ("10%)") makes ``--help`` raise ValueError instead of printing."""
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"(%%|%\()|%", lambda m: m.group(1) or "%%", action.help)


# Defaults of a LLaMA-family recipe where Megatron's differ: no dropout (Megatron: 0.1 each), as LLaMA-family models
# are trained. Given before the user's flags, which win; --use-checkpoint-args takes the checkpoint's.
LLAMA_DEFAULTS: tuple[str, ...] = ("--attention-dropout", "0.0", "--hidden-dropout", "0.0")


# check_model.sh runs the checks of every rank once, before torchrun (``only``: check and stop), so that a refusal is
# one line, not one per rank inside torchrun's own traceback; the ranks then skip the slow part (``done``).
PREFLIGHT = "MEGATRON_PRUNE_PREFLIGHT"


def without_log_writers() -> None:
    """A pre-flight parses the run's flags as rank 0 does but must not start its TensorBoard, W&B or one-logger
    writers (megatron-core's argument parsing starts them)."""
    from megatron.training import global_vars

    for name in ("_set_tensorboard_writer", "_set_wandb_writer", "_set_one_logger"):
        setattr(global_vars, name, lambda args: None)


class WarnOnce(logging.Filter):
    """Lets each distinct warning through once per rank: megatron-core repeats some at every evaluation and save
    ("Setting RerunStateMachine mode ...", "RerunStateMachine checkpoints ONLY SUPPORTED ...")."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def warn_once_per_rank() -> None:
    """Install :class:`WarnOnce` on the handlers megatron-core logs through (its training module sets them up).
    Its handler overrides ``filter`` (dropping other libraries' records) and so ignores ``addFilter``: chain the
    two instead."""
    import megatron.training.training  # noqa: F401  (its import sets up the handlers)

    once = WarnOnce()
    for handler in logging.getLogger().handlers:
        stock = getattr(handler.filter, "stock", handler.filter)  # a second run in this process replaces the first
        handler.filter = partial(_both_filters, stock, once)  # type: ignore[method-assign]
        handler.filter.stock = stock  # type: ignore[attr-defined]


def _both_filters(stock: Any, once: WarnOnce, record: logging.LogRecord) -> bool:
    return bool(stock(record)) and once.filter(record)


def carry_hf_meta_with_first_save(args: Any) -> None:
    """``hf_meta/`` goes into SAVE with the run's first checkpoint (:func:`carry_hf_meta`), not at start-up: a run
    that fails before saving leaves SAVE as it was."""
    import megatron.training.training as training

    stock = getattr(training.save_checkpoint, "__wrapped__", training.save_checkpoint)  # once per process

    @wraps(stock)
    def save_checkpoint(*a: Any, **kw: Any) -> Any:
        out = stock(*a, **kw)
        carry_hf_meta(args)
        return out

    training.save_checkpoint = save_checkpoint


def carry_hf_meta(args: Any) -> Path | None:
    """Copy ``LOAD/hf_meta`` (HF config + tokenizer, written by our converter) into ``SAVE`` once, on rank 0.

    Training keeps the model's shape, so the saved checkpoints export with ``megatron-to-hf`` to a
    complete HF folder (tokenizer included) that ``megatron-prune eval`` reads directly.
    """
    if not (args.load and args.save) or os.environ.get("RANK", "0") != "0":
        return None
    src, dst = Path(args.load) / META_DIR, Path(args.save) / META_DIR
    if not src.is_dir() or dst.exists() or src.resolve() == dst.resolve():
        return None
    tmp = dst.with_name(f".{META_DIR}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
    return dst


SPIKE_FACTOR = 10.0  # --check-for-spiky-loss: a loss this many times the usual is rerun and reported


NON_FINITE = ((torch.isnan, "NaN"), (torch.isinf, "Inf"))


def validate_loss(loss: torch.Tensor, nan_check: bool, spike_check: bool) -> None:
    """The checks the stock GPT loss makes on each rank's loss before the data-parallel reduction, through
    megatron-core's rerun state machine: NaN and Inf stop the run (unless --no-check-for-nan-in-loss-and-grad),
    and --check-for-spiky-loss flags spikes (rerun and attributed per --rerun-mode). The first iteration, which
    megatron-core leaves unchecked, is checked for NaN and Inf here."""
    if not (nan_check or spike_check):
        return
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    if nan_check and not getattr(machine, "first_iteration_complete", True):
        # megatron-core validates nothing in a run's first iteration (its reruns need a completed step), so broken
        # weights (or data) would train on and be saved: stop here instead
        for reject, what in NON_FINITE:
            if reject(loss).any():
                raise RuntimeError(f"found {what} in local forward loss calculation in the run's first iteration: "
                                   "the loaded weights (or the data) are broken")
    if nan_check:
        for reject, what in NON_FINITE:
            machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                    message=f"found {what} in local forward loss calculation")
    if spike_check:
        spiky = partial(machine.is_unexpectedly_large, threshold=SPIKE_FACTOR, context="loss")
        machine.validate_result(result=loss, rejection_func=spiky, message="Spiky loss", tolerance=0.0, fatal=False)


def loss_func(loss_mask: torch.Tensor, alpha: float, temperature: float, output: torch.Tensor, *,
              nan_check: bool = False, spike_check: bool = False):
    """``output``: ``[b, s]`` LM losses, or ``[2, b, s]`` LM and KD losses. Token-summed loss, validated as the
    stock GPT loss is (:func:`validate_loss`)."""
    mask = loss_mask.reshape(-1).float()
    n_tokens = mask.sum()
    lm = output[0] if output.dim() == 3 else output
    lm_sum = (lm.reshape(-1).float() * mask).sum()
    report = {"lm loss": torch.stack([lm_sum.detach().clone(), n_tokens.detach().clone()])}
    loss = lm_sum
    if output.dim() == 3:
        kd_sum = (output[1].reshape(-1).float() * mask).sum()
        loss = (1.0 - alpha) * lm_sum + alpha * temperature**2 * kd_sum
        report["kd loss"] = torch.stack([kd_sum.detach().clone(), n_tokens.detach().clone()])
    validate_loss(loss, nan_check, spike_check)
    return loss, n_tokens.int(), report


def get_batch(data_iterator) -> dict[str, torch.Tensor]:
    """Next ``GPTDataset`` batch on this rank's device."""
    batch = next(data_iterator)
    return {k: v.cuda(non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


@dataclass
class Recovery:
    """The stock loop's model provider and forward step for one run, sharing the distillation teacher (built once,
    beside the first model chunk)."""

    teacher: torch.nn.Module | None = None

    def model_provider(self, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                       config: Any = None, pg_collection: Any = None):
        """Stock-loop model provider: the student; builds the (frozen, separate) teacher once on the side."""
        from megatron.training import get_args, print_rank_0

        args = get_args()
        if vp_stage in (None, 0):
            start_memory_history(args)
        print_rank_0(f"building LLaMA-family GPTModel ({spec_description(args)}) ...")
        model = build_gpt(args, pre_process, post_process, vp_stage, config, pg_collection)
        refuse_partial_loads(model)
        if args.kd_teacher_load and self.teacher is None:
            self.teacher = build_teacher(args, pre_process, post_process)
            if args.pipeline_model_parallel_size > 1:
                carry_teacher_between_stages(model, self.teacher)
            print_rank_0(f"loaded KD teacher from {args.kd_teacher_load}")
        return model

    def forward_step(self, data_iterator, model):
        """LM loss per token, plus the vocab-parallel KL to the teacher when distilling."""
        from megatron.core import parallel_state
        from megatron.training import get_args

        args = get_args()
        b = get_batch(data_iterator)
        mask = b["loss_mask"]
        done = partial(loss_func, mask, args.kd_alpha, args.kd_temperature,
                       nan_check=args.check_for_nan_in_loss_and_grad, spike_check=args.check_for_spiky_loss)
        attention = b.get("attention_mask")  # per-document masks (--reset-attention-mask), else None: causal
        if self.teacher is None:
            return model(b["tokens"], b["position_ids"], attention, labels=b["labels"]), done
        logits = model(b["tokens"], b["position_ids"], attention)  # [b, s, v/tp]
        with torch.no_grad():
            t_logits = self.teacher(b["tokens"], b["position_ids"], attention)
        if not parallel_state.is_pipeline_last_stage():  # hidden states, not logits: send both on
            return stage_output(logits, t_logits), done
        return distill_losses(logits, t_logits, b["labels"], args.kd_alpha, args.kd_temperature,
                              parallel_state.get_tensor_model_parallel_group()), done


def main(argv: Sequence[str] | None = None) -> int:
    """``pretrain_llama.py``: parse flags, check inputs, run the stock loop."""
    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    skip_compile_helpers()
    user_flags = list(sys.argv[1:] if argv is None else argv)
    load = preflight_flags(user_flags).load
    argv = [*LLAMA_DEFAULTS, *user_flags]  # later user flags still win
    if apply_cpu_shims():
        argv = [*CPU_FLAGS, *argv]  # later user flags still win
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    elif not have_transformer_engine():
        print("pretrain_llama.py: Transformer Engine is not installed: megatron-core's local spec (attention "
              "through torch SDPA unless --attention-backend unfused or --deterministic-mode), unfused norm and "
              "RoPE kernels", flush=True)
        argv = [*WITHOUT_TE_FLAGS, *argv]
    elif follows_local_checkpoint(user_flags, saved_layer_spec(load) if load else None, builds_te=True):
        print(f"pretrain_llama.py: --load {load} has megatron-core's local-spec parameter names: building that spec "
              "(as without Transformer Engine); for Transformer Engine's, convert it once: megatron-prune reshard "
              f"--input {load} --output {load.rstrip('/')}-te --transformer-impl transformer_engine", flush=True)
        argv = [*WITHOUT_TE_FLAGS, *argv]
    argv = keep_own_tokenizer(argv)
    sys.argv = [sys.argv[0], *argv]
    stage = os.environ.get(PREFLIGHT, "")
    if stage == "only":
        without_log_writers()
    try:
        flags = preflight_flags(argv)
        check_flags_first(flags)
        check_paths_first(flags)
        args = parse_and_validate_args(add_recovery_args)
        set_moe_aux_loss(args, coeff_given=flags.moe_aux_loss_coeff is not None)
        # every shard is read once, before start-up: by check_model.sh's pre-flight, else by rank 0
        validate_inputs(args, scan_weights=stage != "done" and os.environ.get("RANK", "0") == "0")
    except PruneError as e:
        print(f"pretrain_llama.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except AssertionError as e:  # Megatron's own argument checks are bare assertions
        print(f"pretrain_llama.py: error: {str(e).strip() or 'Megatron refused the arguments'}", file=sys.stderr,
              flush=True)
        return 2
    if stage == "only":
        return 0
    warn_once_per_rank()
    carry_hf_meta_with_first_save(args)
    cfg = pretrain_cfg_container_from_args(args)
    try:
        run = Recovery()
        pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, run.forward_step,
                 model_provider=run.model_provider)
    except PruneError as e:  # found while loading (refuse_partial_loads, or the teacher's load naming itself)
        where = "" if str(e).startswith("--") else f"--load {args.load}: "
        print(f"pretrain_llama.py: error: {where}{e}", file=sys.stderr, flush=True)
        return 2
    except AssertionError as e:
        message = schedule_mismatch(str(e), args.load)
        if message is None:
            raise
        print(f"pretrain_llama.py: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


def schedule_mismatch(assertion: str, load: str | None) -> str | None:
    """Megatron's bare assertion when a resumed checkpoint's LR schedule differs from the flags (e.g. another
    --train-iters), turned into what to do about it; None for any other assertion."""
    m = re.match(r"OptimizerParamScheduler: class input value (.*) and checkpoint ?value (.*) for (.*) do not match",
                 assertion)
    if m is None:
        return None
    flags, saved, name = m.groups()
    return (f"--load {load}: the saved learning-rate schedule differs from this run's flags ({name}: {saved} saved, "
            f"{flags} now); resume with the flags it was saved with, or add --override-opt_param-scheduler to take "
            "this run's schedule (--use-checkpoint-opt_param-scheduler to keep the saved one)")
