"""Which parameters a run trains, step by step (`--freeze`, `--stages`), and at what learning
rate (`--layer-lr-decay`).

Parameters are chosen by the part of the model they sit in — the IR's scopes
(`Graph.scope_of`), never their names. A pattern is one of:

    all           every parameter
    embeddings    the word, position and token-type tables and their LayerNorm
    encoder       every encoder layer
    layer:N       encoder layer N (0 is the one nearest the embeddings)
    layers:A-B    encoder layers A to B, both included (layers:N is layer:N)
    pooler        the pooler (a token classifier has none)
    head          the task's head (MLM + NSP, classifier, ...)

`--freeze P,…` keeps the parts named for the whole run. `--stages "P,…@S;P,…@S;…;P,…"` trains
in stages: each trains exactly the parts its patterns name (less `--freeze`'s), through
optimizer step S; the next starts at step S+1; the last runs to `--max-steps` (its `@S`, if
given, must be `--max-steps`). So `--stages "head@100;layers:4-5,pooler,head@300;all"` trains
the head for 100 steps, then the top two layers too until step 300, then everything.

A frozen parameter has `requires_grad=False`: no gradient is computed for it and the optimizer
holds no state for it (it steps only parameters with a gradient, and a parameter that a stage
freezes again has its state dropped), so it stays bitwise unchanged. One that a stage unfreezes
starts with fresh optimizer state. Which stage is active is a function of the step alone, so
a resumed run is in the same stage, with the same optimizer state, as an uninterrupted one.

`--layer-lr-decay X` scales each parameter's learning rate by its depth below the output: the
head and the pooler at lr, encoder layer L-1 (the top one of L) at lr·X, layer i at
lr·X^(L-i), the embeddings at lr·X^(L+1).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from bertrt.errors import BertrtError
from bertrt.graph.ir import Graph, Scope

if TYPE_CHECKING:
    import torch

#: The pattern words, in the order messages list them.
GRAMMAR = "all, embeddings, encoder, layer:N, layers:A-B, pooler, head"
_LAYERS = re.compile(r"layers?:(\d+)(?:-(\d+))?")
_STAGE_END = re.compile(r"(.*)@\s*(\d+)\s*")


class Pattern(NamedTuple):
    """A part of the model: a scope kind (`all`, `embeddings`, `encoder`, `layer`, `pooler`,
    `head`) and, for `layer`, the first and last index."""

    text: str
    kind: str
    first: int = 0
    last: int = 0

    def matches(self, scope: Scope | None) -> bool:
        if scope is None:
            return self.kind == "all"
        if self.kind in ("all", scope.kind):
            return self.kind != "layer" or self.first <= (scope.index or 0) <= self.last
        return self.kind == "encoder" and scope.kind in ("layer", "encoder")


@dataclass(frozen=True)
class Stage:
    """Stage `--stages` text `text`: the parts it trains, and the last step it trains (the
    step count done when it ends; None: to the end of the run)."""

    text: str
    patterns: tuple[Pattern, ...]
    end: int | None


# ---------------------------------------------------------------------- the grammar
def parse_pattern(text: str, flag: str) -> Pattern:
    """One pattern (see the module docstring).

    Raises:
        BertrtError: a word that is not a pattern, or a range that runs backwards.
    """
    word = text.strip()
    if word in ("all", "embeddings", "encoder", "pooler", "head"):
        return Pattern(word, word)
    match = _LAYERS.fullmatch(word)
    if match is None:
        raise BertrtError(f"{flag}: {word!r} is not a pattern; expected one of {GRAMMAR}")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(2))
    if last < first:
        raise BertrtError(f"{flag}: {word!r}: the range runs backwards (expected "
                          f"layers:{last}-{first})")
    return Pattern(word, "layer", first, last)


def parse_patterns(texts: Iterable[str], flag: str) -> tuple[Pattern, ...]:
    """The patterns of `texts`, each a comma-separated list (empty entries are errors)."""
    found = []
    for text in texts:
        for word in text.split(","):
            if not word.strip():
                raise BertrtError(f"{flag}: {text!r}: an empty pattern (expected a "
                                  f"comma-separated list of {GRAMMAR})")
            found.append(parse_pattern(word, flag))
    return tuple(found)


def parse_stages(text: str, max_steps: int) -> tuple[Stage, ...]:
    """The stages of a `--stages` value (see the module docstring).

    Raises:
        BertrtError: an empty stage or pattern, a stage but the last without `@STEP`, steps
            that do not increase or that reach `--max-steps` before the last stage.
    """
    flag = "--stages"
    parts = [part.strip() for part in text.split(";")]
    stages: list[Stage] = []
    previous = 0
    for k, part in enumerate(parts, start=1):
        last = k == len(parts)
        match = _STAGE_END.fullmatch(part)
        body, end = (match.group(1), int(match.group(2))) if match else (part, None)
        if not body.strip():
            raise BertrtError(f"{flag}: stage {k} {part!r} names no part of the model "
                              f"(expected PATTERN,...@STEP with patterns {GRAMMAR})")
        if "@" in body:
            raise BertrtError(f"{flag}: stage {k} {part!r}: expected PATTERN,...@STEP, with "
                              "one @ and a step count after it")
        patterns = parse_patterns([body], f"{flag} stage {k}")
        if last:
            if end is not None and end != max_steps:
                raise BertrtError(f"{flag}: the last stage {part!r} runs to --max-steps "
                                  f"{max_steps}; end it @{max_steps} or leave its @ out")
            end = None
        elif end is None:
            raise BertrtError(f"{flag}: stage {k} {part!r} has no @STEP (every stage but the "
                              "last says the step it ends at, e.g. head@100)")
        elif end <= previous or end >= max_steps:
            raise BertrtError(f"{flag}: stage {k} {part!r} ends at step {end}; the steps must "
                              f"increase, from above {previous} to below --max-steps "
                              f"{max_steps}")
        stages.append(Stage(part, patterns, end))
        previous = end or previous
    return tuple(stages)


# ---------------------------------------------------------------------- on a model
def select(graph: Graph, patterns: Sequence[Pattern], flag: str) -> frozenset[str]:
    """The parameters of `graph` in the parts `patterns` name.

    Raises:
        BertrtError: a pattern that matches no parameter of this model (naming what it has).
    """
    scopes = {name: graph.scope_of(value) for name, value in graph.params.items()}
    chosen: set[str] = set()
    for pattern in patterns:
        found = {name for name, scope in scopes.items() if pattern.matches(scope)}
        layers = sorted({s.index for s in scopes.values() if s is not None and s.kind == "layer"})
        if pattern.kind == "layer" and found and pattern.last > layers[-1]:
            found = set()  # a range that runs past the top layer is a mistake, not a subset
        if not found:
            parts = sorted({s.kind for s in scopes.values() if s is not None} - {"layer"})
            has = ", ".join([*parts, f"layers 0-{layers[-1]}" if layers else "no layers"])
            raise BertrtError(f"{flag}: {pattern.text!r} matches no parameter of this model "
                              f"(it has {has})")
        chosen |= found
    return frozenset(chosen)


@dataclass(frozen=True)
class Plan:
    """The parameters each stage trains: `stages[k]` trains `trainable[k]` from step
    `starts[k]` (0-based) on."""

    stages: tuple[Stage, ...]
    starts: tuple[int, ...]
    trainable: tuple[frozenset[str], ...]
    total: int  #: parameters in the model

    def stage_at(self, step: int) -> int:
        """The stage that runs optimizer step `step` (0-based)."""
        return sum(1 for start in self.starts[1:] if start <= step)

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    def describe(self, k: int, numel: dict[str, int]) -> str:
        """A line for the user: what stage `k` trains."""
        count = sum(numel[name] for name in self.trainable[k])
        where = (f"stage {k + 1}/{len(self.stages)} ({self.stages[k].text}), from step "
                 f"{self.starts[k] + 1}: " if self.staged else "")
        return (f"{where}training {len(self.trainable[k])} of {self.total} parameter tensors "
                f"({count:,} of {sum(numel.values()):,} values)")


def plan(graph: Graph, freeze: Sequence[str], stages: str | None, max_steps: int) -> Plan:
    """The stages of a run on the model of `graph` (one stage without `--stages`).

    Raises:
        BertrtError: a pattern that matches nothing, or a stage left with nothing to train.
    """
    frozen = select(graph, parse_patterns(freeze, "--freeze"), "--freeze") if freeze else (
        frozenset())
    steps = (parse_stages(stages, max_steps) if stages else
             (Stage("all", (Pattern("all", "all"),), None),))
    trainable = []
    for k, stage in enumerate(steps, start=1):
        where = f"--stages stage {k}" if stages else "--freeze"
        names = select(graph, stage.patterns, where) - frozen
        if not names:
            raise BertrtError(f"{where}: nothing left to train once --freeze "
                              f"{','.join(freeze)} is applied")
        trainable.append(names)
    starts = (0, *(stage.end for stage in steps[:-1]))
    return Plan(steps, starts, tuple(trainable), len(graph.params))  # type: ignore[arg-type]


def lr_scales(graph: Graph, decay: float) -> dict[str, float]:
    """Each parameter's learning-rate factor under `--layer-lr-decay decay` (see the module
    docstring): 1 for the head and pooler, decay**(L-i) for layer i, decay**(L+1) for the
    embeddings (and anything outside the layers below them)."""
    scopes = {name: graph.scope_of(value) for name, value in graph.params.items()}
    layers = 1 + max((s.index or 0 for s in scopes.values() if s and s.kind == "layer"),
                     default=-1)
    scales = {}
    for name, scope in scopes.items():
        if scope is not None and scope.kind in ("head", "pooler"):
            depth = 0
        elif scope is not None and scope.kind == "layer":
            depth = layers - (scope.index or 0)
        else:
            depth = layers + 1
        scales[name] = decay**depth
    return scales


def apply(net: torch.nn.Module, trainable: Collection[str],
          optimizer: torch.optim.Optimizer | None = None) -> None:
    """Let exactly the parameters named in `trainable` take gradients, and drop `optimizer`'s
    state of every other one (a parameter a stage freezes again restarts fresh if a later
    stage unfreezes it). Call it between steps, when no gradient is held."""
    for name, param in net.named_parameters():
        param.requires_grad_(name in trainable)
        if optimizer is not None and name not in trainable:
            optimizer.state.pop(param, None)
