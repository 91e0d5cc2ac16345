"""Final-answer extraction and equivalence checking (docs/method.md, "Evaluation").

The final answer of a response is the content of its last ``\\boxed{...}`` (also ``\\boxed X`` without
braces and ``\\fbox{...}``), looked for only after the last ``</think>``; without a box, the last explicit
"the (final) answer is X" statement; otherwise there is none and the response is wrong. Special cases:

* ``</think>`` present: only the text after the last one counts (nothing after it: no answer).
* no ``</think>``: the whole response counts (the rule reads "after any ``</think>``"), also when it opened
  a ``<think>`` block that was never closed.
* "the answer is X" counts only as the *closing* statement: at most ``MAX_TAIL_CHARS`` characters
  (say "I hope it is correct.") may follow the sentence that states it; reasoning that goes on after it
  means the model had not settled, as in a response cut off at the token limit.
* the last box is cut off (unbalanced braces, e.g. at the token limit): no answer; an earlier
  complete box does not stand in for it, because the model was still writing its final answer.

Equivalence: a light normalisation (``$``, ``\\left``/``\\right``, ``\\dfrac``, thousands separators,
``\\%``, ``^\\circ``, trailing units such as ``\\text{ cm}`` or ``dollars`` after a number, a trailing
period), then an exact / rational-number fast path, then math-verify's ``parse`` + ``verify``. math-verify's
own timeout uses ``signal.alarm`` (main thread only), so it runs with its timeouts off inside a small pool
of helper processes, and a call that exceeds the budget (``DEFAULT_TIMEOUT_S``) kills its helper, which is
replaced on the next call; such a comparison counts as wrong. Answers longer than ``MAX_VERIFY_CHARS`` are
compared as normalised strings only. Nothing here raises on any input, and everything is thread-safe.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0  # per math-verify comparison (helper process killed beyond it)
STARTUP_TIMEOUT_S = 30.0  # one-off start of a helper process (python + math-verify import, ~0.5 s)
ACQUIRE_TIMEOUT_S = 30.0  # wait for a free helper when more threads than helpers are grading
MAX_VERIFY_CHARS = 1000  # longer answers/golds: normalised string comparison only
MAX_STATEMENT_CHARS = 500  # "the answer is X": X is cut to this many characters
MAX_TAIL_CHARS = 40  # text allowed after a closing "the answer is X" sentence
_CACHE_SIZE = 65536
_RETRY_START_S = 60.0

# ----------------------------------------------------------------------------------------------------
# Extraction


def _as_text(x: Any) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", errors="replace")
    return None


def _after_thinking(text: str) -> str | None:
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>") :]
    return text


# A backslash escapes the next character (``\{`` and ``\}`` are literal braces, ``\\`` a line break).
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)


def _braced_content(text: str, open_pos: int) -> str | None:
    """Content of the group opened by ``text[open_pos] == "{"``, or None if never closed. Linear time."""
    depth = 0
    for m in _BRACE_TOKEN_RE.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def last_box(text: str) -> tuple[bool, str | None]:
    """(a box command was found, its content or None when cut off / empty)."""
    best, cmd = -1, ""
    for c in ("\\boxed", "\\fbox"):
        i = text.rfind(c)
        if i > best:
            best, cmd = i, c
    if best < 0:
        return False, None
    i = best + len(cmd)
    n = len(text)
    if i < n and text[i] == "{":
        content = _braced_content(text, i)
        return True, (content.strip() or None) if content is not None else None
    if cmd == "\\boxed" and i < n and text[i] in " \t":
        # "\boxed 5": the argument is the next run of non-space characters.
        m = re.compile(r"[ \t]*([^\s$]+)").match(text, i)
        return True, m.group(1) if m else None
    return True, None


_ANSWER_IS_RE = re.compile(r"\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.;!?](?=\s|$)")


def _answer_statement(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + 4 * MAX_STATEMENT_CHARS]
    nl = rest.find("\n")
    raw_line = rest if nl < 0 else rest[:nl]
    lead = len(raw_line) - len(raw_line.lstrip().lstrip("*").lstrip())
    line = raw_line[lead:]
    x = None
    stop = len(raw_line)  # where the statement ends, as an offset into ``rest``
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(open_):
            end = line.find(close, len(open_))
            if end > len(open_):
                x = line[len(open_) : end]
                stop = lead + end + len(close)
            break
    if x is None:
        m = _SENTENCE_END_RE.search(line)
        x = line[: m.start()] if m else line
        stop = lead + (m.end() if m else len(line))
    if (
        len(text) - (last.end() + stop) > MAX_TAIL_CHARS
        and len(text[last.end() + stop :].strip()) > MAX_TAIL_CHARS
    ):
        return None  # not a closing statement: the response goes on after it
    x = x.strip().strip("*").strip().strip("$").strip().rstrip(".").strip()
    return x[:MAX_STATEMENT_CHARS] or None


def extract_answer(response: str) -> str | None:
    """The final answer of ``response`` (see the module doc), stripped, or None when there is none."""
    try:
        text = _as_text(response)
        if text is None:
            return None
        text = _after_thinking(text)
        if not text:
            return None
        found, content = last_box(text)
        if found:
            return content
        return _answer_statement(text)
    except Exception:  # pragma: no cover - extraction must never take the pipeline down
        logger.debug("extract_answer failed", exc_info=True)
        return None


# ----------------------------------------------------------------------------------------------------
# Normalisation and the fast path

_UNIT_WORDS = frozenset(
    " ".join(
        (
            "cm m km mm nm inch inches in ft foot feet yd yard yards mile miles meter meters metre metres",
            "centimeter centimeters kilometer kilometers millimeter millimeters sq square cubic units unit",
            "dollar dollars cent cents usd euro euros pound pounds lb lbs oz ounce ounces kg g gram grams",
            "kilogram kilograms mg liter liters litre litres l ml gallon gallons quart quarts cup cups degree",
            "degrees deg second seconds sec secs s minute minutes min mins hour hours hr hrs h day days week",
            "weeks month months year years yr mph kph percent people students apples cookies times page pages",
            "ways point points marbles books eggs boxes",
        )
    ).split()
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")
_POWER_SUFFIX_RE = re.compile(r"\^\s*\{?\s*[23]\s*\}?$")
_UNIT_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z .]*")
_ASCII_LETTERS_DOT_SPACE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ. ")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\(?:big|Big|bigg|Bigg)[lr]?(?![A-Za-z])")
# "\\\\" (a LaTeX line break) is matched first so that its second backslash is not read as "\\ ".
_SPACING_RE = re.compile(r"\\\\|\\[,;:! ]|\\q?quad(?![A-Za-z])")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE_RE = re.compile(r"^\(?([A-E])\)?[.:]?$")


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for open_, close in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)")):
        if s.startswith(open_) and s.endswith(close) and len(s) >= len(open_) + len(close):
            return s[len(open_) : len(s) - len(close)].strip()
    if s.startswith("$") and s.count("$") == 2:
        # "$145$solution:" (a dirty gold), "$5$ cm": the one math segment is the answer.
        return s[1 : s.index("$", 1)].strip()
    return s  # several segments ("$5$ or $9$"): their "$" are dropped by normalize_answer


def normalize_answer(s: str) -> str:
    """Light normalisation of one answer string (math-verify still sees ``\\%`` and symbols)."""
    s = _strip_math_delimiters(s)
    s = s.replace("\\$", "").replace("$", "").replace("{,}", ",").replace("\u2212", "-")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _SPACING_RE.sub(lambda m: m.group() if m.group() == "\\\\" else "", s)
    s = _DEGREE_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    m = _TEXT_CMD_RE.fullmatch(s)
    if m:  # "\text{(B)}", "\text{Evelyn}"
        s = m.group(1).strip()
    s = _strip_trailing_unit(s)
    s = s.strip()
    if _THOUSANDS_RE.match(s.replace("\\%", "").replace("%", "")):
        s = s.replace(",", "")
    return s


def _strip_trailing_unit(s: str) -> str:
    """Drop a unit after a plain number ("10\\text{ cm}^2", "18 dollars" -> the number). Linear time."""
    m = _POWER_SUFFIX_RE.search(s)
    core = s[: m.start()].rstrip() if m else s
    if core.endswith("}"):
        start = max(core.rfind(c) for c in ("\\text{", "\\mbox{", "\\mathrm{"))
        if start > 0:
            inner = core[core.index("{", start) + 1 : -1].strip()
            prefix = core[:start].strip()
            if _UNIT_TEXT_RE.fullmatch(inner) and _as_fraction(_compact(prefix)) is not None:
                return prefix
        return s
    i = len(core)
    while i > 0 and core[i - 1] in _ASCII_LETTERS_DOT_SPACE:
        i -= 1
    prefix, words = core[:i].strip(), re.findall(r"[A-Za-z]+", core[i:])
    if (
        words
        and prefix[-1:].isdigit()
        and all(w.lower() in _UNIT_WORDS for w in words)
        and _as_fraction(_compact(prefix)) is not None
    ):
        return prefix
    return s


def _compact(s: str) -> str:
    """Comparison key: no whitespace, no percent sign; single choice letters without parentheses."""
    s = re.sub(r"\s+", "", s).replace("\\%", "").replace("%", "")
    m = _CHOICE_RE.match(s)
    return m.group(1) if m else s


_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_FRAC_SHORT_RE = re.compile(r"^([+-]?)\\frac(\d)(\d)$")
_SLASH_RE = re.compile(r"^([+-]?\d+)/(\d+)$")


def _as_fraction(key: str) -> Fraction | None:
    """The exact rational value of a plain number / \\frac{a}{b} / a/b key, else None."""
    if len(key) > 64:
        return None
    try:
        if _DECIMAL_RE.match(key):
            return Fraction(key)
        m = _FRAC_RE.match(key) or _FRAC_SHORT_RE.match(key)
        if m:
            num, den = int(m.group(2)), int(m.group(3))
            if den == 0:
                return None
            value = Fraction(num, den)
            return -value if m.group(1) == "-" else value
        m = _SLASH_RE.match(key)
        if m and int(m.group(2)) != 0:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


# ----------------------------------------------------------------------------------------------------
# math-verify in killable helper processes

_WORKER_SRC = r"""
import json, logging, sys
logging.disable(logging.CRITICAL)
try:
    import resource
    limit = 4 << 30  # a runaway sympy computation ends in MemoryError, graded wrong
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
except Exception:
    pass
