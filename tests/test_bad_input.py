"""Bad input and faults, every verb and entry point, one table: each case runs through the CLI (or the seed
script's entry point) on tiny checkpoints and must end with its exit code and one error line naming the offending
value, no traceback, nothing left beside the output, and the inputs unchanged. Faults the table cannot stage in
process (a full or read-only disk on a real filesystem, a killed parent, a refused recovery run) follow it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from compare import tree_hash
from megatron.prune import seed
from megatron.prune.cli import main
from megatron.prune.core.plan import PrunePlan

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--samples", "2", "--seq-len", "16", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tok_model, tmp_path_factory) -> dict[str, Path]:
    """Read-only inputs of the table: the tiny model (with a real tokenizer) as HF, Megatron TP=2 and torch_dist,
    damaged copies of each, and the small files the cases name."""
    from safetensors.torch import load_file, save_file

    from megatron.prune.formats.hf import HFCheckpoint
    from megatron.prune.formats.mcore import ops

    d = tmp_path_factory.mktemp("bad_input")
    hf = shutil.copytree(tok_model, d / "hf")
    mg = ops.hf_to_megatron(hf, d / "mg", tp=2, progress=False)
    mgd = ops.hf_to_megatron(hf, d / "mgd", progress=False, ckpt_format="torch_dist")
    missing = shutil.copytree(mgd, d / "mgd_missing")
    next(missing.glob("iter_*/*.distcp")).unlink()
    bare = d / "bare"  # the model without its tokenizer
    bare.mkdir()
    for f in hf.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, bare / f.name)
    config = json.loads((hf / "config.json").read_text())
    for name, cfg in {"no_hidden": {k: v for k, v in config.items() if k != "hidden_size"},
                      "null_heads": {**config, "num_attention_heads": None},
                      "text_layers": {**config, "num_hidden_layers": "4"},
                      "rope_text": {**config, "rope_theta": "big"},
                      "eps_negative": {**config, "rms_norm_eps": -1},
                      "arch_text": {**config, "architectures": config["architectures"][0]},
                      "list": [config]}.items():
        # the model with a damaged config.json
        folder = shutil.copytree(hf, d / f"cfg_{name}")
        (folder / "config.json").write_text(json.dumps(cfg))
    short = shutil.copytree(hf, d / "hf_short")  # config.json counts 2 of its 4 layers
    (short / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                   "num_hidden_layers": 2}))
    for name, text in {"rope": json.dumps({**config, "rope_theta": "big"}), "json": "{bad"}.items():
        # the Megatron checkpoint with a damaged hf_meta/config.json
        (shutil.copytree(mg, d / f"mg_meta_{name}") / "hf_meta" / "config.json").write_text(text)
    cut = shutil.copytree(mgd, d / "mgd_cut")
    f = next(cut.glob("iter_*/*.distcp"))
    os.truncate(f, f.stat().st_size // 2)
    weights = load_file(hf / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, shutil.copytree(hf, d / "hf_nan") / "model.safetensors", metadata={"format": "pt"})
    small = shutil.copytree(hf, d / "hf_small_vocab")  # its embedding cut to 1000 rows; the tokenizer left whole
    config = json.loads((small / "config.json").read_text())
    rows = {k: v[:1000] if v.shape[0] == config["vocab_size"] else v
            for k, v in load_file(hf / "model.safetensors").items()}
    save_file(rows, small / "model.safetensors", metadata={"format": "pt"})
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    mg_nan = shutil.copytree(mg, d / "mg_nan")
    shard = mg_nan / "iter_0000000" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(shard, weights_only=False)
    state["model"]["decoder.layers.2.mlp.linear_fc2.weight"][0, 1] = float("inf")
    torch.save(state, shard)
    plan = PrunePlan.keep_all(HFCheckpoint.open(hf).shape).to_dict()
    for name, change in {"list": lambda p: [p], "scale_text": lambda p: {**p, "norm_scale": "big"},
                         "scale_negative": lambda p: {**p, "norm_scale": -1.0}, "half_index": half_index,
                         "null": lambda p: None, "empty": lambda p: {}, "info_text": lambda p: {**p, "info": "x"},
                         "negative_size": lambda p: {**p, "source": {**p["source"], "num_experts": -4}}}.items():
        (d / f"plan_{name}.json").write_text(json.dumps(change(plan)))
    counts = {"format": "megatron-prune-token-counts", "version": 1,
              "tokenizer": {"kind": "hf", "vocab_size": 100, "vocab_hash": "ab"}, "counts": {"5": 7}}
    for name, damaged in {"list": [counts], "text_count": {**counts, "counts": {"5": "x"}},
                          "beyond": {**counts, "counts": {"100": 7}}, "no_size": {**counts, "tokenizer": {}},
                          "superscript": {**counts, "counts": {"\u00b2": 7}},
                          "counts_list": {**counts, "counts": [7]},
                          "huge": {**counts, "tokenizer": {**counts["tokenizer"], "vocab_size": 10 ** 12}}}.items():
        (d / f"counts_{name}.json").write_text(json.dumps(damaged))
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n\nmore text\n".encode("latin-1"))
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("hello")
    (d / "few.txt").write_text("hello world. " * 5)
    (d / "bad.json").write_text('{"hidden_size": 32,\n')
    (d / "cfg.json").write_text(json.dumps({"intermediate_size": 32}))
    (d / "bool_cfg.json").write_text(json.dumps({"ffn_hidden_size_remain": True}))
    (d / "garbage.pt").write_bytes(b"not a torch file")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"hidden": [1.0], "heads": torch.zeros(1), "ffn": torch.zeros(1)}, d / "listy_scores.pt")
    (d / "a_file").write_text("a file where a folder should be")
    (d / "text.txt").write_text("hello world. " * 40)
    (d / "text.jsonl").write_text(json.dumps({"text": "hello world, " * 40}) + "\n")
    (d / "empty_docs.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n")
    (d / "body.jsonl").write_text(json.dumps({"body": "hello world, " * 40}) + "\n")
    return {"d": d, "hf": hf, "mg": mg, "mgd": mgd, "mgd_missing": missing, "mgd_cut": cut,
            "hf_nan": d / "hf_nan", "mg_nan": mg_nan, "hf_short": short, "bare": bare, "hf_small_vocab": small,
            "hash": tree_hash(d)}


def half_index(plan: dict) -> dict:
    """A plan whose second FFN index of layer 0 is 1.5 (json would read it back as a float)."""
    layers = [dict(lp) for lp in plan["layers"]]
    layers[0]["ffn"] = [0, 1.5, *layers[0]["ffn"][2:]]
    return {**plan, "layers": layers}


def enospc(monkeypatch) -> None:
    """The disk fills while the output is written: every write to a temporary output sibling fails."""
    for name in ("write", "pwrite"):
        real = getattr(os, name)

        def full(fd, *a, _real=real):
            if ".partial-" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real(fd, *a)

        monkeypatch.setattr(os, name, full)


def erofs(monkeypatch) -> None:
    """The output's filesystem is mounted read-only."""
    import tempfile

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)


