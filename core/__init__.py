"""What every part of Nidaan may import and which imports nothing of the project: the exception
hierarchy (:mod:`.errors`), the value types of findings (:mod:`.findings`) and the configuration
(:mod:`.config`). Nothing here imports ``nidaan.server``, ``nidaan.pacs_bridge``,
``nidaan.kernels`` or ``nidaan.client``; the import-linter contracts in ``pyproject.toml`` keep it
so."""
