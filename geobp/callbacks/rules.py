"""The registry of diagnosis rules: each rule declared once, with its kind, order, thresholds and figure.

A rule is a pure function from the ``gradflow.json`` document and the :class:`Thresholds` to
findings of one kind. To add one, write the function (in :mod:`geobp.callbacks.diagnosis`, or any
module imported before the diagnosis runs) and decorate it::

    @register_rule("my_kind", order=55, figure="flow", thresholds={"my_ratio": 0.5})
    def find_my_kind(data, t):
        limit = threshold(t, "my_ratio")  # 0.5, or gradflow.thresholds.extra.my_ratio
        ...
        return [Finding("my_kind", where, step, value, message, fix)]

Everything else reads the registry: :func:`~geobp.callbacks.diagnosis.diagnose` runs the rules and
sorts their findings by ``order`` (then step), the report links each finding to its rule's
figure, and :func:`threshold` resolves the rule's own thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from geobp.callbacks.findings import Finding, Thresholds
from geobp.errors import ConfigError, format_error

#: A rule's check: ``check(data, thresholds)`` returns findings of the rule's kind.
RuleCheck = Callable[[Mapping[str, Any], Thresholds], list[Finding]]

#: A figure builder (see :mod:`geobp.callbacks.plots`): ``plot(data, steps)`` returns a
#: matplotlib ``Figure``, or None when the document has nothing to show for it.
FigureBuilder = Callable[[Mapping[str, Any], Any], Any]


@dataclass(frozen=True)
class Rule:
    """One diagnosis rule.

    Attributes:
        kind: the kind of the findings it makes (unique among the rules).
        order: its place in a diagnosis, the most urgent first (smaller first; the built-in rules
            use 10, 20, ... 90, so a new one fits between).
        check: the rule itself (:data:`RuleCheck`).
        figure: the report section that shows what it finds: a key of
            :data:`geobp.callbacks.plots.FIGURES`, ``nonfinite`` (the table of non-finite steps),
            or the key of the rule's own figure (``plot``).
        thresholds: the thresholds the rule adds, with their defaults, read with :func:`threshold`
            and set with ``gradflow.thresholds.extra.<name>``. (The built-in rules read the
            fields of :class:`Thresholds`.)
        title: the title of the rule's own figure.
        plot: the rule's own figure (:data:`FigureBuilder`), shown in the report after the
            built-in figures under the key ``figure``; None to show an existing figure.
    """

    kind: str
    order: int
    check: RuleCheck
    figure: str
    thresholds: Mapping[str, float] = field(default_factory=dict)
    title: str | None = None
    plot: FigureBuilder | None = None


#: Kind -> rule; :func:`register_rule` adds one.
RULES: dict[str, Rule] = {}


def register_rule(kind: str, *, order: int, figure: str, thresholds: Mapping[str, float] | None = None,
                  title: str | None = None, plot: FigureBuilder | None = None) -> Callable[[RuleCheck], RuleCheck]:
    """Decorator that registers a check function as the rule of ``kind`` (see :class:`Rule`).

    Returns:
        The decorator, which returns the function unchanged.

    Raises:
        ConfigError: the kind is registered already, a threshold name is taken (a field of
            :class:`Thresholds` or another rule's), a default is not a finite number > 0, or
            ``plot`` comes without a ``title``.
    """

    def add(check: RuleCheck) -> RuleCheck:
        add_rule(Rule(kind, order, check, figure, MappingProxyType(dict(thresholds or {})), title, plot))
        return check

    return add


def add_rule(rule: Rule) -> None:
    """Register ``rule`` (the non-decorator form of :func:`register_rule`, with its checks)."""
    if rule.kind in RULES:
        raise ConfigError(format_error(None, f"diagnosis rule {rule.kind!r} is registered already",
                                       "give the new rule another kind"))
    taken = {f.name for f in fields(Thresholds)} | {n for r in RULES.values() for n in r.thresholds}
    clash = sorted(set(rule.thresholds) & taken)
    if clash:
        raise ConfigError(format_error(None, f"diagnosis rule {rule.kind!r}: threshold name(s) {clash} are taken",
                                       "name the rule's thresholds after the rule (e.g. <kind>_ratio)"))
    bad = {k: v for k, v in rule.thresholds.items() if not (isinstance(v, (int, float)) and 0 < v < float("inf"))}
    if bad:
        raise ConfigError(format_error(None, f"diagnosis rule {rule.kind!r}: threshold defaults must be finite "
                                             f"numbers > 0 (found {bad})", "give each threshold a positive default"))
    if rule.plot is not None and not rule.title:
        raise ConfigError(format_error(None, f"diagnosis rule {rule.kind!r}: a figure of its own needs a title",
                                       "pass title= with plot="))
    RULES[rule.kind] = rule


def rules_in_order() -> list[Rule]:
    """The registered rules, in diagnosis order (``order``, then kind)."""
    return sorted(RULES.values(), key=lambda r: (r.order, r.kind))


def kind_order() -> tuple[str, ...]:
    """The kinds of the registered rules, in diagnosis order (the most urgent first)."""
    return tuple(r.kind for r in rules_in_order())


def order_of(kind: str) -> tuple[int, str]:
    """The sort key of a finding's kind (an unregistered kind sorts last)."""
    rule = RULES.get(kind)
    return (rule.order, kind) if rule is not None else (2**31, kind)


def figure_of(kind: str) -> str | None:
    """The report section (figure key) that shows findings of ``kind``; None for an unregistered kind."""
    rule = RULES.get(kind)
    return rule.figure if rule is not None else None


def threshold(t: Thresholds, name: str) -> float:
    """A threshold's value: a field of ``t``, else ``t.extra[name]``, else the default its rule declares.

    Raises:
        ConfigError: no field and no registered rule has that name.
    """
    if name in {f.name for f in fields(Thresholds)} and name != "extra":
        return getattr(t, name)
    if name in t.extra:
        return t.extra[name]
    for rule in RULES.values():
        if name in rule.thresholds:
            return rule.thresholds[name]
    raise ConfigError(format_error(None, f"unknown diagnosis threshold {name!r}",
                                   "declare it in the rule's register_rule(thresholds={...})"))


def unknown_extra_thresholds(t: Thresholds) -> list[str]:
    """The names in ``t.extra`` that no registered rule declares (typos, or a rule not imported)."""
    declared = {n for r in RULES.values() for n in r.thresholds}
    return sorted(set(t.extra) - declared)
