"""Mode "ordered" of the Gluon Hopper backward (kernels/backward_sm90.py): the order of the dQ
reductions, checked on the CPU through its Python restatement (cta_row_blocks: the CTAs' loops;
ordered_predecessors: the kernel's count of the reductions before a CTA's, integer for integer).
No kernel runs here (the GPU check: benchmarks/gluon_ordered_check.py)."""

import itertools
import random

import pytest

bwd = pytest.importorskip("ioattn.kernels.backward_sm90")


def _cases():
    lens = (1, 63, 64, 65, 127, 128, 129, 300, 700, 1000)
    for sq, sk in itertools.product(lens, lens):
        for rows, causal in itertools.product((64, 128), (False, True)):
            for left in (-1, 0, 1, 63, 200):
                yield sq, sk, rows, causal, left


def test_ordered_predecessors_match_enumeration():
    """For every CTA (key block nb) and row block m it visits: the kernel's count equals the number
    of CTAs that visit m and come first in the order, which is the grid's dispatch order
    (increasing key blocks; decreasing with a causal mask, the grid reversed), so a CTA only waits
    for CTAs launched before it. The CTAs that visit a row block are a run of key blocks, and each
    semaphore ends at the number of CTAs that visit its block."""
    n = 0
    for sq, sk, rows, causal, left in _cases():
        nbs = range((sk + 127) // 128)
        visits = {nb: set(bwd.cta_row_blocks(nb, sq, sk, causal, left, rows)) for nb in nbs}
        dispatch = list(nbs)[::-1] if causal else list(nbs)  # the kernel's key block of grid index 0, 1, ...
        for nb in nbs:
            for m in visits[nb]:
                before = [o for o in dispatch[:dispatch.index(nb)] if m in visits[o]]
                assert bwd.ordered_predecessors(nb, m, sq, sk, causal, left, rows) == len(before), (
                    sq, sk, rows, causal, left, nb, m)
                n += 1
        for m in set().union(*visits.values()) if visits else ():
            who = [nb for nb in nbs if m in visits[nb]]
            assert who == list(range(who[0], who[-1] + 1))  # a run of key blocks
    assert n > 5000


def test_ordered_protocol_completes_in_dispatch_order():
    """The protocol as the kernel runs it, with GQA (each CTA visits its row blocks once per query
    head of the group) and the release of a block's semaphore only during the next block (or at
    the loop's end): CTAs run one at a time in dispatch order (the least concurrency the grid
    order guarantees) and never wait for a count they cannot reach; every semaphore ends at 4 x the
    CTAs that visit its block, and each block's adds come in the kernel's order."""
    rng = random.Random(0)
    for _ in range(60):
        sq, sk = rng.randint(1, 900), rng.randint(1, 900)
        rows, causal, group = rng.choice((64, 128)), rng.random() < 0.5, rng.choice((1, 2, 3))
        left = rng.choice((-1, -1, 0, 50, 300))
        nbs = list(range((sk + 127) // 128))
        sem, adds = {}, {}
        for nb in (nbs[::-1] if causal else nbs):
            blocks = [(g, m) for g in range(group) for m in bwd.cta_row_blocks(nb, sq, sk, causal, left, rows)]
            pending = None
            for g, m in blocks:
                for half in (0, 1):  # (each warpgroup: its own column half's semaphore)
                    target = 4 * bwd.ordered_predecessors(nb, m, sq, sk, causal, left, rows)
                    assert sem.get((g, m, half), 0) == target, (sq, sk, rows, causal, left, group, nb, g, m)
                    adds.setdefault((g, m, half), []).append(nb)
                if pending is not None:  # the previous block's release, during this one
                    for half in (0, 1):
                        sem[pending + (half,)] = sem.get(pending + (half,), 0) + 4
                pending = (g, m)
            if pending is not None:
                for half in (0, 1):
                    sem[pending + (half,)] = sem.get(pending + (half,), 0) + 4
        for key, order in adds.items():
            assert sem[key] == 4 * len(order)
            assert order == sorted(order, reverse=causal)


def test_ordered_varlen_semaphores_disjoint():
    """Varlen: sequence b's row blocks take semaphore rows q_off // rows + b + m, which no other
    sequence's reach, within ordered_semaphore_count."""
    rng = random.Random(1)
    for _ in range(200):
        rows = rng.choice((64, 128))
        lens = [rng.choice((0, 1, 63, 64, 65, rng.randint(0, 700))) for _ in range(rng.randint(1, 9))]
        offs = [sum(lens[:i]) for i in range(len(lens))]
        used = set()
        for b, (q_off, n) in enumerate(zip(offs, lens)):
            for m in range((n + rows - 1) // rows):
                r = q_off // rows + b + m
                assert r not in used
                used.add(r)
        total = bwd.ordered_semaphore_count(len(lens), 1, None, rows, total_q=sum(lens)) // 2
        assert all(r < total for r in used)
