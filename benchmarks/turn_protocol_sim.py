"""A model of the Gluon forward's barrier protocol (kernels/forward_sm90.py), run on the CPU: the
producer, the two consumer warpgroups and the TMA completions as cooperative agents under mbarrier
phase semantics (a wait on parity p passes once the phase of that parity has completed; a fresh
barrier counts the phase before its first as completed), completions in random order. The
persistent kernel's loop with one tile is the per-tile kernel's. Levels as IOATTN_GLUON_PINGPONG:
0 none, 1 turns around each wgmma issue point, 2 turns and K loaded one block ahead of V.

Checks: no deadlock (a state where every agent waits and no load is in flight), no wait that
could have seen two phases at once (ABA), and with turns the warpgroups' issue points alternate
(warpgroup 0's turn t, then 1's turn t, then 0's turn t + 1). It checks the protocol as written
here, whose parities mirror the kernel's; not the kernel itself.

    python benchmarks/turn_protocol_sim.py [--seeds 3000]
"""

import argparse
import random

BLOCKED, STEP = "blocked", "step"


class Barrier:
    """An mbarrier: a phase completes when ``count`` arrivals have come."""

    def __init__(self, count):
        self.count, self.pending, self.phases = count, count, 0

    def arrive(self):
        self.pending -= 1
        if self.pending == 0:
            self.phases += 1
            self.pending = self.count


def wait(bar, phase):
    """Wait as the kernel does, on the parity of ``phase`` (the 0-based phase meant; -1: the phase
    before the first), until that parity's phase has completed."""
    parity = phase & 1
    while (bar.phases & 1) == parity:
        yield BLOCKED
    # the parity test is only sound while the barrier is at most one phase past the one meant
    assert phase + 1 <= bar.phases <= phase + 2 or (phase == -1 and bar.phases <= 1), (phase, bar.phases)


def _state(bars, in_flight, issued):
    return tuple((b.phases, b.pending) for b in bars), len(in_flight), len(issued)


def run(tiles, stages, level, seed):
    """One CTA over tiles (their key-block counts). Returns the number of wgmma issue points."""
    rng = random.Random(seed)
    k_ready, v_ready = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
    k_empty, v_empty = [Barrier(2) for _ in range(stages)], [Barrier(2) for _ in range(stages)]
    q_ready, q_empty = [Barrier(1), Barrier(1)], [Barrier(2), Barrier(2)]
    turn = [Barrier(1), Barrier(1)]
    in_flight = []  # TMA loads: the barrier each completes on
    issued = []  # (warpgroup, turn) in issue order

    def load(ready, empty, c):
        yield from wait(empty[c % stages], c // stages - 1)
        in_flight.append(ready[c % stages])
        yield STEP

    def producer():
        c = 0
        for i, n_blocks in enumerate(tiles):
            yield from wait(q_empty[i % 2], i // 2 - 1)
            in_flight.append(q_ready[i % 2])
            if level == 2:
                for j in range(n_blocks):
                    yield from load(k_ready, k_empty, c + j)
                    if j > 0:
                        yield from load(v_ready, v_empty, c + j - 1)
                if n_blocks > 0:
                    yield from load(v_ready, v_empty, c + n_blocks - 1)
                c += n_blocks
            else:
                for _ in range(n_blocks):
                    yield from load(k_ready, k_empty, c)
                    yield from load(v_ready, v_empty, c)
                    c += 1

    def consumer(wg):
        def issue(t):  # _turn_wait, the wgmmas, _turn_pass
            if level:
                # parity (t + 1 - wg) & 1: warpgroup 0's turn t follows 1's pass t - 1, 1's follows 0's pass t
                yield from wait(turn[wg], t - 1 if wg == 0 else t)
            issued.append((wg, t))
            yield STEP
            if level:
                turn[1 - wg].arrive()

        c = t = 0
        for i, n_blocks in enumerate(tiles):
            yield from wait(q_ready[i % 2], i // 2)
            if i > 0:
                q_empty[1 - i % 2].arrive()  # (after the previous tile's store)
            if n_blocks > 0:
                yield from wait(k_ready[c % stages], c // stages)
                yield from issue(t)
                k_empty[c % stages].arrive()
                for j in range(1, n_blocks):
                    cj = c + j
                    yield from wait(k_ready[cj % stages], cj // stages)
                    yield from wait(v_ready[(cj - 1) % stages], (cj - 1) // stages)
                    yield from issue(t + j)
                    k_empty[cj % stages].arrive()
                    for _ in range(rng.randint(0, 3)):  # the softmax
                        yield STEP
                    v_empty[(cj - 1) % stages].arrive()
                last = c + n_blocks - 1
                yield from wait(v_ready[last % stages], last // stages)
                yield from issue(t + n_blocks)
                v_empty[last % stages].arrive()
                t += n_blocks + 1
            c += n_blocks

    agents = [producer(), consumer(0), consumer(1)]
    while agents:
        if in_flight and rng.random() < 0.5:
            in_flight.pop(rng.randrange(len(in_flight))).arrive()
            continue
        before = _state(k_ready + v_ready + k_empty + v_empty + q_ready + q_empty + turn, in_flight, issued)
        for agent in rng.sample(agents, len(agents)):
            try:
                if next(agent) == STEP:
                    break
            except StopIteration:
                agents.remove(agent)
                break
        else:  # every agent waits: a deadlock unless a load is in flight or an agent got further
            after = _state(k_ready + v_ready + k_empty + v_empty + q_ready + q_empty + turn, in_flight, issued)
            assert in_flight or after != before, f"deadlock: tiles {tiles}, stages {stages}, level {level}"
    if level:
        pos = {key: n for n, key in enumerate(issued)}
        for (wg, t), n in pos.items():
            assert wg == 0 or pos[(0, t)] < n, "warpgroup 1 issued before warpgroup 0's turn"
            assert wg == 1 or t == 0 or pos[(1, t - 1)] < n, "warpgroup 0 issued twice in a row"
    return len(issued)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3000)
    args = ap.parse_args(argv)
    n = 0
    for seed in range(args.seeds):
        r = random.Random(seed)
        tiles = [r.choice([0, 1, 2, 3, 5, 8]) for _ in range(r.randint(1, 6))]
        for stages in (2, 3):
            for level in (0, 1, 2):
                n += run(tiles, stages, level, seed)
    print(f"ok: {args.seeds} tile sequences x 2 stage counts x 3 levels, {n} wgmma issue points: "
          "no deadlock, no ABA, turns alternate")


if __name__ == "__main__":
    main()
