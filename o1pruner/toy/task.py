"""The toy reasoning task: a chain of single-digit additions and subtractions, solved by a trace writer
that thinks "too long" on easy problems.

A problem is ``Compute s+a-b+c...`` with a start digit and ``level + 1`` signed digits (level 1 = 2
operations, the easiest; level 5 = 6 operations); every running total stays in 0..9, so each step is one
lookup in a small table that a tiny model learns in a minute, and no signed digit repeats within a
problem, so the next operand is always unambiguous. The reference traces solve it one operation per
line and, like o1-style models, re-verify each step at random ("check 8-4=4" lines), MORE on easy
problems than on hard ones (length disharmony). A step slips (writes a wrong total) with a small
probability; only a check right after it catches the slip (it recomputes the step and the solution goes
on from the corrected value), so dropping the checks costs some accuracy in the sampled solutions and
the length/accuracy trade-off that O1-Pruner's reward balances is real.

The number of checks after a step is drawn from a per-level chain of continuation probabilities whose
greedy path (continue while the probability is > 0.5) is the mode, so greedy decoding of a model fit to
the traces still verifies: 2 checks per step at levels 1-2, 1 at levels 3-4, none at level 5.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: level -> P(check k+1 | k checks written after this step), k = 0, 1, 2 (at most 3 checks per step).
#: The first probability stays just above 0.5 so greedy decoding still checks, while ~40% of steps have
#: no check: pruned (check-free) traces are then in the model's own distribution, not a new behaviour.
CHECK_CONTINUE: dict[int, tuple[float, float, float]] = {
    1: (0.62, 0.75, 0.25),
    2: (0.60, 0.70, 0.20),
    3: (0.62, 0.30, 0.10),
    4: (0.58, 0.25, 0.05),
    5: (0.30, 0.15, 0.00),
}
LEVELS: tuple[int, ...] = tuple(sorted(CHECK_CONTINUE))


@dataclass(frozen=True)
class TaskConfig:
    """How problems and reference traces are drawn."""

    slip_rate: float = 0.06  # P(a step line writes a wrong total)
    check_continue: dict[int, tuple[float, float, float]] = field(
        default_factory=lambda: dict(CHECK_CONTINUE)
    )


def _op(x: int) -> str:
    return f"+{x}" if x >= 0 else f"-{-x}"


@dataclass(frozen=True)
class ToyProblem:
    start: int
    ops: tuple[int, ...]  # signed digits, e.g. (3, -4, 2)

    @property
    def level(self) -> int:
        return len(self.ops) - 1

    @property
    def question(self) -> str:
        return f"Compute {self.start}{''.join(_op(x) for x in self.ops)}."

    @property
    def answer(self) -> str:
        return str(self.start + sum(self.ops))


def draw_problem(rng: random.Random, level: int, config: TaskConfig = TaskConfig()) -> ToyProblem:
    """A random problem with ``level + 1`` distinct signed digits and every running total in 0..9."""
    if level not in config.check_continue:
        raise ValueError(f"level {level!r} is not one of {sorted(config.check_continue)}")
    while True:
        total = start = rng.randint(0, 9)
        ops: list[int] = []
        for _ in range(level + 1):
            choices = [d for d in range(-9, 10) if d != 0 and d not in ops and 0 <= total + d <= 9]
            if not choices:
                break
            d = rng.choice(choices)
            ops.append(d)
            total += d
        if len(ops) == level + 1:
            return ToyProblem(start, tuple(ops))


def draw_problems(
    n: int, seed: int, config: TaskConfig = TaskConfig(), exclude: set[str] | frozenset[str] = frozenset()
) -> list[ToyProblem]:
    """``n`` distinct problems, levels cycling 1..5 (balanced), none whose question is in ``exclude``."""
    rng = random.Random(f"toy-problems-{seed}")
    seen = set(exclude)
    out: list[ToyProblem] = []
    levels = sorted(config.check_continue)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct problems with {config}")
        p = draw_problem(rng, levels[len(out) % len(levels)], config)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def _slip(rng: random.Random, value: int) -> int:
    return rng.choice((value - 2, value - 1, value + 1, value + 2))


def write_trace(problem: ToyProblem, rng: random.Random, config: TaskConfig = TaskConfig()) -> str:
    """One reference reasoning trace (the assistant's text, without EOS), ending in ``\\boxed{...}``.

    The final answer can only be wrong when a slip was not followed by a check.
    """
    cont = config.check_continue[problem.level]
    lines: list[str] = []
    total = problem.start
    for d in problem.ops:
        true = total + d
        shown = _slip(rng, true) if rng.random() < config.slip_rate else true
        lines.append(f"{total}{_op(d)}={shown}")
        checks = 0
        while checks < len(cont) and rng.random() < cont[checks]:
            lines.append(f"check {total}{_op(d)}={true}")
            shown = true
            checks += 1
        total = shown
    lines.append(f"answer \\boxed{{{total}}}")
    return "\n".join(lines)


def greedy_checks(level: int, config: TaskConfig = TaskConfig()) -> int:
    """Checks per step on the mode path: continue while the continuation probability is > 0.5."""
    cont = config.check_continue[level]
    n = 0
    while n < len(cont) and cont[n] > 0.5:
        n += 1
    return n


def solution_trace(problem: ToyProblem, checks_per_step: int) -> str:
    """A slip-free trace with ``checks_per_step`` checks after every step."""
    lines: list[str] = []
    total = problem.start
    for d in problem.ops:
        line = f"{total}{_op(d)}={total + d}"
        lines += [line, *[f"check {line}"] * checks_per_step]
        total += d
    lines.append(f"answer \\boxed{{{total}}}")
    return "\n".join(lines)


def greedy_trace(problem: ToyProblem, config: TaskConfig = TaskConfig()) -> str:
    """The mode path of the trace distribution (no slips, the more likely branch of each check decision)."""
    return solution_trace(problem, greedy_checks(problem.level, config))


def pruned_trace(problem: ToyProblem) -> str:
    """The shortest correct trace (no checks): where length harmonizing should move greedy decoding."""
    return solution_trace(problem, 0)


def expected_checks(level: int, config: TaskConfig = TaskConfig()) -> float:
    """E[number of checks after one step] at ``level``."""
    expect, p = 0.0, 1.0
    for c in config.check_continue[level]:
        p *= c
        expect += p
    return expect