def interrupt_on_import(monkeypatch) -> None:
    """Ctrl-C while the verb's modules are still being imported."""
    from megatron.prune import cli

    def interrupted(name, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)


def swallowed_interrupt_on_import(monkeypatch) -> None:
    """A real Ctrl-C during the start-up imports that the imported code swallows (a bare ``except:`` around an
    optional import): the run went on and wrote its output."""
    import importlib
    import threading

    real = importlib.import_module
    sent: list[bool] = []
    # the Ctrl-C handler of a fresh process (the CLI's case): a library an earlier test ran may have left its own
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def swallowing(name, *a, **kw):
        if not sent and threading.current_thread() is threading.main_thread():  # not a thread an earlier test left
            sent.append(True)
            try:
                signal.raise_signal(signal.SIGINT)  # the handler runs before this returns (kill + sleep was racy)
            except BaseException:  # noqa: BLE001 - what the library did
                pass
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", swallowing)


def interrupt_after_rename(monkeypatch) -> None:
    """Ctrl-C right after the output was renamed into place (before the summary is printed)."""
    from megatron.prune.formats import hf

    real = hf.apply_plan

    def then_interrupted(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "apply_plan", then_interrupted)


def busy_output(case_dir: Path) -> None:
    (case_dir / "o").mkdir()
    (case_dir / "o" / "keep.txt").write_text("mine")


def existing_counts(case_dir: Path) -> None:
    (case_dir / "c.json").write_text("{}")


@dataclass(frozen=True)
class Case:
    """One row: the command (``{hf}``-style names of the inputs, ``{o}`` the output in the case's own folder), the
    exit code, what the error line must say, and optional set-up of the case folder or faults to stage."""

    argv: str
    rc: int
    says: tuple[str, ...]
    run: str = "cli"  # or a seed entry point (a key of megatron.prune.seed.ENTRY_POINTS)
    setup: Callable[[Path], None] | None = None
    fault: Callable[[pytest.MonkeyPatch], None] | None = None
    leaves: tuple[str, ...] = ()  # what the case may leave in its folder (a complete output)


