"""Source rows: read (`readers`), checked and id'd (`checks`), labelled (`labels`), indexed and split (`index`)."""

from kdpipe.data.checks import row_id, unit
from kdpipe.data.index import SourceChangedError, SourceData, id_digest, id_multiset_hash, load_source
from kdpipe.data.readers import BadInputError

__all__ = [
    "BadInputError",
    "SourceChangedError",
    "SourceData",
    "id_digest",
    "id_multiset_hash",
    "load_source",
    "row_id",
    "unit",
]