from math_verify import parse, verify
# One comparison now imports sympy's LaTeX machinery, so no later call spends its budget on imports.
verify(parse("$\\frac{1}{2}$", parsing_timeout=None), parse("$0.5$", parsing_timeout=None), timeout_seconds=None)
out = sys.stdout
out.write("ready\n")
out.flush()
for line in sys.stdin:
    try:
        gold, answer = json.loads(line)
        g = parse("$" + gold + "$", parsing_timeout=None)
        a = parse("$" + answer + "$", parsing_timeout=None)
        ok = bool(g) and bool(a) and bool(verify(g, a, timeout_seconds=None))
    except BaseException:
        ok = False
    out.write("1\n" if ok else "0\n")
    out.flush()
"""


class _Worker:
    """One helper process speaking line-delimited JSON over pipes."""

    def __init__(self, startup_timeout: float) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # sympy is single-threaded; keep BLAS pools (virtual memory) out of the helper
        env.setdefault("PYTHONHASHSEED", "0")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            env=env,
            close_fds=True,
            start_new_session=True,  # Ctrl-C goes to the parent, which kills its helpers itself
        )
        self._buf = b""
        line = self._readline(time.monotonic() + startup_timeout)
        if line != b"ready":
            self.kill()
            raise RuntimeError("math-verify helper process did not start")

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                if time.monotonic() >= deadline:
                    return None
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the helper died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip()

    def ask(self, gold: str, answer: str, timeout: float) -> bool | None:
        """True/False from math-verify, None on timeout or a dead helper (then it must be killed)."""
        try:
            self.proc.stdin.write((json.dumps([gold, answer]) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None
        line = self._readline(time.monotonic() + timeout)
        if line is None:
            return None
        return line == b"1"

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # pragma: no cover
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()


class _Pool:
    def __init__(self, max_workers: int) -> None:
        self.pid = os.getpid()
        self.max_workers = max_workers
        self._idle: list[_Worker] = []
        self._count = 0
        self._cv = threading.Condition()
        self._retry_start_at = 0.0  # after a failed start, do not try again before this time

    def acquire(self, deadline: float) -> _Worker | None:
        with self._cv:
            while not self._idle and self._count >= self.max_workers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cv.wait(remaining)
            if self._idle:
                return self._idle.pop()
            if time.monotonic() < self._retry_start_at:
                return None
            self._count += 1
        try:
            return _Worker(STARTUP_TIMEOUT_S)
        except Exception:
            logger.error(
                "could not start a math-verify helper process; math-verify runs in-process (main thread "
                "only) for the next %.0f s",
                _RETRY_START_S,
                exc_info=True,
            )
            with self._cv:
                self._count -= 1
                self._retry_start_at = time.monotonic() + _RETRY_START_S
                self._cv.notify()
            return None

    def release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._cv:
            if healthy:
                self._idle.append(worker)
            else:
                self._count -= 1
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for w in idle:
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(max_workers=min(4, max(2, os.cpu_count() or 2)))
        return _POOL


def _forget_pool_in_child() -> None:
    # A forked child must not talk to its parent's helpers (their pipes are shared).
    global _POOL, _POOL_LOCK, _CACHE_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()
    _CACHE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def shutdown() -> None:
    """Stop the idle helper processes (they restart on demand); also runs at interpreter exit."""
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown)


def warmup() -> bool:
    """Start one helper process now (else the first math-verify comparison pays ~0.5 s). True if ready."""
    pool = _pool()
    worker = pool.acquire(time.monotonic() + ACQUIRE_TIMEOUT_S)
    if worker is None:
        return False
    pool.release(worker, healthy=True)
    return True


def _verify_in_process(gold: str, answer: str, timeout: float) -> bool:
    """Fallback without helper processes: math-verify's own SIGALRM timeout, so main thread only."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        return False
    try:
        from math_verify import parse, verify

        secs = max(1, math.ceil(timeout))
        g = parse("$" + gold + "$", parsing_timeout=secs)
        a = parse("$" + answer + "$", parsing_timeout=secs)
        return bool(g) and bool(a) and bool(verify(g, a, timeout_seconds=secs))
    except Exception:  # math-verify's TimeoutException, RecursionError, ...
        return False


