"""A Griffe extension for the API page: the docstrings' Sphinx roles become links.

The docstrings cross-reference as Sphinx writes it (``:func:`trace_text```,
``:class:`~minimoe.inspect.trace.RoutingTrace```), which reads well in ``help()`` but which
mkdocstrings would show raw.  Once the package is loaded, every role is resolved the way Python
resolves the name in that docstring's scope (the object's members, its class's, inherited ones
included, its module's and what the module imports) and becomes a mkdocs-autorefs reference: a
link where the API page documents the target, plain code where it does not (a private helper, a
module left off the page).  ``~`` shows the last part of the name only, as in Sphinx;
``:role:`title <target>``` keeps its title.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`(?P<text>[^`]+)`")
TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>$")


def resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as written in ``obj``'s docstring; ``name`` itself when it cannot be resolved."""
    head, dot, rest = name.partition(".")
    found = resolve_head(obj, head)
    return name if found is None else found + dot + rest


def resolve_head(obj: griffe.Object, head: str) -> str | None:
    """The full path of the name ``head`` in ``obj``'s scope, or None.

    A method's docstring names its class's other members bare (``:meth:`forward```), inherited ones included,
    as Sphinx allows: the class is a scope too.
    """
    for scope in filter(None, (obj, obj.parent, obj.module)):
        if scope.is_class and head in scope.inherited_members:  # LoadedModel's :meth:`forward` is Model's
            return scope.inherited_members[head].target_path
        try:
            return scope.resolve(head)
        except (griffe.NameResolutionError, griffe.AliasResolutionError):
            continue
    return None


def reference(obj: griffe.Object, role: re.Match) -> str:
    """One role as an optional autoref: a link if the target is on the site, its title as code if not."""
    text = role["text"]
    if titled := TITLED.match(text):
        title, target = titled["title"], titled["target"]
    else:
        target = text.lstrip("~")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    identifier = resolve(obj, target)
    return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'


def objects(obj: griffe.Object):
    """``obj`` and everything defined in it (imported names are documented where they are defined)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from objects(member)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda role: reference(obj, role), obj.docstring.value)
