"""Corpus curation before tokenization (`rpt data prepare`, settings under `data.prepare`), on Ray Data.

Stages, each optional, run in this order on the documents in corpus order (`data.curation.pipeline`):

1. `dedup.exact` (`data.curation.exact`): documents whose normalised text (NFC, whitespace collapsed, lower
   case) was seen before are dropped;
2. `dedup.near` (`data.curation.near`): MinHash LSH over word n-gram shingles (Broder, "On the resemblance
   and containment of documents", 1997; banding as in Leskovec et al., *Mining of Massive Datasets*, ch. 3);
   of each near-duplicate group the first document in corpus order is kept;
3. `filters` (`data.curation.filters`): Gopher quality heuristics (Rae et al., arXiv 2112.11446, appendix A);
4. `select` (`data.curation.select`): INGENIOUS (Renduchintala et al., arXiv 2305.06677): a representative
   subset by facility-location maximisation (lazy greedy) within partitions, over hashed n-gram features or a
   registered model's mean-pooled hidden states.

The manifest records each stage as `{stage, documents_in, documents_out}`; the ids (corpus positions) of the
removed documents, with the stage and reason, go to `curation_removed.parquet` next to it.
"""

from data.curation.config import CurationSpec, DedupSpec, FilterSpec, NearDedupSpec, SelectSpec

__all__ = ["CurationSpec", "DedupSpec", "FilterSpec", "NearDedupSpec", "SelectSpec"]
