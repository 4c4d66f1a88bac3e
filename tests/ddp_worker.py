"""One rank of a torch DistributedDataParallel run of an S-MoE model on CPU (gloo), launched by torchrun from
tests/test_distributed.py. Each rank trains on a batch of another (bandwidth, task) route pair, so on every rank the
other rank's experts get no data: with ``find_unused_parameters=False`` (fairseq's default for pytorch_ddp) a
parameter without a gradient would make DDP raise or hang. Writes the final parameters of rank 0 to ``OUT``.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT STEPS
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fairseq.models import ARCH_MODEL_REGISTRY

from fairseq_smoe.cli import params
from fairseq_smoe.tasks.dictionary_only import DictionaryOnlyTask
from fairseq_smoe.routing import RoutingTable


def build_model():
    torch.manual_seed(1)
    args = params.model_args("s2t_encdec_smoe_xs", RoutingTable(), dict(
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layers=2, decoder_layers=1))
    return ARCH_MODEL_REGISTRY["s2t_encdec_smoe_xs"].build_model(args, DictionaryOnlyTask(60))


def rank_batch(rank: int, step: int):
    """Rank r's batch at a step: 3 utterances, all of route pair (r, r)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    src = torch.randn(3, 40, 80, generator=g)
    lengths = torch.full((3,), 40)
    target = torch.randint(4, 60, (3, 6), generator=g)
    prev = torch.cat([torch.full((3, 1), 2), target[:, :-1]], dim=1)
    routes = torch.full((3,), rank)
    return src, lengths, prev, routes, routes, target


def loss_of(model, batch):
    src, lengths, prev, enc, dec, target = batch
    logits, _ = model(src, lengths, prev, enc, dec)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def main(out: str, steps: int):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank_batch(rank, step)).backward()  # DDP averages the gradients of the two ranks
        opt.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
