"""The distillation teacher: vocabulary and layout checks."""

from __future__ import annotations

from argparse import Namespace

import pytest

from megatron.prune.errors import PruneError
from megatron.prune.training import teacher as teacher_mod


def test_teacher_checks():
    student = Namespace(tensor_model_parallel_size=2, padded_vocab_size=384, pipeline_model_parallel_size=1)
    teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="TP=1"):
        teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=1, padded_vocab_size=384), student)
    with pytest.raises(PruneError, match="padded vocab 320"):
        teacher_mod.check_teacher(Namespace(tensor_model_parallel_size=2, padded_vocab_size=320), student)
    # the same padded size, but 300 vs 290 tokens (our checkpoints record both; a stock one may have no vocab_size)
    teacher = Namespace(tensor_model_parallel_size=2, padded_vocab_size=384, vocab_size=300)
    with pytest.raises(PruneError, match="teacher's vocabulary has 300 tokens, the student's .--load. 290"):
        teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=290))
    teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=300))
    teacher_mod.check_teacher(teacher, student, student_ckpt_args=Namespace(vocab_size=None))


def test_teacher_layout_checks():
    """A torch-format teacher must match the student's TP and PP (one reshard command names both); torch_dist
    reshards on load. At PP > 1 the teacher's layers must split evenly, and virtual pipelines are refused."""
    student = Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, padded_vocab_size=384,
                        kd_teacher_load="/t/", virtual_pipeline_model_parallel_size=None)
    teacher = Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, padded_vocab_size=384,
                        num_layers=4)
    with pytest.raises(PruneError, match=r"saved at TP=1, PP=1, the student runs at TP=2, PP=2; reshard the teacher: "
                                         r"megatron-prune reshard --input /t/ --output /t-tp2-pp2 --tp 2 --pp 2$"):
        teacher_mod.check_teacher(teacher, student)
    teacher_mod.check_teacher(teacher, student, teacher_torch_dist=True)
    teacher_mod.check_teacher(Namespace(**{**vars(teacher), "tensor_model_parallel_size": 2,
                                  "pipeline_model_parallel_size": 2}), student)
    with pytest.raises(PruneError, match="the teacher's 3 layers do not split evenly over PP=2 stages"):
        teacher_mod.check_teacher(Namespace(**{**vars(teacher), "num_layers": 3}), student, teacher_torch_dist=True)
    with pytest.raises(PruneError, match="virtual pipeline"):
        teacher_mod.check_teacher(teacher, Namespace(**{**vars(student), "virtual_pipeline_model_parallel_size": 2}),
                         teacher_torch_dist=True)