HF_OUT = "prune --input {hf} --output {o} --method random --ffn-hidden-size 32 --no-progress"
CASES: dict[str, Case] = {
    # damaged torch_dist checkpoints, in every verb that reads one
    "prune dist missing": Case("prune --input {mgd_missing} --output {o} --method random --no-progress", 2,
                               ("__0_0.distcp is missing",)),
    "prune dist truncated": Case("prune --input {mgd_cut} --output {o} --method random --no-progress", 2,
                                 ("__0_0.distcp is truncated",)),
    "convert dist truncated": Case("convert megatron-to-hf --input {mgd_cut} --output {o} --no-progress", 2,
                                   ("__0_0.distcp is truncated",)),
    "reshard dist missing": Case("reshard --input {mgd_missing} --output {o} --tp 2 --no-progress", 2,
                                 ("__0_0.distcp is missing",)),
    "score dist truncated": Case("score --model {mgd_cut} --output {o}.pt " + " ".join(QUICK), 2,
                                 ("__0_0.distcp is truncated",)),
    "eval dist missing": Case("eval --model {mgd_missing} --seq-len 16 --max-tokens 64 --no-progress", 2,
                              ("__0_0.distcp is missing",)),
    "vocab dist truncated": Case("vocab prune --input {mgd_cut} --output {o} --keep 300 --no-progress", 2,
                                 ("__0_0.distcp is truncated",)),
    # outputs that cannot be written, and disks that fill or are read-only
    "output under /proc": Case("prune --input {hf} --output /proc/x --method random --no-progress", 2,
                               ("output /proc/x: cannot write in /proc",)),
    "output parent a file": Case("prune --input {hf} --output {a_file}/x --method random --no-progress", 2,
                                 ("a_file is a file, not a folder",)),
    "convert under /proc": Case("convert hf-to-megatron --input {hf} --output /proc/x --no-progress", 2,
                                ("cannot write in /proc",)),
    "scores parent a file": Case("score --model {hf} --output {a_file}/s.pt " + " ".join(QUICK), 2,
                                 ("a_file is a file, not a folder",)),
    "counts under /proc": Case("vocab count --tokenizer {hf} --data {text_txt} --output /proc/c.json --no-progress",
                               2, ("--output /proc/c.json: cannot write in /proc",)),
    "data under /proc": Case("data --input {text_txt} --output-prefix /proc/x --tokenizer {hf} --no-progress", 2,
                             ("--output-prefix /proc/x", "cannot write in /proc")),
    "disk full mid-write": Case(HF_OUT, 1, ("No space left on device while writing", "free some space"),
                                fault=enospc),
    "read-only filesystem": Case(HF_OUT, 2, ("Read-only file system",), fault=erofs),
    "read-only data folder": Case("data --input {text_txt} --output-prefix {o} --tokenizer {hf} --no-progress", 2,
                                  ("Read-only file system",), fault=erofs),
    # text files the data verb reads well: refused by line where they are not UTF-8
    "score non-utf8 calib": Case("score --model {hf} --output {o}.pt --calib {latin1_txt} " + " ".join(QUICK), 2,
                                 ("--calib", "latin1.txt:1: not UTF-8 (byte 0xe9 at column 4)")),
    "prune non-utf8 calib": Case("prune --input {hf} --output {o} --ffn-hidden-size 32 --calib {latin1_txt} "
                                 "--samples 4 --seq-len 16 --no-progress", 2, ("--calib", "latin1.txt:1: not UTF-8")),
    "prune calib a device": Case("prune --input {hf} --output {o} --ffn-hidden-size 32 --calib /dev/null "
                                 "--samples 4 --seq-len 16 --no-progress", 2,
                                 ("--calib /dev/null: not a regular file",)),
    "prune calib too short for the refit": Case("prune --input {hf} --output {o} --ffn-hidden-size 32 "
                                                + " ".join(QUICK), 2,
                                                ("32 calibration tokens: the refit of a 64-wide input needs at "
                                                 "least 64",
                                                 "--reconstruct none")),
    "eval non-utf8 text": Case("eval --model {hf} --text {latin1_txt} --seq-len 4 --no-progress", 2,
                               ("--text", "latin1.txt:1: not UTF-8")),
    "eval missing text": Case("eval --model {hf} --text {d}/nope.txt --no-progress", 2, ("--text", "no such file")),
    # devices and numbers
    "score device tpu9": Case("score --model {hf} --output {o}.pt --device tpu9 " + " ".join(QUICK), 2,
                              ("--device tpu9: unknown device; choose auto",)),
    "eval device tpu9": Case("eval --model {hf} --device tpu9 --no-progress", 2, ("--device tpu9", "cuda:N")),
    "prune device tpu9": Case(HF_OUT + " --device tpu9", 2, ("--device tpu9",)),
    "eval batch 0": Case("eval --model {hf} --batch-size 0 --no-progress", 2, ("--batch-size 0: must be at least 1",)),
    "eval seq-len past positions": Case("eval --model {hf} --seq-len 100000 --no-progress", 2,
                                        ("--seq-len 100000", "max_position_embeddings 128")),
    "eval max-tokens -1": Case("eval --model {hf} --max-tokens -1 --no-progress", 2, ("--max-tokens -1",)),
    "demo max-tokens 0": Case("demo --max-tokens 0 --output {o}", 2, ("--max-tokens 0: must be at least 1",)),
    "demo calib-samples 0": Case("demo --calib-samples 0 --output {o}", 2, ("--calib-samples 0: must be at least 1",)),
    "demo device unknown": Case("demo --device tpu9 --output {o}", 2, ("--device tpu9: unknown device",)),
    "demo output a file": Case("demo --output {a_file}", 2, ("a_file exists and is not a folder",)),
    "demo output under /proc": Case("demo --output /proc/x", 2, ("output /proc/x", "cannot write in /proc")),
    "convert vocab unit 0": Case("convert hf-to-megatron --input {hf} --output {o} --make-vocab-size-divisible-by 0",
                                 2, ("--make-vocab-size-divisible-by 0: must be at least 1",)),
    "convert vocab unit -4": Case("convert hf-to-megatron --input {hf} --output {o} --make-vocab-size-divisible-by -4",
                                  2, ("--make-vocab-size-divisible-by -4",)),
    "prune samples 0": Case(HF_OUT + " --samples 0", 2, ("--samples 0: must be at least 1",)),
    "prune seq-len 0": Case(HF_OUT + " --seq-len 0", 2, ("--seq-len 0: must be at least 2",)),
    "prune batch 0": Case(HF_OUT + " --batch-size 0", 2, ("--batch-size 0: must be at least 1",)),
    "prune tp 0": Case(HF_OUT + " --tp 0", 2, ("--tp 0: must be at least 1",)),
    "reshard tp 0": Case("reshard --input {mg} --output {o} --tp 0 --no-progress", 2, ("--tp 0: must be at least 1",)),
    "hf output torch_dist": Case(HF_OUT + " --ckpt-format torch_dist", 2,
                                 ("--ckpt-format torch_dist", "HF checkpoint")),
    "megatron-to-hf tp": Case("convert megatron-to-hf --input {mg} --output {o} --tp 2 --no-progress", 2,
                              ("--tp 2: only for hf-to-megatron",)),
    # the refit of the kept weights (the default with activation selection)
    "prune damping 0": Case(HF_OUT.replace("random", "activation") + " --damping 0", 2,
                            ("--damping 0.0: must be > 0 and finite",)),
    "prune damping -1": Case(HF_OUT.replace("random", "activation") + " --damping -1", 2, ("--damping -1.0",)),
    "prune damping inf": Case(HF_OUT.replace("random", "activation") + " --damping inf", 2, ("--damping inf",)),
    "refit without calibration": Case(HF_OUT + " --reconstruct least-squares", 2,
                                      ("--reconstruct least-squares with --method random", "--calib FILE")),
    "calibration text empty": Case(HF_OUT.replace("random", "activation") + " --calib {empty_txt}", 2,
                                   ("--calib", "empty.txt: no text")),
    "calibration text too short": Case(HF_OUT.replace("random", "activation") + " --calib {short_txt}", 2,
                                       ("calibration text has 1 tokens, fewer than one window of --seq-len 256; "
                                        "give more text (--calib)",)),
    "calibration text shorter than a window": Case(HF_OUT.replace("random", "activation") + " --calib {few_txt} "
                                                   "--seq-len 64", 2,
                                                   ("fewer than one window of --seq-len 64", "or a --seq-len of at "
                                                    "most")),
    "calibration in a folder": Case("score --model {hf} --output {o} --calib {d} " + " ".join(QUICK), 2,
                                    ("is a folder; pass a file (--calib takes several: pass the files in it)",)),
    "calibration jsonl without a text field": Case(HF_OUT.replace("random", "activation") + " --calib {body_jsonl}",
                                                   2, ("not a JSON object with a 'text' field (fields: 'body'); name "
                                                       "the field 'text'",)),
    # plans
    "config without hidden_size": Case("convert hf-to-megatron --input {d}/cfg_no_hidden --output {o} --no-progress",
                                       2, ("config.json has no 'hidden_size'",)),
    "config heads null": Case("convert hf-to-megatron --input {d}/cfg_null_heads --output {o} --no-progress", 2,
                              ("config.json 'num_attention_heads': null is not a whole number >= 1",)),
    "config layers a string": Case("prune --input {d}/cfg_text_layers --output {o} --num-layers 2 --no-progress", 2,
                                   ("config.json 'num_hidden_layers': \"4\" is not a whole number >= 1",)),
    "config rope_theta a string": Case("convert hf-to-megatron --input {d}/cfg_rope_text --output {o} --no-progress",
                                       2, ("config.json 'rope_theta': \"big\" is not a positive number",)),
    "config architectures a string": Case("eval --model {d}/cfg_arch_text --no-progress", 2,
                                          ("config.json 'architectures': \"LlamaForCausalLM\" is not a list; write "
                                           "it as [\"LlamaForCausalLM\"]",)),
    "config rms_norm_eps negative": Case("convert hf-to-megatron --input {d}/cfg_eps_negative --output {o} "
                                         "--no-progress", 2,
                                         ("config.json 'rms_norm_eps': -1 is not a positive number",)),
    "config a JSON list": Case(HF_OUT.replace("{hf}", "{d}/cfg_list"), 2,
                               ("cfg_list/config.json holds a JSON array, not an HF config object",)),
    "prune a config of a damaged rope_theta": Case(HF_OUT.replace("{hf}", "{d}/cfg_rope_text"), 2,
                                                   ("config.json 'rope_theta': \"big\" is not a positive number",)),
    "megatron-to-hf a damaged hf_meta value": Case("convert megatron-to-hf --input {d}/mg_meta_rope --output {o} "
                                                   "--no-progress", 2,
                                                   ("mg_meta_rope/hf_meta/config.json 'rope_theta': \"big\" is not a "
                                                    "positive number",)),
    "megatron-to-hf an hf_meta config that is not JSON": Case("convert megatron-to-hf --input {d}/mg_meta_json "
                                                              "--output {o} --no-progress", 2,
                                                              ("mg_meta_json/hf_meta/config.json is not valid JSON",)),
    "eval fewer tokens than a window": Case("eval --model {hf} --max-tokens 1 --seq-len 16 --no-progress", 2,
                                            ("--max-tokens 1: fewer than one window of --seq-len 16; use "
                                             "--max-tokens 16 or more",)),
    "config counts fewer layers than the weights": Case("convert hf-to-megatron --input {hf_short} --output {o} "
                                                        "--no-progress", 2,
                                                        ("beyond config.json's 2 layers", "model.layers.2.",
                                                         "fix the config")),
    "eval a config of fewer layers": Case("eval --model {hf_short} --max-tokens 64 --seq-len 32 --no-progress", 2,
                                          ("beyond config.json's 2 layers",)),
    "eval a model without a tokenizer": Case("eval --model {bare} --max-tokens 64 --seq-len 32 --no-progress", 2,
                                             ("has no tokenizer", "copy the tokenizer files")),
    "plan JSON null": Case("prune --input {hf} --output {o} --plan {plan_null_json} --no-progress", 2,
                           ("this one is a JSON null",)),
    "plan an empty object": Case("prune --input {hf} --output {o} --plan {plan_empty_json} --no-progress", 2,
                                 ("not a prune plan", "(this object's keys: none)")),
    "plan info not an object": Case("prune --input {hf} --output {o} --plan {plan_info_text_json} --no-progress", 2,
                                    ("plan info: a JSON string, expected an object",)),
    "plan negative size": Case("plan show {plan_negative_size_json}", 2,
                               ("plan source num_experts -4: a size cannot be negative",)),
    "plan show a device": Case("plan show /dev/null", 2, ("/dev/null: not a regular file",)),
    "plan a JSON list": Case("prune --input {hf} --output {o} --plan {plan_list_json} --no-progress", 2,
                             ("plan_list.json", "JSON array")),
    "plan norm_scale text": Case("prune --input {hf} --output {o} --plan {plan_scale_text_json} --no-progress", 2,
                                 ("norm_scale: 'big' is not a positive number",)),
    "plan norm_scale negative": Case("prune --input {hf} --output {o} --plan {plan_scale_negative_json}", 2,
                                     ("norm_scale: -1.0 is not a positive number",)),
    "plan index 1.5": Case("prune --input {hf} --output {o} --plan {plan_half_index_json} --no-progress", 2,
                           ("plan ffn: 1.5 is not a whole-number index",)),
    # vocabulary files
    "count an empty file": Case("vocab count --tokenizer {hf} --data {empty_txt} --output {o}.json --no-progress", 2,
                                ("--data", "empty.txt: the file is empty",)),
    "count over counts": Case("vocab count --tokenizer {hf} --data {text_txt} --output {case}/c.json --no-progress",
                              2, ("c.json exists; pass --overwrite",), setup=existing_counts),
    "counts a JSON list": Case("vocab prune --input {hf} --output {o} --keep 300 --counts {counts_list_json}", 2,
                               ("counts_list.json is not a token-counts file (version 1) of megatron-prune",)),
    "counts a count not a number": Case("vocab prune --input {hf} --output {o} --keep 300 --counts "
                                        "{counts_text_count_json}", 2,
                                        ("the count of token id 5 is \"x\", not a whole number >= 0",)),
    "counts an id beyond the vocabulary": Case("vocab prune --input {hf} --output {o} --keep 300 --counts "
                                               "{counts_beyond_json}", 2,
                                               ("counts key '100' is not a token id of the 100-token vocabulary",)),
    "counts key a superscript digit": Case("vocab prune --input {hf} --output {o} --keep 300 --counts "
                                           "{counts_superscript_json}", 2, ("counts key '\u00b2' is not a token id",)),
    "counts without a tokenizer size": Case("vocab prune --input {hf} --output {o} --keep 300 --counts "
                                            "{counts_no_size_json}", 2, ("its 'tokenizer' entry {} lacks",)),
    "counts not an object": Case("vocab prune --input {hf} --output {o} --keep 300 --counts "
                                 "{counts_counts_list_json}", 2, ("'counts' is a JSON array, not an object",)),
    "counts of a huge vocabulary": Case("vocab prune --input {hf} --output {o} --keep 300 --counts {counts_huge_json}",
                                        2, ("vocab_size 1000000000000 is beyond any tokenizer's (at most "
                                            "16,777,216)",)),
    "counts beside keep-ids": Case("vocab prune --input {hf} --output {o} --keep-ids {text_txt} --counts "
                                   "{counts_list_json}", 2,
                                   ("ranks tokens for --keep only; --keep-ids names the kept tokens itself",)),
    "empty keep-ids": Case("vocab prune --input {hf} --output {o} --keep-ids {empty_txt} --no-progress", 2,
                           ("empty.txt holds no token ids",)),
    # non-finite weights, refused by name where they are read
    "prune NaN weight": Case(HF_OUT.replace("{hf}", "{hf_nan}"), 2,
                             ("model.layers.1.mlp.up_proj.weight holds 1 NaN",)),
    "score NaN weight": Case("score --model {hf_nan} --output {o}.pt " + " ".join(QUICK), 2,
                             ("model.layers.1.mlp.up_proj.weight holds 1 NaN",)),
    "eval NaN weight": Case("eval --model {hf_nan} --seq-len 16 --max-tokens 64 --no-progress", 2,
                            ("model.layers.1.mlp.up_proj.weight holds 1 NaN",)),
    "prune Inf in a TP shard": Case("prune --input {mg_nan} --output {o} --hidden-size 40 --method random", 2,
                                    ("mp_rank_01", "decoder.layers.2.mlp.linear_fc2.weight holds 0 NaN and 1 Inf",)),
    # a tokenizer that is not the model's: ids beyond its embedding (an IndexError deep in torch, before)
    "prune tokenizer beyond vocab": Case("prune --input {hf_small_vocab} --output {o} --ffn-hidden-size 32 "
                                         "--reconstruct none " + " ".join(QUICK), 2,
                                         ("token id", "vocabulary has 1000 entries")),
    "prune refit of a random plan, tokenizer beyond vocab": Case(  # no scoring pass: the refit's own check
        "prune --input {hf_small_vocab} --output {o} --ffn-hidden-size 32 --method random --reconstruct least-squares "
        "--calib {d}/text.txt --samples 4 --seq-len 16 --no-progress", 2, ("token id", "vocabulary has 1000 entries")),
    "score tokenizer beyond vocab": Case("score --model {hf_small_vocab} --output {o}.pt " + " ".join(QUICK), 2,
                                         ("vocabulary has 1000 entries",)),
    "eval tokenizer beyond vocab": Case("eval --model {hf_small_vocab} --seq-len 16 --max-tokens 64 --no-progress", 2,
                                        ("vocabulary has 1000 entries",)),
    "eval layer by layer tokenizer beyond vocab": Case("eval --model {hf_small_vocab} --seq-len 16 --max-tokens 64 "
                                                       "--layer-by-layer always --no-progress", 2,
                                                       ("vocabulary has 1000 entries",)),
    # Ctrl-C
    "ctrl-c during start-up": Case(HF_OUT, 130, ("interrupted; nothing half-written is left",),
                                   fault=interrupt_on_import),
    "ctrl-c swallowed during start-up": Case(HF_OUT, 130, ("interrupted; nothing half-written is left",),
                                             fault=swallowed_interrupt_on_import),
    "seed ctrl-c during start-up": Case("--model_name_or_path {hf} --prune_config_path {cfg_json} --output_path {o}",
                                        130, ("interrupted",), run="prune_hf", fault=interrupt_on_import),
    "seed ctrl-c swallowed during start-up": Case("--model_name_or_path {hf} --prune_config_path {cfg_json} "
                                                  "--output_path {o}", 130, ("interrupted",),
                                                  run="prune_hf", fault=swallowed_interrupt_on_import),
    "ctrl-c after the rename": Case(HF_OUT, 130, ("was written in full; it is complete",),
                                    fault=interrupt_after_rename, leaves=("o",)),
    # seed entry points
    "seed config not JSON": Case("--model_name_or_path {hf} --prune_config_path {bad_json} --output_path {o}", 2,
                                 ("--prune_config_path", "bad.json: not valid JSON"), run="prune_hf"),
    "seed config missing": Case("--model_name_or_path {hf} --prune_config_path {d}/no.json --output_path {o}", 2,
                                ("no.json: no such file",), run="prune_hf"),
    "seed config a value of the wrong type": Case("--model_name_or_path {hf} --prune_config_path {bool_cfg_json} "
                                                  "--output_path {o}", 2,
                                                  ("ffn_hidden_size_remain: true is not a whole number",),
                                                  run="prune_hf"),
    "seed config a list": Case("--model_name_or_path {hf} --prune_config_path {plan_list_json} --output_path {o}", 2,
                               ("--prune_config_path", "the prune config must be a JSON object, not a JSON array"),
                               run="prune_hf"),
    "seed ids garbage .pt": Case("--hf_dir {hf} --remain_vocab_path {garbage_pt} --save_dir {o}", 2,
                                 ("garbage.pt: not a torch-saved list of token ids",), run="prune_spm_and_emb"),
    "seed output folder missing": Case("--data_path {text_txt} --spm {hf} --vocab_freq {case}/no/vf --workers 1 "
                                       "--remain_vocab_ids_path {case}/ids.pt", 2, ("folder", "no does not exist"),
                                       run="get_vocab_freq"),
    # refusals that were already right stay so
    "target larger than source": Case("prune --input {hf} --output {o} --ffn-hidden-size 100 --no-progress", 2,
                                      ("--ffn-hidden-size 100",)),
    "output is the input": Case("prune --input {hf} --output {hf} --num-layers 2 --no-progress", 2,
                                ("is the input folder",)),
    "output not empty": Case("prune --input {hf} --output {o} --num-layers 2 --method random --no-progress", 2,
                             ("not empty; pass --overwrite",), setup=busy_output),
    "input missing": Case("prune --input {d}/nope --output {o} --no-progress", 2, ("nope does not exist",)),
    "drop a layer out of range": Case("prune --input {hf} --output {o} --drop-layers 1,9 --no-progress", 2,
                                      ("--drop-layers 9",)),
    "tp not dividing": Case("convert hf-to-megatron --input {hf} --output {o} --tp 3 --no-progress", 2,
                            ("not divisible by tensor-parallel size 3",)),
    "reshard an HF folder": Case("reshard --input {hf} --output {o} --tp 2 --no-progress", 2,
                                 ("latest_checkpointed_iteration.txt",)),
    "eval a bare folder": Case("eval --model {d} --no-progress", 2, ("is not an HF model folder",)),
    "scores file a list": Case("prune --input {hf} --output {o} --scores {list_pt} --num-layers 2 --no-progress", 2,
                               ("scores file", "list.pt holds a list, not the dictionary of a file of `megatron-prune "
                                "score`")),
    "scores not tensors": Case("prune --input {hf} --output {o} --scores {listy_scores_pt} --num-layers 2 "
                               "--no-progress", 2, ("'hidden' is a list, not a tensor",)),
    "scores not torch": Case("prune --input {hf} --output {o} --scores {garbage_pt} --num-layers 2 --no-progress", 2,
                             ("cannot read scores file",)),
    "scores a folder": Case("prune --input {hf} --output {o} --scores {d} --num-layers 2 --no-progress", 2,
                            ("is a folder; give the scores file",)),
    "prune calibration window past the positions": Case("prune --input {hf} --output {o} --seq-len 200 --samples 2 "
                                                        "--num-layers 2 --no-progress", 2,
                                                        ("--seq-len 200: longer than the model's "
                                                         "max_position_embeddings 128",)),
    "score calibration window past the positions": Case("score --model {hf} --output {o} --seq-len 200 --samples 2 "
                                                        "--no-progress", 2, ("--seq-len 200: longer than",)),
    "demo window past the positions": Case("demo --output {o} --seq-len 9000 --max-tokens 20000", 2,
                                           ("--seq-len 9000: longer than the model's max_position_embeddings 8192",)),
    "seed beyond 64 bits": Case("prune --input {hf} --output {o} --method random --seed 99999999999999999999 "
                                "--num-layers 2 --no-progress", 2,
                                ("--seed 99999999999999999999: choose a seed in 0..18446744073709551615",)),
    "scores to a folder": Case("score --model {hf} --output {d} " + " ".join(QUICK), 2, ("is a folder",)),
    "vocab keep too few": Case("vocab prune --input {hf} --output {o} --keep 10 --no-progress", 2,
                               ("--keep 10 is outside",)),
    "data jsonl of empty documents": Case("data --input {empty_docs_jsonl} --output-prefix {o} --tokenizer {hf}", 2,
                                          ("empty_docs.jsonl: no documents (blank lines and empty 'text' fields",)),
    "data two json keys": Case("data --input {text_jsonl} --output-prefix {o} --tokenizer {hf} --json-keys a b", 2,
                               ("--json-keys a b: one key per run",)),
    "data tokenizer folder without one": Case("data --input {text_jsonl} --output-prefix {o} --tokenizer {bare}", 2,
                                              ("no tokenizer.json or tokenizer_config.json in the folder",)),
    "data tokenizer missing": Case("data --input {text_jsonl} --output-prefix {o} --tokenizer {d}/nope.model", 2,
                                   ("nope.model: no such file or folder",)),
    "data workers beyond the machine": Case("data --input {text_jsonl} --output-prefix {o} --tokenizer {hf} "
                                            "--workers 100000", 2,
                                            ("--workers 100000: choose 1..", "at most 4 per CPU")),
    "vocab count workers beyond the machine": Case("vocab count --tokenizer {hf} --data {text_txt} --output {o} "
                                                   "--workers 100000", 2, ("--workers 100000: choose 0..",)),
    "data workers 0": Case("data --input {text_jsonl} --output-prefix {o} --tokenizer {hf} --workers 0", 2,
                           ("--workers 0",)),
}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: what a write would change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_and_faults(name, inputs, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    names = {k: str(v) for k, v in inputs.items()}
    names.update({p.name.replace(".", "_"): str(p) for p in inputs["d"].iterdir() if p.is_file()})
    names.update(o=str(tmp_path / "o"), case=str(tmp_path))
    argv = [part.format(**names) for part in case.argv.split()]
    if case.setup is not None:
        case.setup(tmp_path)
    before, left_before = snapshot(inputs["d"]), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    with monkeypatch.context() as m:
        if case.fault is not None:
            case.fault(m)
        rc = main(argv) if case.run == "cli" else seed.main(case.run, argv)
    err = capsys.readouterr().err
    assert rc == case.rc, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    verb = f"megatron-prune {argv[0]}" if case.run == "cli" else ""
    said = [line for line in lines if line.startswith(verb) and (": error: " in line or ": interrupted" in line)]
    assert len(said) == 1 and said[0] == lines[-1], err[-2000:]  # one line, the last
    for words in case.says:
        assert words in said[0], (words, said[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*left_before, *case.leaves})  # nothing left
    assert snapshot(inputs["d"]) == before  # the inputs untouched


def test_after_the_rename_the_output_is_complete(inputs, tmp_path, monkeypatch, capsys):
    """The Ctrl-C that lands after the final rename: the output it reports complete is the one a plain run
    writes."""
    interrupt_after_rename(monkeypatch)
    out = tmp_path / "o"
    assert main(HF_OUT.format(hf=inputs["hf"], o=out).split()) == 130
    monkeypatch.undo()
    assert main(HF_OUT.format(hf=inputs["hf"], o=tmp_path / "again").split()) == 0
    assert tree_hash(out) == tree_hash(tmp_path / "again")


def test_inputs_are_byte_for_byte_unchanged(inputs):
    """After the table (module order): the damaged and intact inputs hash as the fixture wrote them."""
    assert tree_hash(inputs["d"]) == inputs["hash"]


# ---- what the table cannot stage in process ------------------------------------------------------------------


def test_partials_of_killed_runs_are_removed_by_the_next_run(inputs, tmp_path, capsys):
    """``kill -9`` leaves the temporary sibling (and the refit's scratch folder) behind; the next run writing the same
    output removes them (their process is gone) and says so; one of a live process (another run writing there) is
    named and kept."""
    from megatron.prune.io.atomic import partial_name

    out = tmp_path / "o"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / partial_name(out).replace(f"-{os.getpid()}@", f"-{dead.pid}@")
    (stale / "iter_0000000").mkdir(parents=True)
    (stale / "iter_0000000" / "model.bin").write_bytes(b"x" * 4096)
    scratch = stale.with_name(f"{stale.name}-refit")  # the refit's scratch folder of that run
    scratch.mkdir()
    alive = tmp_path / partial_name(out).replace(f"-{os.getpid()}@", f"-{os.getppid()}@")
    alive.mkdir()
    assert main(HF_OUT.format(hf=inputs["hf"], o=out).split()) == 0
    err = capsys.readouterr().err
    assert f"note: removed {stale}, left by an interrupted run (process {dead.pid})" in err
    assert f"note: removed {scratch}, left by an interrupted run (process {dead.pid})" in err
    assert f"{alive} is being written by process {os.getppid()}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "o"])


def test_mixed_dtypes_convert_to_megatron_and_back_without_loss(inputs, tmp_path, capsys):
    """float32 embeddings, float16 MLP and bfloat16 attention: the Megatron checkpoint holds one dtype (float32,
    which holds each exactly), and megatron-to-hf returns every tensor's value."""
    from safetensors.torch import load_file, save_file

    weights = load_file(inputs["hf"] / "model.safetensors")
    mixed = {k: v.half() if ".mlp." in k else v.bfloat16() if ".self_attn." in k else v for k, v in weights.items()}
    src = shutil.copytree(inputs["hf"], tmp_path / "mixed")
    save_file(mixed, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", "hf-to-megatron", "--input", str(src), "--output", str(tmp_path / "mg"),
                 "--no-progress"]) == 0
    assert "mixes BF16, F16, F32 tensors" in capsys.readouterr().out
    assert main(["convert", "megatron-to-hf", "--input", str(tmp_path / "mg"), "--output", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == mixed.keys()
    for k, v in mixed.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.float()), k


def test_gz_calibration_and_evaluation_text_read_as_the_plain_text(inputs, tmp_path, capsys):
    """``--calib`` and ``eval --text`` take what the data verb takes: a .gz file gives the plain file's scores and
    perplexity."""
    import gzip

    plain = tmp_path / "t.txt"
    plain.write_text(Path(inputs["d"] / "text.txt").read_text() * 4)
    packed = tmp_path / "t.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for f in (plain, packed):
        assert main(["score", "--model", str(inputs["hf"]), "--output", str(tmp_path / f"{f.name}.pt"), "--calib",
                     str(f), *QUICK]) == 0
    a, b = (torch.load(tmp_path / f"{f.name}.pt", weights_only=True) for f in (plain, packed))
    assert all(torch.equal(a[k], b[k]) for k in ("hidden", "heads", "ffn", "layers"))
    lines = []
    for f in (plain, packed):
        capsys.readouterr()
        assert main(["eval", "--model", str(inputs["hf"]), "--text", str(f), "--seq-len", "16", "--no-progress"]) == 0
        lines.append(capsys.readouterr().out.splitlines()[-1])
    assert lines[0] == lines[1] and lines[0].startswith("perplexity: ")


def test_device_defaults_to_cuda_where_there_is_one(monkeypatch):
    """score, eval and prune default to --device auto, which is cuda where a GPU is available, cpu elsewhere."""
    from megatron.prune.cli import build_parser, verb_parser
    from megatron.prune.runtime import resolve_device

    parser = build_parser(["score", "eval", "prune"])
    for verb in ("score", "eval", "prune"):
        assert verb_parser(parser, verb).get_default("device") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (resolve_device("auto"), resolve_device("cuda:1")) == ("cuda", "cuda:1")
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device is available here"):
        resolve_device("cuda")


def test_writer_thread_interrupted_while_starting(tmp_path, monkeypatch):
    """A Ctrl-C inside ``Thread.start`` of the direct-I/O writer: closing the file raises nothing but the
    interrupt (it used to raise "cannot join thread before it is started")."""
    import threading

    from megatron.prune.io.direct_io import SequentialFile

    def interrupted(self):
        raise KeyboardInterrupt

    f = SequentialFile(tmp_path / "x", staging_bytes=4096)
    if not f.direct:
        f.close()
        pytest.skip("no direct I/O here: the file has no writer thread")
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with f:
            f.write(b"x" * 10000)


def test_data_workers_end_with_a_killed_parent(inputs, tmp_path):
    """``data --workers 2`` killed with SIGKILL: its tokenizer processes end with it (they used to run on through
    their queued documents for up to a minute)."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"document {i}: " + "hello world " * 50}) + "\n" for i in range(20000)))
    p = subprocess.Popen([sys.executable, "-m", "megatron.prune", "data", "--input", str(big), "--output-prefix",
                          str(tmp_path / "out"), "--tokenizer", str(inputs["hf"]), "--workers", "2", "--no-progress"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(workers_of(p.pid)) < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.5)
        workers = workers_of(p.pid)
        assert len(workers) >= 2 and p.poll() is None, "the workers never started"
        time.sleep(2)  # let them take documents
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if alive(w)]
    finally:
        p.kill()


def workers_of(pid: int) -> list[int]:
    """The live multiprocessing workers ``pid`` started (from /proc; its resource tracker left out)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Every writing verb (and the seed script that writes) against a real full disk and a real read-only one.
WRITERS = {
    "prune hf": "prune --input {hf} --output {M}/o --method random --ffn-hidden-size 32 --no-progress",
    "prune megatron": "prune --input {mg} --output {M}/o --method random --hidden-size 40 --no-progress",
    "convert torch": "convert hf-to-megatron --input {hf} --output {M}/o --no-progress",
    "convert torch_dist": "convert hf-to-megatron --input {hf} --output {M}/o --ckpt-format torch_dist --no-progress",
    "convert to hf": "convert megatron-to-hf --input {mg} --output {M}/o --no-progress",
    "reshard": "reshard --input {mg} --output {M}/o --tp 1 --no-progress",
    "vocab prune hf": "vocab prune --input {hf} --output {M}/o --keep 300 --no-progress",
    "vocab prune megatron": "vocab prune --input {mg} --output {M}/o --keep 300 --no-progress",
    "vocab count": "vocab count --tokenizer {hf} --data {text} --output {M}/c.json --workers 1 --no-progress",
    "score": "score --model {hf} --output {M}/s.pt --samples 2 --seq-len 16 --no-progress",
    "data": "data --input {text} --output-prefix {M}/d --tokenizer {hf} --no-progress",
    "seed get_vocab_freq": "--data_path {text} --spm {hf} --vocab_freq {M}/vf --remain_vocab_size 300 --workers 1 "
                           "--remain_vocab_ids_path {M}/ids.json",
}
DISK_DRIVER = """
import contextlib, io, json, os, sys
from megatron.prune.cli import main
from megatron.prune.seed.vocab import get_vocab_freq
cases, M = json.loads(sys.argv[1]), sys.argv[2]
out = {}
for name, argv in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = get_vocab_freq(argv) if name.startswith("seed") else main(argv)
    out[name] = [rc, err.getvalue(), sorted(set(os.listdir(M)) - {".filler"})]
    for left in out[name][2]:
        os.system(f"rm -rf '{M}/{left}'")
print(json.dumps(out))
"""


def can_mount_tmpfs() -> bool:
    """A user and mount namespace where a tmpfs can be mounted (root in a container, or unprivileged namespaces)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="no namespace to mount a tiny tmpfs in")
def test_full_and_read_only_disks_in_every_writing_verb(inputs, tmp_path):
    """A tiny tmpfs filled to the last byte, then remounted read-only, in a private mount namespace: every writing
    verb ends with one line naming the output (exit 1 when the disk fills mid-write; 2 when a read-only filesystem
    is found before any work), no traceback, and nothing left on the disk."""
    M = tmp_path / "disk"
    M.mkdir()
    names = {"hf": inputs["hf"], "mg": inputs["mg"], "text": inputs["d"] / "text.txt", "M": M}
    cases = {name: [part.format(**names) for part in argv.split()] for name, argv in WRITERS.items()}
    driver = [sys.executable, "-c", DISK_DRIVER, json.dumps(cases), str(M)]
    script = (f"mount -t tmpfs -o size=256k tmpfs {M} && (dd if=/dev/zero of={M}/.filler bs=4k 2>/dev/null; true) "
              f"&& {subprocess.list2cmdline(driver)} && mount -o remount,ro {M} && {subprocess.list2cmdline(driver)}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    full, read_only = (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
    for results, rc, says in ((full, 1, "No space left on device"), (read_only, 2, "Read-only file system")):
        for name, (got, err, left) in results.items():
            lines = [line for line in err.splitlines() if line.strip()]
            assert "Traceback" not in err and got == (2 if name.startswith("seed") else rc), (name, err[-2000:])
            assert says in lines[-1] and ": error: " in lines[-1], (name, err[-2000:])
            assert sum(": error: " in line for line in lines) == 1, (name, err[-2000:])
            assert left == [], (name, left)
    assert snapshot(inputs["d"]) and tree_hash(inputs["d"]) == inputs["hash"]


def test_recovery_script_refuses_bad_numbers_in_one_line(tmp_path):
    """check_model.sh's numeric variables: not whole numbers >= 1 (TP, TRAIN_ITERS, ...) or not a learning rate are
    one line before any Python start-up (TRAIN_ITERS=0 and TP=x died in every rank or in bash), and LR is read as
    data: it used to be pasted into Python source, so a crafted value ran."""
    marker = tmp_path / "ran"
    cases = [("TP", "x", "expected a whole number >= 1"), ("TRAIN_ITERS", "0", "expected a whole number >= 1"),
             ("TRAIN_ITERS", "-1", "expected a whole number >= 1"), ("LR", "abc", "expected a number >= 0"),
             ("LR", f"1e-4') or open('{marker}', 'w') or print('", "expected a number >= 0"),
             ("MIN_LR", "nan", "expected a number >= 0")]
    for name, value, says in cases:
        env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tmp_path / "d"), "TOKENIZER": str(tmp_path),
               name: value}
        r = subprocess.run(["bash", str(ROOT / "scripts" / "check_model.sh")], env=env, capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 2 and r.stderr == f"check_model.sh: error: {name}={value}: {says}" + (
            " (a learning rate)\n" if "LR" in name else "\n"), (name, value, r.stderr[-2000:])
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated shard", "Inf weight"])
def test_recovery_run_refusals_are_one_line_before_torchrun(damage, inputs, tmp_path):
    """scripts/check_model.sh runs the ranks' pre-start checks once, before torchrun: a damaged checkpoint (a rank's
    shard cut short, an Inf in it) is one line, not a traceback per rank inside torchrun's ChildFailedError, and
    SAVE is left as it was (no hf_meta/ without a checkpoint)."""
    from megatron.prune.data import preprocess
    from tests.procs import free_port

    load = inputs["mg_nan"]
    if damage == "truncated shard":
        load = shutil.copytree(inputs["mg"], tmp_path / "cut")
        shard = load / "iter_0000000" / "mp_rank_01" / "model_optim_rng.pt"
        os.truncate(shard, shard.stat().st_size // 2)
    data = preprocess(inputs["d"] / "text.jsonl", tmp_path / "c", inputs["hf"], progress=False)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port()),
           "LOAD": str(load), "SAVE": str(tmp_path / "save"), "DATA": str(data.bin_path)[:-4],
           "TOKENIZER": str(inputs["hf"]), "TP": "2", "TRAIN_ITERS": "2", "SEQ_LEN": "16", "MICRO_BATCH": "1",
           "GLOBAL_BATCH": "2"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_model.sh")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    says = {"truncated shard": "cannot read Megatron shard", "Inf weight": "holds 0 NaN and 1 Inf"}[damage]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("pretrain_llama.py: error: ") and says in lines[0] and "mp_rank_01" in lines[0]
    assert not (tmp_path / "save").exists()