def _math_verify(gold: str, answer: str, timeout: float) -> bool:
    key = (gold, answer)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    pool = _pool()
    worker = pool.acquire(time.monotonic() + ACQUIRE_TIMEOUT_S)
    if worker is None:
        return _verify_in_process(gold, answer, timeout)
    result = worker.ask(gold, answer, timeout)
    pool.release(worker, healthy=result is not None)
    if result is None:
        logger.info(
            "math-verify exceeded %.1f s (gold %.80r, answer %.80r): counted wrong", timeout, gold, answer
        )
        result = False
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = result
    return result


# ----------------------------------------------------------------------------------------------------
# Public equivalence API


def answers_match(answer: str, gold: str, *, timeout: float | None = None) -> bool:
    """Whether an extracted ``answer`` is equivalent to ``gold``. Never raises; bounded time."""
    try:
        a, g = _as_text(answer), _as_text(gold)
        if a is None or g is None:
            return False
        if "\\boxed" in g or "\\fbox" in g:
            found, content = last_box(g)
            if found and content is not None:
                g = content
        if len(a) > MAX_VERIFY_CHARS or len(g) > MAX_VERIFY_CHARS:
            ka, kg = " ".join(a.split()), " ".join(g.split())
            return bool(ka) and ka == kg
        a_norm, g_norm = normalize_answer(a), normalize_answer(g)
        if not a_norm or not g_norm:
            return False
        a_key, g_key = _compact(a_norm), _compact(g_norm)
        if a_key == g_key:
            return True
        fa, fg = _as_fraction(a_key), _as_fraction(g_key)
        if fa is not None and fg is not None:
            if fa == fg:
                return True
            if fa.denominator == 1 and fg.denominator == 1:
                return False  # two different integers: no need for sympy
        elif fg is not None and not any(c.isdigit() or c == "\\" for c in a_key):
            return False  # a number against words ("given above", "x"): sympy can take ~1 s to say no
        budget = DEFAULT_TIMEOUT_S if timeout is None else max(0.05, float(timeout))
        return _math_verify(g_norm, a_norm, budget)
    except Exception:  # pragma: no cover - grading must never take the pipeline down
        logger.debug("answers_match failed", exc_info=True)
        return False


