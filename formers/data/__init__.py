"""The data cache (DESIGN §6): one folder, `$FORMERS_DATA` (default ~/.cache/formers), holding every prepared source.

`formers data list` shows each source and whether it is ready; `formers data fetch NAME` prepares one. Loaders
never download: when a source is missing their error names the command that prepares it.
"""

from formers.data.sources import SOURCES, Source, cache_dir, get_source, load_documents

__all__ = ["SOURCES", "Source", "cache_dir", "get_source", "load_documents"]
