"""The API page (docs/api.md, mkdocstrings) links the docstrings' cross-references and shows no raw Sphinx role."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_page_links_cross_references_and_shows_no_raw_sphinx_roles(tmp_path):
    """The docstrings' ``:func:`x``` roles (docs/_ext/sphinx_roles.py) become links on the built site, never raw text."""
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               NO_MKDOCS_2_WARNING="1")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--config-file", str(ROOT / "mkdocs.yml"),
                    "--site-dir", str(tmp_path / "site")], check=True, capture_output=True, env=env, cwd=ROOT)
    raw_role = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):(?:`|<code>)")
    for page in (tmp_path / "site").rglob("*.html"):
        found = raw_role.findall(page.read_text(encoding="utf-8"))
        assert not found, f"{page.relative_to(tmp_path / 'site')}: {len(found)} raw roles, e.g. {found[0]}"
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    # minimoe.inspect.tracing's :class:`~minimoe.inspect.trace.RoutingTrace`, and LoadedModel.trace's inherited
    # :meth:`forward`, each as a link to the object's entry on the page
    assert re.search(r'<a class="autorefs[^"]*"[^>]* href="#minimoe\.inspect\.trace\.RoutingTrace"><code>RoutingTrace'
                     r"</code></a>", api)
    assert re.search(r'href="#minimoe\.model\.Model\.forward"><code>forward</code></a>', api)
