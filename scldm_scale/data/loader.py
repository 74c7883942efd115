"""Building a :class:`~scldm_scale.data.source.Source` from the ``data:`` section of a recipe.

``data.source`` names the class (:data:`SOURCE_CLASSES`); everything else - the epoch order,
sharding over ranks and dataloader workers, the position checkpoints hold, the inference pass -
is the source's, behind the one interface of :mod:`scldm_scale.data.source`.
"""

from __future__ import annotations

from typing import Any

from scldm_scale.data.config import DataConfig, SourceKind
from scldm_scale.data.h5ad_source import H5ADSource
from scldm_scale.data.labels import LabelTables
from scldm_scale.data.latent_cache import LatentCacheSource
from scldm_scale.data.mixture import MixtureSource, member_configs
from scldm_scale.data.soma_source import SomaSource
from scldm_scale.data.source import Source
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError

SOURCE_CLASSES = {
    SourceKind.H5AD: H5ADSource,
    SourceKind.SOMA: SomaSource,
    SourceKind.MIXTURE: MixtureSource,
    SourceKind.LATENTS: LatentCacheSource,
}


def _kind(cfg: Any) -> SourceKind:
    try:
        return SourceKind(cfg.source)
    except ValueError:
        raise ScldmError(
            f"data.source={cfg.source!r}: unknown source (choose one of {[s.value for s in SourceKind]})"
        ) from None


def build_source(
    cfg: DataConfig | Any,
    vocab: GeneVocab | None = None,
    labels: LabelTables | None = None,
    validate: bool = True,
) -> Source:
    """The source ``data.source`` names, over ``cfg``'s data.

    ``vocab`` / ``labels`` default to the data's own (:func:`load_vocab_and_labels`; the latent cache
    takes the given labels, else ``labels.json`` beside it). ``validate=False`` skips the per-shard
    h5ad checks (when ``prepare`` already ran them).
    """
    kind = _kind(cfg)
    if kind == SourceKind.LATENTS:
        return LatentCacheSource.from_config(cfg, labels)
    if vocab is None or labels is None:
        own_vocab, own_labels = load_vocab_and_labels(cfg)
        vocab = vocab if vocab is not None else own_vocab
        labels = labels if labels is not None else own_labels
    if kind == SourceKind.MIXTURE:
        members = member_configs(cfg)
        sources = [build_source(c, vocab, labels, validate) for c, _ in members]
        names = [f"{c.source.value}:{c.path or c.census_version}" for c, _ in members]
        return MixtureSource(cfg, sources, [w for _, w in members], names)
    if kind == SourceKind.H5AD:
        return H5ADSource(cfg, vocab, labels, validate=validate)
    return SomaSource(cfg, vocab, labels)


def load_vocab_and_labels(cfg: DataConfig | Any) -> tuple[GeneVocab, LabelTables]:
    """The gene vocabulary and label tables of ``cfg``'s count data, without building the source.

    ``data.vocab_path`` / ``data.labels_path`` when set, else ``vocab.json`` / ``labels.json`` of the
    data directory (written by ``prepare``); a SOMA experiment without them (the Census) gets them
    from the experiment itself; a mixture uses those of its first source (members inherit the paths).
    """
    kind = _kind(cfg)
    if kind == SourceKind.LATENTS:
        raise ScldmError("data.source=latents: a latent cache has no gene vocabulary; use the VAE run's vocab.json")
    if kind == SourceKind.MIXTURE:
        cfg = member_configs(cfg)[0][0]
        kind = _kind(cfg)
    return SOURCE_CLASSES[kind].read_tables(cfg)