def is_correct(response: str, gold: str, *, timeout: float | None = None) -> bool:
    """A(x, y): whether the final answer of ``response`` is equivalent to ``gold`` (the rule in docs/method.md).

    Never raises, works from any thread; at most ``timeout`` (default ``DEFAULT_TIMEOUT_S``) seconds
    of math-verify per call once a helper process is running.
    """
    try:
        answer = extract_answer(response)
        if answer is None:
            return False
        if not isinstance(gold, str):
            gold = (
                _as_text(gold)
                if isinstance(gold, (bytes, bytearray))
                else (None if gold is None else str(gold))
            )
            if gold is None:
                return False
        return answers_match(answer, gold, timeout=timeout)
    except Exception:  # pragma: no cover
        logger.debug("is_correct failed", exc_info=True)
        return False


def grade_batch(
    responses: Sequence[str], golds: Sequence[str], *, timeout: float | None = None
) -> list[bool]:
    """``[is_correct(r, g) for r, g in zip(responses, golds)]``, with the helper processes in parallel.

    Worth it when many responses need math-verify (symbolic answers): threads wait on the helpers'
    pipes, so up to ``max_workers`` (4) comparisons run at once. Same length required (ValueError).
    """
    if len(responses) != len(golds):
        raise ValueError(f"grade_batch: {len(responses)} responses but {len(golds)} golds")
    if len(responses) < 2:
        return [is_correct(r, g, timeout=timeout) for r, g in zip(responses, golds)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=_pool().max_workers, thread_name_prefix="grading") as ex:
        return list(ex.map(lambda rg: is_correct(rg[0], rg[1], timeout=timeout), zip(responses, golds)))
