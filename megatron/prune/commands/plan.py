r"""Show what a prune plan kept and dropped, and how it was chosen.

`plan show` reads prune_plan.json (written beside every pruned checkpoint, HF or Megatron, and kept by convert and
reshard) and prints the selection method with its settings, whether the kept weights were refit (--reconstruct:
its settings, calibration and error before and after), the shape before and after, the dropped layers and hidden
channels, and for every kept layer its KV groups and query heads (kept and dropped) and FFN channel count.
--indices adds every kept index (hidden and FFN channels too).

Examples:
  megatron-prune plan show small
  megatron-prune plan show small/prune_plan.json --indices
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from megatron.prune.core.plan import PLAN_FILE, LayerPlan, PrunePlan
from megatron.prune.errors import PruneError

HELP = "show a prune plan: what was kept and dropped per layer, and how it was chosen"

LAYER_RULES = {"block-influence": "block influence (the layers that change their input least were dropped)",
               "spread-middle": "the seed project's rule (spread through the middle, never first or last)",
               "explicit": "--drop-layers", "all": "all kept"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_verb", metavar="<show>", required=True)
    s = sub.add_parser("show", help="print what a plan kept and dropped", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("plan", type=Path, metavar="DIR|prune_plan.json",
                   help="a pruned checkpoint folder (HF or Megatron) or its prune_plan.json")
    s.add_argument("--indices", action="store_true", help="also list every kept index (hidden and FFN channels)")


def find_plan(path: Path) -> Path:
    """The plan file of a pruned folder, or the file itself; a PruneError saying where plans come from else."""
    if path.is_dir():
        if not (path / PLAN_FILE).is_file():
            raise PruneError(f"{path} has no {PLAN_FILE}: `megatron-prune prune` writes one beside the pruned "
                             "weights (convert and reshard keep it)")
        return path / PLAN_FILE
    if not path.exists():
        raise PruneError(f"{path}: no such file or folder")
    if not path.is_file():  # a device or a pipe
        raise PruneError(f"{path}: not a regular file; give a prune_plan.json or the folder holding one")
    return path


def missing_ids(kept: Iterable[int], n: int) -> str:
    """:func:`ids` of the numbers below ``n`` not in ``kept``, run by run without listing them (a damaged plan may
    claim 10^9 layers)."""
    runs, start = [], 0
    for k in [*sorted(set(kept)), n]:
        if k > start:
            runs.append(str(start) if k - 1 == start else f"{start}-{k - 1}")
        start = k + 1
    return ",".join(runs) or "-"


def ids(values: Sequence[int]) -> str:
    """``0-3,7,9-10``: a sorted index list, runs joined."""
    runs: list[str] = []
    start = prev = None
    for v in list(values) + [None]:
        if start is not None and (v is None or v != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ",".join(runs) or "-"


def method_line(info: Mapping[str, Any]) -> str:
    """The selection method and its settings, as the plan recorded them."""
    method = info.get("method", "?")
    how = ", chosen by --method auto" if info.get("requested") == "auto" else ""
    if method == "random":
        return f"method: random{how} (seed {info.get('seed', '?')})"
    if method == "activation" and "scores" in info:
        return f"method: activation{how} (scores from {info['scores']})"
    if method == "activation" and "calib" in info:
        calib = info["calib"] if isinstance(info["calib"], str) else " ".join(info["calib"])
        where = f"; scored {info['selection']}" if "selection" in info else ""
        return (f"method: activation{how} (calibration {calib}: {info.get('samples')} windows of "
                f"{info.get('seq_len')} tokens, aggregation {info.get('aggregation')}, {info.get('dtype')}{where})")
    return f"method: {method}{how}"


def reconstruction_line(info: Mapping[str, Any]) -> str:
    """How the kept weights were refit (``prune --reconstruct``), as the plan recorded it, or that they were not."""
    r = info.get("reconstruct")
    if not isinstance(r, Mapping):
        return "reconstruction: none (the kept weights are the original's, sliced)"
    calib = r.get("calib") if isinstance(r.get("calib"), str) else " ".join(map(str, r.get("calib") or []))

    def num(key: str) -> str:
        return f"{r[key]:.4f}" if isinstance(r.get(key), (int, float)) else "?"

    return (f"reconstruction: {r.get('method')} of the linears {', '.join(r.get('groups') or [])} (lm_head "
            f"{r.get('head')}, damping {r.get('damping')}) on {r.get('tokens')} tokens of {calib} ({r.get('samples')} "
            f"windows of {r.get('seq_len')}, {r.get('dtype')}): relative error {num('error_sliced')} (sliced) -> "
            f"{num('error_refit')}, {r.get('seconds')}s{loss_text(r.get('calibration_loss'))}")


def loss_text(loss: dict | None) -> str:
    """``; calibration loss A (original) -> B on N tokens`` from the plan's record, or nothing (older plans)."""
    if not isinstance(loss, dict) or not {"original", "pruned_refit"} <= set(loss):
        return ""
    on = f" on {loss['tokens']} tokens" if "tokens" in loss else ""
    return f"; calibration loss {loss['original']} (original) -> {loss['pruned_refit']} (pruned, refit){on}"


