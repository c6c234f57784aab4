import math

import pytest
import torch

from longcat.config.schema import NonFinitePolicy
from longcat.train.nonfinite import (
    NonFiniteCheckpointError,
    NonFiniteError,
    NonFiniteGuard,
    assert_finite_state,
    nonfinite_tensors,
)


def test_guard_skips_and_counts():
    guard = NonFiniteGuard(NonFinitePolicy.skip, world_group=None)
    assert not guard.should_skip(1.5, loss=2.0, step=1) and not guard.skipped_last
    assert guard.should_skip(math.nan, loss=2.0, step=2) and guard.skipped_last
    assert guard.should_skip(0.5, loss=math.inf, step=3)
    assert not guard.should_skip(0.5, loss=2.0, step=4) and not guard.skipped_last
    assert guard.num_skipped == 2


def test_guard_aborts_under_abort_or_when_the_update_already_happened():
    with pytest.raises(NonFiniteError, match="step 7"):
        NonFiniteGuard(NonFinitePolicy.abort, world_group=None).should_skip(math.inf, loss=1.0, step=7)
    with pytest.raises(NonFiniteError, match="deepspeed"):
        NonFiniteGuard(NonFinitePolicy.skip, world_group=None).should_skip(math.nan, loss=1.0, step=1, skippable=False)


@pytest.mark.parametrize("grad_norm,loss,what", [
    (math.nan, 1.0, "non-finite grad norm at step 2"),
    (1.0, math.inf, "non-finite loss at step 2"),
    (math.nan, math.nan, "non-finite loss and grad norm at step 2"),
])
def test_guard_message_names_what_was_non_finite(grad_norm, loss, what):
    with pytest.raises(NonFiniteError) as info:
        NonFiniteGuard(NonFinitePolicy.abort, world_group=None).should_skip(grad_norm, loss=loss, step=2)
    assert str(info.value).startswith(f"{what} (this rank: "), str(info.value)


def test_finite_state_check_names_the_tensor():
    named = [("ok", torch.ones(3)), ("ids", torch.arange(3)), ("bad", torch.tensor([1.0, math.nan]))]
    assert nonfinite_tensors(named) == ["bad"]
    assert_finite_state(named[:2])
    with pytest.raises(NonFiniteCheckpointError, match="rank 0: bad"):
        assert_finite_state(named)
