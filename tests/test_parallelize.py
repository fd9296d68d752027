"""fused_tp.parallelize on tiny random-weight Hugging Face models of the Llama family (no downloads), on gloo ranks:
logits, every gradient and greedy generate() as the dense model's."""

import os

import pytest
import torch
from torch import nn

import dist_cases
import fused_tp
from fused_tp.parallelize import head_spans
from fused_tp.tolerance import tol

WORLDS = [int(w) for w in os.environ.get("FUSED_TP_TEST_WORLDS", "2,3,4").split(",")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_a_parallelized_model_matches_the_dense_one(rank_pools, device, world, family):
    """4 query heads in 2 groups over 2, 3 and 4 ranks (at 4, each key/value head on two ranks, its gradient summed
    over them), an intermediate width of 40 split unevenly at 3, Qwen2's q/k/v biases: norm-wise within the
    rounding of a few stages of fp32 sums and an all-reduce over the ranks."""
    bound = tol(torch.float32, 64, rounds=world, stages=8).rel
    outs = rank_pools(world).run(dist_cases.parallel_model_step, family, device, bound)
    for rank, out in enumerate(outs):
        assert out.pop("generate"), f"rank {rank}: greedy generate() gave other tokens than the dense model"
        bad = {name: r for name, r in out.items() if not r <= 1}
        assert not bad, f"rank {rank}: over the bound (ratio): {bad}"


def test_head_spans_and_refusals():
    """Query heads split as tensor_split; each rank's key/value heads are the ones its query heads read."""
    assert head_spans(4, 2, 3) == [(0, 2, 0, 1), (2, 3, 1, 2), (3, 4, 1, 2)]
    assert head_spans(8, 2, 4) == [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]
    assert head_spans(32, 8, 8) == [(4 * r, 4 * r + 4, r, r + 1) for r in range(8)]
    with pytest.raises(ValueError, match=r"num_key_value_heads: 8 query heads in 2 groups over 3 ranks give rank 1 "
                                         r"query heads \[3, 6\), which do not read key/value heads \[0, 2\) in "
                                         r"equal groups"):  # fmt: skip
        head_spans(8, 2, 3)
    with pytest.raises(ValueError, match="num_attention_heads: expected at least one head per rank, got 2 heads for 4"):
        head_spans(2, 2, 4)


def test_parallelize_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match=r"plan: expected a plan for a Sequential \(without one: LlamaForCausalLM"):
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"plan\['0'\]: expected one of 'colwise', 'rowwise', 'swiglu', 'attention', "
                                         r"got 'diagonal'"):  # fmt: skip
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)), {"0": "diagonal"})
    with pytest.raises(ValueError, match=r"plan\['fc\*'\]: no module of the model has a matching name"):
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)), {"fc*": "colwise"})
    model = fused_tp.parallelize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)),
                                 {"0": "colwise", "2": "rowwise"})  # fmt: skip
    assert isinstance(model[0], fused_tp.ColumnParallelLinear) and isinstance(model[2], fused_tp.RowParallelLinear)
