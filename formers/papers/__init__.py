"""The paper catalog (DESIGN 7): the 81 papers of abstracts.md (= ../shared/papers/papers.md) as data
(papers.yaml), joined with what formers actually has. Status is derived, never typed:

    from formers.papers import Catalog
    cat = Catalog()                       # reads the registry, recipes, tests/papers, .junit/*.xml, results/
    cat.get("P06").status                 # 'reproduced' | 'verified' | 'implemented' | 'planned'

Command line: `formers papers` (table), `show P06`, `verify P06` / `--all`, `search "linear attention"`,
`html site/`, `docs docs/papers`.
"""

from formers.papers.catalog import CATEGORIES, STATUSES, Catalog, Paper, derive_status, read_junit

__all__ = ["CATEGORIES", "STATUSES", "Catalog", "Paper", "derive_status", "read_junit"]