def selection_line(plan: PrunePlan) -> str:
    info = plan.info
    rule = LAYER_RULES.get(info.get("layer_rule", ""), info.get("layer_rule", "?"))
    norm = (f"RMSNorm weights x {plan.norm_scale:.4g} (sqrt of hidden {plan.source.hidden_size}/"
            f"{plan.target.hidden_size})" if plan.norm_scale != 1.0 else "RMSNorm weights unchanged")
    return f"layers: {rule}; TP {info.get('tp', '?')}, {info.get('prune_type', '?')}; {norm}"


def shape_line(plan: PrunePlan) -> str:
    s, t = plan.source, plan.target
    rows = [("layers", s.num_layers, t.num_layers), ("hidden", s.hidden_size, t.hidden_size),
            ("query heads", s.num_attention_heads, t.num_attention_heads),
            ("KV groups", s.num_query_groups, t.num_query_groups), ("FFN", s.ffn_hidden_size, t.ffn_hidden_size),
            ("vocab", s.vocab_size, t.vocab_size)]
    if s.is_moe:  # no dense FFN
        rows[4:5] = [("experts", s.num_experts, t.num_experts), ("expert FFN", s.moe_ffn_hidden_size,
                     t.moe_ffn_hidden_size), ("top-k", s.num_experts_per_tok, t.num_experts_per_tok)]
    return "shape: " + ", ".join(f"{n} {a} -> {b}" if a != b else f"{n} {a}" for n, a, b in rows)


def ffn_cell(plan: PrunePlan, lp: LayerPlan, indices: bool) -> str:
    """A layer's FFN channels kept, or for a MoE layer its experts kept (dropped) and the channels each keeps."""
    s = plan.source
    if not s.is_moe:
        return f"{len(lp.ffn)}/{s.ffn_hidden_size}" + (f": {ids(lp.ffn)}" if indices else "")
    cell = (f"experts {ids(lp.experts)} ({ids(sorted(set(range(s.num_experts)) - set(lp.experts)))}), "
            f"{plan.target.moe_ffn_hidden_size}/{s.moe_ffn_hidden_size} channels each")
    return cell + ("".join(f"; expert {e}: {ids(f)}" for e, f in zip(lp.experts, lp.expert_ffn)) if indices else "")


def layer_table(plan: PrunePlan, indices: bool) -> list[str]:
    """One row per kept layer: its source layer, KV groups and query heads kept (dropped), FFN channels (or experts
    and their channels) kept."""
    s = plan.source
    rows = [("layer", "from", "KV groups kept (dropped)", "query heads kept (dropped)",
             "experts kept (dropped)" if s.is_moe else "FFN kept")]
    for i, lp in enumerate(plan.layers):
        groups = f"{ids(lp.query_groups)} ({ids(sorted(set(range(s.num_query_groups)) - set(lp.query_groups)))})"
        heads = f"{ids(lp.heads)} ({ids(sorted(set(range(s.num_attention_heads)) - set(lp.heads)))})"
        rows.append((str(i), str(lp.source_layer), groups, heads, ffn_cell(plan, lp, indices)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return [f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}"
            for r in rows]


def describe(plan: PrunePlan, where: Path, indices: bool) -> list[str]:
    """Every line ``plan show`` prints."""
    s, t = plan.source, plan.target
    kept = {lp.source_layer for lp in plan.layers}
    lines = [f"plan: {where}", method_line(plan.info), reconstruction_line(plan.info), selection_line(plan),
             shape_line(plan),
             f"parameters: {s.num_params() / 1e6:.1f}M -> {t.num_params() / 1e6:.1f}M",
             f"dropped layers: {missing_ids(kept, s.num_layers)}",
             f"hidden: {len(plan.hidden)} of {s.hidden_size} channels kept, {s.hidden_size - len(plan.hidden)} dropped"
             + (f": kept {ids(plan.hidden)}" if indices else "")]
    if plan.vocab is not None:
        lines.append(f"vocab: {len(plan.vocab)} of {s.vocab_size} token ids kept")
    return lines + layer_table(plan, indices)


def run(args: argparse.Namespace) -> int:
    path = find_plan(args.plan)
    for line in describe(PrunePlan.load(path), path, args.indices):
        print(line)
    return 0
