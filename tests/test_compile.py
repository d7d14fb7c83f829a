"""trainer.compile=true (torch.compile, here on the CPU): the same updates as the eager
model with accumulation and clipping, the uncompiled module in the checkpoints, and a
resume that ends where the uninterrupted compiled run ends."""

from __future__ import annotations

import pytest
from helpers import assert_identical, final_weights, tiny, train, weights
from test_accumulation import max_relative_difference

pytestmark = pytest.mark.slow


def test_compiled_runs_train_save_and_resume_as_eager_ones(tmp_path, corpus):
    args = tiny(corpus, "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.eval_every=3",
                "trainer.grad_accum_steps=2", "clip.max_norm=0.5", "optimizer=sgd",
                "optimizer.lr=0.3", "scheduler=constant")
    eager = train(tmp_path / "eager", *args)
    compiled = train(tmp_path / "compiled", *args, "trainer.compile=true")
    assert compiled["steps"] == eager["steps"] == 6
    # the checkpoint holds the module's own names, not the compiled wrapper's (_orig_mod.)
    saved = final_weights(tmp_path / "compiled")
    assert saved.keys() == final_weights(tmp_path / "eager").keys()
    assert max_relative_difference(saved, final_weights(tmp_path / "eager")) < 1e-5

    resumed = tmp_path / "resumed"
    train(resumed, *args, "trainer.compile=true", "trainer.max_steps=3")
    assert_identical(weights(resumed / "checkpoints/step-00000003/model.safetensors"),
                     weights(tmp_path / "compiled/checkpoints/step-00000003/model.safetensors"))
    train(resumed, *args, "trainer.compile=true", f"resume={resumed}")
    assert_identical(final_weights(resumed), saved)
